"""Generator families: what the training loop, the sampling programs and the benchmarks need to know of a
kind of generator, behind one registry, so that they call a family instead of flow matching directly.

A family is its config class (the `model` section of a run's config), how to build the model from it,
its training loss, its sampler, and its FLOPs. The model carries its conditioning (`model.conditioning`,
fae_fast/conditioning.py), which gives the null condition for guidance and the dropout for training.

    family = family_of(cfg.model)
    model = family.build(cfg.model, impl)
    loss = family.loss(model, latents, condition, cfg.transport, generator).mean()
    # or, with the random numbers drawn apart (a captured CUDA-graph step reads them as inputs):
    draws = family.draw(model, latents, condition, cfg.transport, generator)
    loss = family.loss_of_draws(model, latents, condition, draws, cfg.transport).mean()
    latents = family.sample(model, condition, noise, cfg.sampler)

Registered: "flow_transformer" (SiT / LightningDiT, flow matching), "text_flow_transformer" (the same,
conditioned on caption embeddings: fae_fast/text_generator.py) and "starflow" (a normalizing flow, exact
likelihood: fae_fast/starflow.py). A new family is one module that defines its GeneratorFamily and
one line in FAMILIES (docs/ARCHITECTURE.md says what is left to make a
family's config reach the command line).
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fae_fast import starflow
from fae_fast.conditioning import draw_dropped, replace_dropped
from fae_fast.config import (GeneratorConfig, StarFlowConfig, TextGeneratorConfig, TransportConfig, config_from_json,
                             to_dict)
from fae_fast.generators import Generator, choose_attention_backend, forward_flops_per_sample
from fae_fast.sampling import evaluation_plan, sample_latents
from fae_fast.text_generator import TextGenerator, choose_text_attention_backend, text_flops_per_sample
from fae_fast.transport import flow_matching_loss, sample_t


@dataclass(frozen=True)
class GeneratorFamily:
    name: str
    config_class: type
    """The dataclass of the model's options (a run's `model` section)."""
    build: Callable[..., torch.nn.Module]
    """(config, impl='auto') -> model, with `model.conditioning`."""
    draw: Callable[..., dict[str, torch.Tensor]]
    """(model, latents (B, T, C), condition, transport config, torch.Generator) -> every random number of one
    training step (condition dropout included), by name, drawn from the generator in a fixed order."""
    loss_of_draws: Callable[..., torch.Tensor]
    """(model, latents, condition, draws, transport config) -> per-sample loss (B,); draws nothing itself."""
    sample: Callable[..., torch.Tensor]
    """(model, condition, noise (B, T, C), SamplerConfig, generator=None, step_noise=None) -> latents."""
    flops_per_sample: Callable[[object], float]
    """Forward FLOPs per sample (a training step is about 3x)."""
    choose_attention: Callable[..., str]
    """(config, rows, dtype, device) -> the attention backend measured for the model's shape at `rows`
    samples per forward (fae_fast.attention.choose_backend); called before compiling."""
    loss_floor: Callable[[object], float] = lambda config: 0.0
    """(config) -> the least its loss can be (the loss-spike guard judges the excess over it)."""
    evaluation_plan: Callable[..., tuple[int, int]] | None = None
    """(SamplerConfig) -> (plain, guided) forwards per sample, for families sampled by integrating their
    forward (the sampling program's time estimate); None: the program times one batch instead."""
    bits_per_dim: Callable[..., torch.Tensor] | None = None
    """(model, latents, condition) -> -log2 p(latents | condition) per dimension (B,), for families with an
    exact likelihood; None for the others."""

    def loss(self, model, latents: torch.Tensor, condition, tc: TransportConfig,
             generator: torch.Generator | None) -> torch.Tensor:
        """Per-sample loss (B,) of one batch, every random number drawn from `generator` (draw, then
        loss_of_draws)."""
        return self.loss_of_draws(model, latents, condition, self.draw(model, latents, condition, tc, generator), tc)


def flow_matching_draws(model: Generator, x1: torch.Tensor, condition: torch.Tensor, tc: TransportConfig,
                        generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """The random numbers of one flow-matching step, from `generator` in this order: which samples lose their
    condition ('dropped', only with condition dropout), t from tc's schedule ('t', (B,)), and the Gaussian
    noise ('noise', x1's shape)."""
    draws = {}
    if (dropped := draw_dropped(model.conditioning, x1.shape[0], x1.device, generator)) is not None:
        draws["dropped"] = dropped
    draws["t"] = sample_t(x1.shape[0], method=tc.t_sampling, mean=tc.logit_mean, std=tc.logit_std,
                          shift=tc.time_shift, device=x1.device, generator=generator)
    draws["noise"] = torch.randn(x1.shape, device=x1.device, generator=generator)
    return draws


def flow_matching_loss_of_draws(model: Generator, x1: torch.Tensor, condition: torch.Tensor,
                                draws: dict[str, torch.Tensor], tc: TransportConfig) -> torch.Tensor:
    """Flow matching of one batch, its random numbers given (flow_matching_draws): per-sample loss (B,)."""
    condition = replace_dropped(model.conditioning, condition, draws.get("dropped"))
    return flow_matching_loss(lambda xt, tt: model(xt, tt, condition).float(), x1, draws["t"], noise=draws["noise"],
                              cosine_weight=tc.cosine_weight)


FLOW_TRANSFORMER = GeneratorFamily(
    name="flow_transformer", config_class=GeneratorConfig, build=Generator, draw=flow_matching_draws,
    loss_of_draws=flow_matching_loss_of_draws, sample=sample_latents, flops_per_sample=forward_flops_per_sample,
    choose_attention=choose_attention_backend, evaluation_plan=evaluation_plan)

TEXT_FLOW_TRANSFORMER = GeneratorFamily(
    name="text_flow_transformer", config_class=TextGeneratorConfig, build=TextGenerator,
    draw=flow_matching_draws, loss_of_draws=flow_matching_loss_of_draws, sample=sample_latents,
    flops_per_sample=text_flops_per_sample, choose_attention=choose_text_attention_backend,
    evaluation_plan=evaluation_plan)

STARFLOW = GeneratorFamily(
    name="starflow", config_class=StarFlowConfig, build=starflow.StarFlow, draw=starflow.starflow_draws,
    loss_of_draws=starflow.starflow_loss_of_draws,
    sample=starflow.sample_starflow, flops_per_sample=starflow.flops_per_sample,
    choose_attention=starflow.choose_attention, loss_floor=starflow.nll_floor,
    bits_per_dim=lambda model, x, y: model.nll_per_dim(x, y) / math.log(2))

FAMILIES: dict[str, GeneratorFamily] = {family.name: family
                                         for family in (FLOW_TRANSFORMER, TEXT_FLOW_TRANSFORMER, STARFLOW)}


def family_of(config) -> GeneratorFamily:
    """The registered family whose config class `config` is (exactly: a family's config may extend
    another's)."""
    for family in FAMILIES.values():
        if type(config) is family.config_class:
            return family
    known = ", ".join(f"{f.name} ({f.config_class.__name__})" for f in FAMILIES.values())
    raise ValueError(f"no generator family takes a {type(config).__name__} config; registered: {known}")


LEGACY_FAMILY = "flow_transformer"
"""The family of a saved run config that names none (written before families were recorded)."""


def run_record(cfg) -> dict:
    """A run config as saved with checkpoints: its sections, and the name of its model's family."""
    return {**to_dict(cfg), "family": family_of(cfg.model).name}


def model_config_from_json(path: str | Path) -> tuple[GeneratorFamily, object]:
    """(family, model config) of a saved run config (a checkpoint's config.json), by the family it names."""
    name = json.loads(Path(path).read_text()).get("family", LEGACY_FAMILY)
    if name not in FAMILIES:
        raise ValueError(f"{path} names generator family {name!r}, which this fae_fast does not register "
                         f"(registered: {', '.join(FAMILIES)}); update fae_fast or pass another --model_config")
    family = FAMILIES[name]
    return family, config_from_json(path, family.config_class, ("model",))
