"""The generator-family seam (fae_fast/families.py) and conditioning (fae_fast/conditioning.py): the registry
resolves a config to its family, the family's loss is the flow-matching step train_gen.py has always run
(same draws, same value), its sampler is sampling.sample_latents, guidance batches any condition that stacks
along dim 0 with its null, and class conditioning refuses what it cannot take."""
import json
from dataclasses import dataclass

import pytest
import torch

from fae_fast.conditioning import ClassLabels
from fae_fast.config import SamplerConfig, TransportConfig, generator_config
from fae_fast.families import FAMILIES, FLOW_TRANSFORMER, family_of
from fae_fast.transport import flow_matching_loss, guided_velocity, sample_t


def tiny_model():
    torch.manual_seed(0)
    cfg = generator_config("LightningDiT-tiny/1", grid=4, in_channels=4, num_classes=10, class_dropout=0.3)
    model = FLOW_TRANSFORMER.build(cfg, impl="torch")
    for p in model.parameters():  # not adaLN-Zero: every path carries values
        p.data.normal_(0.0, 0.05)
    return cfg, model


def test_registry_resolves_the_config_to_its_family():
    cfg, _ = tiny_model()
    assert family_of(cfg) is FLOW_TRANSFORMER and FAMILIES["flow_transformer"] is FLOW_TRANSFORMER

    @dataclass
    class FlowConfig:
        depth: int = 2

    with pytest.raises(ValueError, match="no generator family takes a FlowConfig config; registered: "
                                         "flow_transformer \\(GeneratorConfig\\)"):
        family_of(FlowConfig())


def test_flow_loss_draws_and_values_are_the_flow_matching_step():
    """Dropout, t and noise drawn from one generator in that order, then flow matching: written out here."""
    cfg, model = tiny_model()
    tc = TransportConfig(t_sampling="logit_normal", time_shift=0.4)
    x1, y = torch.randn(16, 16, 4), torch.randint(0, 10, (16,))
    got = family_of(cfg).loss(model, x1, y, tc, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    dropped = torch.where(torch.rand(16, generator=g) < 0.3, torch.full_like(y, 10), y)
    t = sample_t(16, method="logit_normal", mean=tc.logit_mean, std=tc.logit_std, shift=0.4, generator=g)
    noise = torch.randn(x1.shape, generator=g)
    want = flow_matching_loss(lambda xt, tt: model(xt, tt, dropped).float(), x1, t, noise=noise,
                              cosine_weight=tc.cosine_weight)
    assert got.shape == (16,)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_flow_sampler_guides_with_the_models_null_condition():
    cfg, model = tiny_model()
    noise = torch.randn(6, 16, 4)
    y = torch.arange(6)
    sampler = SamplerConfig(method="euler", steps=4, time_shift=1.0, cfg=[(0.0, 1.0, 3.0)])
    calls = []
    counting = lambda x, t, c: (calls.append(c.clone()), model(x, t, c))[1]  # noqa: E731
    counting.conditioning = model.conditioning
    out = family_of(cfg).sample(counting, y, noise, sampler)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert len(calls) == 4 and all(torch.equal(c, torch.cat([y, torch.full_like(y, 10)])) for c in calls)


def test_guidance_batches_embedding_conditions_with_their_null():
    """A text-like condition (B, L, D) and its null stack along dim 0 like labels do: one 2B forward."""
    cond, null = torch.randn(3, 5, 8), torch.zeros(3, 5, 8)
    seen = []

    def model(x, t, c):
        seen.append(c)
        return x * c.mean(dim=(1, 2))[:, None, None]

    x, t = torch.randn(3, 16, 4), torch.full((3,), 0.5)
    v = guided_velocity(model, x, t, cond, null=null, intervals=[(0.0, 1.0, 2.0)])
    assert torch.equal(seen[0], torch.cat([cond, null]))
    v_c, v_u = x * cond.mean(dim=(1, 2))[:, None, None], torch.zeros_like(x)
    torch.testing.assert_close(v, v_u + 2.0 * (v_c - v_u))


def test_class_labels_null_and_no_dropout():
    """(The dropout rate itself: test_generators.test_label_dropout_uses_the_null_label.)"""
    y = torch.randint(0, 10, (4000,))
    assert torch.equal(ClassLabels(10).null(y), torch.full_like(y, 10))
    assert torch.equal(ClassLabels(10, dropout=0.0).drop(y), y)


def test_saved_run_configs_name_their_family_and_load_by_it(tmp_path):
    from fae_fast.config import recipe
    from fae_fast.families import model_config_from_json, run_record

    cfg = recipe("demo")
    record = run_record(cfg)
    assert record["family"] == "flow_transformer" and record["model"]["depth"] == cfg.model.depth
    path = tmp_path / "config.json"
    path.write_text(json.dumps(record))
    family, model_cfg = model_config_from_json(path)
    assert family is FLOW_TRANSFORMER and model_cfg == cfg.model
    del record["family"]  # a run saved before families were recorded: a flow transformer
    path.write_text(json.dumps(record))
    assert model_config_from_json(path)[0] is FLOW_TRANSFORMER
    record["family"] = "normalizing_flow"
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="names generator family 'normalizing_flow'.*registered: flow_transformer"):
        model_config_from_json(path)


def test_the_command_line_overrides_whichever_family_config_a_recipe_built():
    """A recipe of another family puts its own model config in the run config; `--model.x` then sets that
    class's fields, with its own did-you-mean."""
    from fae_fast.cli import UsageError, parse_command_line
    from fae_fast.config import GenTrainConfig

    @dataclass
    class FlowConfig:
        grid: int = 16
        in_channels: int = 32
        num_classes: int = 1000
        blocks: int = 8

    def parse(*argv):
        return parse_command_line(list(argv), prog="train_gen.py", summary="", choices={"recipe": ("flow", {"flow": ""})},
                                  build=lambda picked: GenTrainConfig(model=FlowConfig()))

    assert parse("--model.blocks=4", "--model.grid=8").model == FlowConfig(grid=8, blocks=4)
    with pytest.raises(UsageError, match="FlowConfig has no field 'blocs'; did you mean 'blocks'"):
        parse("--model.blocs=4")


def test_evaluation_conditions_come_from_the_conditioning():
    from fae_fast.eval.protocol import index_labels

    labels, idx = ClassLabels(10), torch.arange(25)
    assert torch.equal(labels.for_indices(0, idx), idx % 10)
    assert torch.equal(labels.for_indices(3, idx, "random"), index_labels(3, idx, 10, "random"))


@pytest.mark.parametrize("name", ["demo", "t2i-demo", "starflow-demo"])
def test_every_familys_loss_is_its_draws_then_a_loss_that_draws_nothing(name):
    """A family's loss is draw (every random number, from the step's generator) then loss_of_draws (none
    of its own), so a captured CUDA-graph step can take the draws as inputs and train what eager trains."""
    from fae_fast.config import recipe

    cfg = recipe(name)
    family = family_of(cfg.model)
    torch.manual_seed(0)
    model = family.build(cfg.model, impl="torch")
    x = torch.randn(8, cfg.model.grid ** 2, cfg.model.in_channels)
    if hasattr(cfg.model, "text_dim"):
        condition = torch.randn(8, cfg.model.text_length, cfg.model.text_dim)
    else:
        condition = torch.randint(0, cfg.model.num_classes, (8,))
    whole = family.loss(model, x, condition, cfg.transport, torch.Generator().manual_seed(5))
    draws = family.draw(model, x, condition, cfg.transport, torch.Generator().manual_seed(5))
    assert draws["noise"].shape == x.shape
    assert ("dropped" in draws) == (model.conditioning.dropout > 0)
    torch.manual_seed(123)
    split = family.loss_of_draws(model, x, condition, draws, cfg.transport)
    torch.manual_seed(456)  # another global RNG state: loss_of_draws must not read it
    again = family.loss_of_draws(model, x, condition, draws, cfg.transport)
    torch.testing.assert_close(split, whole, rtol=0, atol=0)
    torch.testing.assert_close(again, whole, rtol=0, atol=0)
    other = family.loss(model, x, condition, cfg.transport, torch.Generator().manual_seed(6))
    assert not torch.equal(other, whole), "another seed draws other numbers"
