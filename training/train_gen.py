"""Train a generator on FAE latents: SiT / LightningDiT (class labels or captions) or a STARFlow normalizing flow
with flow matching or exact likelihood (the recipe's model config picks the family: fae_fast/families.py).

    torchrun --standalone --nproc_per_node=1 training/train_gen.py                 # embedded toy demo (CPU ok)
    torchrun --standalone --nproc_per_node=1 training/train_gen.py --recipe starflow-demo   # or t2i-demo
    torchrun --nproc_per_node=8 training/train_gen.py --recipe lightningdit-xl-80ep --data.path=/latents

FSDP2 + per-block torch.compile + fused kernels; DCP checkpoints; a run killed at any moment and
started again with the same command continues from its last complete checkpoint. Noise, t and label
dropout of a step are drawn from a generator seeded by (seed, step, rank), so a resumed run draws
exactly what an uninterrupted one would.
"""
import functools
import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fae_fast.attention import only_backend
from fae_fast.cli import UsageError, parse_command_line, run_program
from fae_fast.config import ATTENTION_CHOICES, CUDA_GRAPH_CHOICES, PRECISIONS, RECIPES, GenTrainConfig, recipe
from fae_fast.data.latent_cache import LatentCache
from fae_fast.data.latents import make_source
from fae_fast.data.toy import ToyLatents
from fae_fast.fp8 import use_fp8
from fae_fast.fp8_fsdp import wrap_for_fp8_all_gather
from fae_fast.families import family_of, run_record
from fae_fast.inference import LatentDecoder
from fae_fast.seeding import step_generator
from fae_fast.viz import latents_to_images, plot_toy_projection, save_grid
from fae_fast.train.checkpoint import CheckpointManager, ModelAndOptimizer, export_weights, step_of
from fae_fast.train.cuda_graph import GraphedStep, StaticInputs, make_capturable
from fae_fast.train.parallelize import parallelize
from fae_fast.train.loop import LoopSettings, train_loop
from fae_fast.train.runtime import (EMA, Spike, data_index, finish_distributed, gather_objects, init_distributed,
                                    make_adamw, mean_over_ranks, merge_ranges, plot_curves, print0, set_lr)


def parse_args(argv: list[str]) -> GenTrainConfig:
    """`--recipe NAME` (default: demo) then `--section.field=value` overrides; --help lists both."""
    cfg = parse_command_line(argv, prog="train_gen.py", summary=__doc__.split("\n")[0],
                             choices={"recipe": ("demo", RECIPES)}, build=lambda picked: recipe(picked["recipe"]))
    if cfg.data.path and cfg.data.source != "cache":
        raise UsageError(f"--data.path is read only with --data.source=cache, and this run has data.source="
                         f"{cfg.data.source!r}; add --data.source=cache to train on the latent cache")
    run = cfg.run
    if run.precision not in PRECISIONS:
        raise UsageError(f"--run.precision={run.precision!r} is not one of {', '.join(PRECISIONS)}")
    if run.cuda_graph not in CUDA_GRAPH_CHOICES:
        raise UsageError(f"--run.cuda_graph={run.cuda_graph!r} is not one of {', '.join(CUDA_GRAPH_CHOICES)}")
    if run.attention not in ATTENTION_CHOICES:
        raise UsageError(f"--run.attention={run.attention!r} is not one of {', '.join(ATTENTION_CHOICES)}")
    for field, what in (("fp8_weight_gradient", "runs FP8 linears' weight gradients in FP8"),
                        ("fp8_bf16_end_blocks", "keeps the end blocks of an FP8 run in bf16")):
        value = getattr(run, field)
        if value and run.precision != "fp8":
            raise UsageError(f"--run.{field}={str(value).lower()} {what}, and this run has "
                             f"run.precision={run.precision!r}; add --run.precision=fp8")
    if evaluates_during_training(cfg) and run.eval_every % run.log_every:
        raise UsageError(f"--run.eval_every={run.eval_every} must be a multiple of run.log_every={run.log_every}")
    if run.eval_ref and not cfg.fae_decoder:
        raise UsageError("--run.eval_ref scores images the FAE decodes from the samples: pass --fae_decoder= the "
                         "whole-FAE file (fae.safetensors)")
    if cfg.data.source == "cache" and not Path(cfg.data.path).is_dir():
        raise FileNotFoundError(f"--data.path={cfg.data.path!r} is no folder; pass the latent cache that "
                                f"training/extract_latents.py wrote (--out there)")
    return cfg


def gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's x along dim 0 (rank order), on CPU."""
    return torch.cat(gather_objects(x.cpu()))


@functools.lru_cache(maxsize=1)
def opened_cache(path: str) -> LatentCache:
    """The run's latent cache, opened (index, statistics, every shard mapped) once for all its sample grids."""
    return LatentCache(path)


def conditions_of(cfg: GenTrainConfig, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The model's condition for evaluation samples of class `labels` at set positions `index`: the labels
    themselves; for a text-conditioned model on the toy captions, the caption embeddings of the class in
    wording index // num_classes (every wording of every class alike); on a caption cache, the cached
    embeddings of pair `index` (the cache's first pairs, in order, so every grid shows the same captions)."""
    if not hasattr(cfg.model, "text_dim"):
        return labels
    if cfg.data.source == "cache":
        cache = opened_cache(cfg.data.path)
        pairs = index.cpu().numpy() % cache.num_images
        return torch.from_numpy(cache.text(pairs).astype(np.float32)).to(labels.device)
    if cfg.data.source != "toy_captions":
        raise ValueError(f"sample grids and in-training evaluation of a text-conditioned model take captions from "
                         f"the toy caption set or a caption cache, not data.source={cfg.data.source}; set "
                         f"--run.sample_every=0 --run.eval_every=0 --run.eval_samples=0 for other data")
    from fae_fast.data.toy_captions import caption_conditions

    return caption_conditions(cfg.model, labels, index // cfg.model.num_classes)


def sample_local(model, cfg: GenTrainConfig, labels: torch.Tensor, d, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples (float32) of this rank's slice (every world-th) of `labels`, and that slice."""
    mine = labels[d.rank::d.world].to(d.device)
    condition = conditions_of(cfg, mine, torch.arange(len(labels), device=d.device)[d.rank::d.world])
    g = torch.Generator(device=d.device).manual_seed(seed + d.rank)
    T = cfg.model.grid * cfg.model.grid
    noise = torch.randn(mine.shape[0], T, cfg.model.in_channels, device=d.device, generator=g)
    with autocast(cfg, d, use_fsdp(cfg, d)):
        out = family_of(cfg.model).sample(model, condition, noise, cfg.sampler, generator=g)
    return out.float(), mine


def sample_share(model, cfg: GenTrainConfig, labels: torch.Tensor, d, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_local on every rank; all ranks gather the whole set (rank-major order) and its labels."""
    out, mine = sample_local(model, cfg, labels, d, seed)
    return gather_cat(out), gather_cat(mine)


def toy_of(cfg: GenTrainConfig) -> ToyLatents:
    """The toy mixture a run trains on (its classes, latent shape and data seed)."""
    return ToyLatents(cfg.model.num_classes, cfg.model.grid ** 2, cfg.model.in_channels, seed=cfg.data.seed)


def toy_frechet(model, cfg: GenTrainConfig, d) -> tuple[dict[str, float], tuple[torch.Tensor, torch.Tensor]]:
    """Frechet distance of the model's samples to the toy's true per-class and mixture Gaussians, and the
    samples with their labels (for the projection plot)."""
    toy = toy_of(cfg)
    labels = torch.arange(cfg.run.eval_samples) % cfg.model.num_classes
    samples, labels = sample_share(model, cfg, labels, d, seed=cfg.run.seed + 12345)
    flat = samples.flatten(1).to(d.device)  # scored where the samples were drawn (fp64 on a GPU is fast)
    on_device = labels.to(d.device)
    scores = {f"class {k}": toy.reference(k).frechet_distance(flat[on_device == k]) for k in range(toy.num_classes)}
    scores["overall"] = toy.mixture_reference().frechet_distance(flat)
    return scores, (samples, labels)


def on_toy(cfg: GenTrainConfig) -> bool:
    """Trains on the toy latents (with class labels or captions), whose true distribution is known."""
    return cfg.data.source in ("toy", "toy_captions")


def evaluates_during_training(cfg: GenTrainConfig) -> bool:
    """run.eval_every > 0 with samples to draw and something to score them against: the toy's true
    distribution, or run.eval_ref for a latent cache (without it a cache run is not evaluated)."""
    run = cfg.run
    return run.eval_every > 0 and run.eval_samples > 0 and (on_toy(cfg) or bool(run.eval_ref))


class TrainingEval:
    """The in-training evaluation (run.eval_every): a fixed seeded sample set with the EMA weights, scored as
    the Frechet distance to the toy's true distribution, or as the FID of the images the FAE decodes from
    it against run.eval_ref. Each rank samples, decodes and extracts the features of its own share; rank 0
    scores them all. The Inception network and the reference statistics are loaded up front, so that a
    wrong path fails before training. Every rank gets the same number back."""

    def __init__(self, cfg: GenTrainConfig, d, decoder):
        from fae_fast.eval.fid import InceptionExtractor, load_reference

        self.cfg, self.d, self.decoder = cfg, d, decoder
        self.name = "frechet" if on_toy(cfg) else "fid"
        self.extractor = InceptionExtractor(d.device) if self.name == "fid" else None
        self.reference = load_reference(cfg.run.eval_ref, self.extractor) if self.name == "fid" and d.is_main else None

    def __call__(self, model, ema) -> dict[str, float]:
        from fae_fast.eval.fid import Features, extract_features, score

        with ema.applied():
            if self.name == "frechet":
                return {"frechet": toy_frechet(model, self.cfg, self.d)[0]["overall"]}
            labels = torch.arange(self.cfg.run.eval_samples) % self.cfg.model.num_classes
            mine, _ = sample_local(model, self.cfg, labels, self.d, seed=self.cfg.run.seed + 4321)
        images = (self.decoder(part).cpu().numpy() for part in mine.split(64))  # uint8 (B, S, S, 3)
        features = gather_cat(extract_features(images, self.extractor).features)  # (N, 2048), all ranks'
        value = [score(Features(features, None), self.reference, isc=False, prc=False)["fid"] if self.d.is_main else 0.0]
        dist.broadcast_object_list(value, src=0)
        return {"fid": value[0]}


def save_toy_projection(cfg: GenTrainConfig, path: Path, before, after) -> None:
    """toy_projection.png: generated and true latents of every class in 2-D, before and after training."""
    toy = toy_of(cfg)
    labels = torch.arange(cfg.run.eval_samples) % cfg.model.num_classes
    true = (toy.sample(labels, torch.Generator().manual_seed(7)), labels)
    plot_toy_projection(path, true, {"before training": before, "after training": after}, toy.means)


@torch.no_grad()
def toy_bits_per_dim(model, cfg: GenTrainConfig, d) -> float | None:
    """For a family with an exact likelihood: the mean NLL of fixed true toy latents (every class alike), in
    bits per dimension, averaged over ranks; None for the other families."""
    bits_per_dim = family_of(cfg.model).bits_per_dim
    if bits_per_dim is None:
        return None
    toy = toy_of(cfg)
    labels = (torch.arange(cfg.run.eval_samples) % cfg.model.num_classes)[d.rank::d.world]
    x = toy.sample(labels, torch.Generator().manual_seed(5 + d.rank)).to(d.device)
    with autocast(cfg, d, use_fsdp(cfg, d)):
        value = bits_per_dim(model, x, labels.to(d.device)).float().mean()
    return mean_over_ranks(value).item()


def caption_steering(cfg: GenTrainConfig, samples: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Of the samples drawn for each class's captions, the fraction nearest (Euclidean) that class's toy mean,
    per class and overall."""
    toy = toy_of(cfg)
    nearest = torch.cdist(samples.flatten(1).float(), toy.means.flatten(1).float()).argmin(dim=1)
    hits = (nearest == labels).float()
    out = {f"class {k}": hits[labels == k].mean().item() for k in range(toy.num_classes)}
    out["overall"] = hits.mean().item()
    return out


def toy_floor(cfg: GenTrainConfig) -> float:
    """Overall Frechet distance of true toy samples of the same count: the estimator's own floor."""
    toy = toy_of(cfg)
    labels = torch.arange(cfg.run.eval_samples) % cfg.model.num_classes
    x = toy.sample(labels, torch.Generator().manual_seed(99)).flatten(1)
    return toy.mixture_reference().frechet_distance(x)


def grid_decoder(cfg: GenTrainConfig, d):
    """The LatentDecoder of cfg.fae_decoder on rank 0 (on every rank when FID is scored during training;
    bf16 on CUDA), or None: grids then show latents.
    Built at the start, so that a wrong file fails before training, not at the first grid."""
    if not cfg.fae_decoder:
        return None
    if cfg.data.source != "cache":
        raise ValueError(f"fae_decoder is set but data.source={cfg.data.source!r}: only latents of a latent cache "
                         f"(data.source=cache) decode to images; pass --fae_decoder= (empty) or train on a cache")
    if not d.is_main and not evaluates_during_training(cfg):  # grids: rank 0; FID: every rank decodes its share
        return None
    dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
    return LatentDecoder(cfg.fae_decoder, str(Path(cfg.data.path) / "stats.json"), grid=cfg.model.grid,
                         channels=cfg.model.in_channels, device=d.device, dtype=dtype, impl=cfg.run.impl)


def save_sample_grid(model, cfg: GenTrainConfig, d, path: Path, decoder=None) -> None:
    """A grid of samples (8 classes x 8 seeds): decoded to images by `decoder` (grid_decoder), else the
    latent channels shown as colour."""
    classes = min(8, cfg.model.num_classes)
    labels = torch.arange(classes).repeat_interleave(8)
    samples, _ = sample_share(model, cfg, labels, d, seed=cfg.run.seed + 777)
    if not d.is_main:
        return
    if decoder is None:
        save_grid(latents_to_images(samples, cfg.model.grid), path, nrow=8)
    else:
        images = torch.cat([decoder(part) for part in samples.split(16)])  # (N, S, S, 3) uint8
        save_grid(images.permute(0, 3, 1, 2).float() / 255, path, nrow=8)


def use_fsdp(cfg: GenTrainConfig, d) -> bool:
    if cfg.run.fsdp not in ("auto", "on", "off"):
        raise ValueError(f"run.fsdp={cfg.run.fsdp!r} is not 'auto', 'on' or 'off'")
    if cfg.run.fsdp == "off" and d.world > 1:
        raise ValueError(f"run.fsdp=off needs one rank, but {d.world} were started; use run.fsdp=auto")
    return cfg.run.fsdp == "on" or (cfg.run.fsdp == "auto" and d.world > 1)


def uses_cuda_graph(cfg: GenTrainConfig, d) -> bool:
    """Whether the training step is captured as one CUDA graph (run.cuda_graph): 'on' needs one CUDA rank
    without FSDP2 and without activation checkpointing (its recomputation has not been tried inside a
    capture); 'auto' is on exactly there."""
    choice = cfg.run.cuda_graph
    if d.device.type != "cuda":
        obstacle = "no CUDA device"
    elif use_fsdp(cfg, d):
        obstacle = "FSDP2 (several ranks or run.fsdp=on)"
    elif cfg.run.activation_checkpointing:
        obstacle = "run.activation_checkpointing=true"
    else:
        obstacle = ""
    if choice == "on" and obstacle:
        raise ValueError(f"run.cuda_graph=on captures a one-GPU step, and this run has {obstacle}; use "
                         f"run.cuda_graph=auto or off")
    return choice != "off" and not obstacle


def autocast(cfg: GenTrainConfig, d, sharded: bool, cache: bool = True):
    """bf16 autocast where FSDP2's mixed-precision policy does not already give bf16 compute. cache=False for
    a captured step (a cached weight cast would be freed outside the graph)."""
    enabled = cfg.run.precision in ("bf16", "fp8") and not sharded
    return torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=cache)


def build(cfg: GenTrainConfig, d, graphed: bool):
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank before sharding
    with d.device:
        model = family_of(cfg.model).build(cfg.model, impl=cfg.run.impl)
    if cfg.run.precision == "fp8":
        use_fp8(model, d.device, weight_gradient=cfg.run.fp8_weight_gradient,
                bf16_end_blocks=cfg.run.fp8_bf16_end_blocks)
        if not graphed and not use_fsdp(cfg, d):  # under FSDP2 no step is captured
            print0("note: run.precision=fp8 without run.cuda_graph trains slower than bf16 (0.65x on an H200: the "
                   "FP8 step waits on the host; README, 'FP8'); add --run.cuda_graph=auto")
    if cfg.run.precision == "fp8" and cfg.run.fp8_all_gather and use_fsdp(cfg, d):
        wrapped = wrap_for_fp8_all_gather(model, d.world)
        print0(f"FSDP2 all-gathers {len(wrapped)} FP8 linears' weights in FP8 (run.fp8_all_gather)")
    only_backend(cfg.run.attention)
    family_of(cfg.model).choose_attention(cfg.model, cfg.data.global_batch // d.world,  # this rank's shape
                                          torch.float32 if cfg.run.precision == "fp32" else torch.bfloat16, d.device)
    parallelize(model, model.blocks, precision=cfg.run.precision, compile=cfg.run.compile,
                activation_checkpointing=cfg.run.activation_checkpointing, shard=use_fsdp(cfg, d))
    return model, make_adamw(model.parameters(), cfg.optim, d.device)


def main(argv: list[str]) -> dict:
    cfg = parse_args(argv)
    d = init_distributed()
    out = Path(cfg.run.out_dir)
    graphed = uses_cuda_graph(cfg, d)  # run.cuda_graph=on where it cannot be fails here, before any work
    source = make_source(cfg.data, cfg.model, rank=d.rank, world=d.world, device=d.device)  # checks the data first
    model, optimizer = build(cfg, d, graphed)
    decoder = grid_decoder(cfg, d)
    ema = EMA(model, cfg.optim.ema_decay)
    is_toy = on_toy(cfg) and cfg.run.eval_samples > 0
    n_params = sum(p.numel() for p in model.parameters())
    print0(f"generator {n_params / 1e6:.2f}M parameters, {d.world} rank(s) on {d.device.type}, "
           f"global batch {cfg.data.global_batch}, {cfg.run.steps} steps -> {out}")
    before, before_samples = toy_frechet(model, cfg, d) if is_toy else (None, None)
    bits_before = toy_bits_per_dim(model, cfg, d) if is_toy else None

    ckpts = CheckpointManager(out / "checkpoints")
    state = {"train": ModelAndOptimizer(model, optimizer), "ema": ema, "data": source,
             "progress": {"step": 0}}
    cfg.data.skip = merge_ranges(cfg.data.skip)
    start = 0
    if (latest := ckpts.latest_intact()) is not None:
        start = load_checkpoint(latest, state, cfg)
        print0(f"resumed from {latest} at step {start}")

    task = GeneratorTraining(model, optimizer, ema, source, cfg, d, ckpts, state, decoder, graphed)
    settings = LoopSettings(run=cfg.run, global_batch=cfg.data.global_batch, lr=cfg.optim.lr,
                            record=lambda: run_record(cfg))
    history = train_loop(task, settings, d, ckpts, state, start, latest)

    with ema.applied():
        after, after_samples = toy_frechet(model, cfg, d) if is_toy else (None, None)
        bits_after = toy_bits_per_dim(model, cfg, d) if is_toy else None
        save_sample_grid(model, cfg, d, out / "samples_final.png", decoder)
    export_weights(model, ema.state_dict(), out / "ema.safetensors")
    if d.is_main:
        plot_curves(history, str(out / "loss.png"), f"train_gen: {family_of(cfg.model).name}, "
                                                    f"{n_params / 1e6:.2f}M parameters")
        pictures = ["samples_final.png"]
        if is_toy:
            save_toy_projection(cfg, out / "toy_projection.png", before_samples, after_samples)
            pictures.append("toy_projection.png")
        print0(f"wrote {out / 'ema.safetensors'}, {out / 'loss.png'} and " + ", ".join(str(out / p) for p in pictures))
    if before is not None:
        floor = toy_floor(cfg)
        report_toy(before, after, floor)
        scores = {"before": before, "after": after, "floor": floor}
        if bits_before is not None:
            print0(f"NLL of true toy latents: {bits_before:.3f} -> {bits_after:.3f} bits per dimension")
            scores["bits_per_dim"] = {"before": bits_before, "after": bits_after}
        if cfg.data.source == "toy_captions":
            scores["caption_steering"] = caption_steering(cfg, *after_samples)
            per_class = ", ".join(f"{v:.0%}" for k, v in scores["caption_steering"].items() if k != "overall")
            print0(f"captions steer: {scores['caption_steering']['overall']:.1%} of the samples drawn for a caption "
                   f"land nearest its class's mean (per class: {per_class})")
        if d.is_main:
            (out / "frechet.json").write_text(json.dumps(scores))
    return {"before": before, "after": after, "history": history,
            "bits_per_dim": None if bits_before is None else (bits_before, bits_after)}


def report_toy(before: dict, after: dict, floor: float) -> None:
    print0("Frechet distance to the true distribution (lower is better)")
    print0(f"  {'':10s} {'before':>10s} {'after':>10s}")
    for key in before:
        print0(f"  {key:10s} {before[key]:10.3f} {after[key]:10.3f}")
    print0(f"  true samples of the same count score {floor:.3f} overall (the estimator's floor); "
           f"training reduced the overall distance {before['overall'] / max(after['overall'], 1e-12):.1f}x")


def load_checkpoint(path: Path, state: dict, cfg: GenTrainConfig) -> int:
    """Load a checkpoint into `state`; the data batches it skipped (its config's data.skip) join cfg.data.skip.
    Returns its step."""
    CheckpointManager.load(path, state, run_record(cfg))
    saved = json.loads((path / "config.json").read_text()).get("data", {}).get("skip", [])
    cfg.data.skip = merge_ranges([*saved, *cfg.data.skip])
    return int(state["progress"]["step"])


def roll_back(spike: Spike, cfg: GenTrainConfig, ckpts: CheckpointManager, state: dict,
              rollbacks: list[int]) -> tuple[Path, int]:
    """After a loss spike: load the newest intact checkpoint from before it, skip the spike's batches from
    there on (data.skip), and return that checkpoint and the step to continue from. Too many rollbacks, or no
    checkpoint before the spike, stop the run naming the steps, losses and checkpoint."""
    run = cfg.run
    shown = ", ".join(f"{v:.4g}" for v in spike.losses)
    what = (f"loss spike at steps {spike.first_step}-{spike.last_step} (losses {shown} against a median of "
            f"{spike.median:.4g}, factor {run.spike_factor:g})")
    target = ckpts.latest_intact(upto_step=spike.first_step)
    if target is None:
        raise FloatingPointError(f"{what}; no checkpoint was written before it to roll back to: lower --optim.lr "
                                 f"(now {cfg.optim.lr:g}) and start again, or --run.spike_factor=0 to train through it")
    rollbacks.append(spike.first_step)
    recent = [s for s in rollbacks if s > spike.first_step - 10 * max(run.ckpt_every, 1)]
    if len(recent) > run.spike_max_rollbacks:
        raise FloatingPointError(f"{what}: rollback {len(recent)} within {10 * run.ckpt_every} steps, more than "
                                 f"run.spike_max_rollbacks={run.spike_max_rollbacks} "
                                 f"(spikes at steps {recent}); stopped. {target} is the newest checkpoint before "
                                 f"them: lower --optim.lr (now {cfg.optim.lr:g}) and run the same command")
    resumed = step_of(target)
    first = data_index(max(resumed, spike.first_step - run.spike_patience), cfg.data.skip)
    last = data_index(spike.last_step, cfg.data.skip)
    load_checkpoint(target, state, cfg)
    cfg.data.skip = merge_ranges([*cfg.data.skip, (first, last)])
    print0(f"{what}; rolled back to {target} (step {resumed}) and skipping data batches {first}-{last} "
           f"(data.skip is now {cfg.data.skip})")
    return target, resumed


class GeneratorTraining:
    """train_gen's TrainingTask (fae_fast/train/loop.py): the family's loss on a batch of the latent source,
    AdamW with clipping, the EMA; evaluation, sample grids and rollback after a loss spike.

    With run.cuda_graph the step's random numbers are drawn as in an eager step (family.draw, from the
    step's seeded generator), loaded with the batch into a captured step's inputs, and the step replayed:
    fae_fast/train/cuda_graph.py. The EMA update stays outside the graph."""

    def __init__(self, model, optimizer, ema, source, cfg: GenTrainConfig, d, ckpts, state, decoder=None,
                 graphed: bool = False):
        self.model, self.optimizer, self.ema, self.source, self.cfg, self.d = model, optimizer, ema, source, cfg, d
        self.ckpts, self.state, self.decoder, self.rollbacks = ckpts, state, decoder, []
        self.sharded = use_fsdp(cfg, d)
        self.family = family_of(cfg.model)
        self.loss_floor = self.family.loss_floor(cfg.model)
        self.evaluation = TrainingEval(cfg, d, decoder) if evaluates_during_training(cfg) else None
        self.graphed = graphed  # uses_cuda_graph(cfg, d), decided once by main
        self.captured: GraphedStep | None = None
        self.inputs: StaticInputs | None = None

    def batch(self, step: int):
        return self.source.batch(data_index(step, self.cfg.data.skip))

    def train_step(self, step: int, batch) -> dict[str, torch.Tensor]:
        cfg, (x1, y) = self.cfg, batch
        gen = step_generator(cfg.run.seed, step, self.d.rank, "noise", self.d.device)
        # capturable with a device-held rate before the first capture, and again after a checkpoint load
        # restored the saved groups (then capture anew)
        if self.graphed and make_capturable(self.optimizer, self.d.device):
            self.captured = self.inputs = None
        set_lr(self.optimizer, cfg.optim, step, cfg.run.steps)
        if self.graphed:
            loss = self.replay(x1, y, self.family.draw(self.model, x1, y, cfg.transport, gen))
        else:
            with autocast(cfg, self.d, self.sharded):
                loss = self.family.loss(self.model, x1, y, cfg.transport, gen).mean()
            self.backward_and_update(loss)
        self.ema.update()
        return {"loss": loss}

    def backward_and_update(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step_on_inputs(self) -> torch.Tensor:
        """The step that is captured: it reads the batch and its random numbers from self.inputs."""
        inputs = dict(self.inputs.tensors)
        x1, y = inputs.pop("latents"), inputs.pop("condition")
        with autocast(self.cfg, self.d, self.sharded, cache=False):
            loss = self.family.loss_of_draws(self.model, x1, y, inputs, self.cfg.transport).mean()
        self.backward_and_update(loss)
        return loss

    def replay(self, x1: torch.Tensor, condition: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        """One step through the captured graph (eager for its first GraphedStep.warmup calls); the loss, copied
        out of the graph."""
        if self.captured is None:
            self.inputs = StaticInputs(latents=x1, condition=condition, **draws)
            self.captured = GraphedStep(self.step_on_inputs, self.optimizer)
        else:
            self.inputs.load(latents=x1, condition=condition, **draws)
        return self.captured().clone()  # the next replay overwrites the graph's own loss tensor

    def flops_per_image(self, step: int) -> float:
        return 3 * self.family.flops_per_sample(self.cfg.model)

    def evaluate(self, done: int) -> dict | None:
        return None if self.evaluation is None else self.evaluation(self.model, self.ema)

    def save_samples(self, done: int) -> None:
        with self.ema.applied():
            save_sample_grid(self.model, self.cfg, self.d, Path(self.cfg.run.out_dir) / f"samples_{done:08d}.png",
                             self.decoder)

    def roll_back(self, spike: Spike) -> tuple[Path, int]:
        self.captured = self.inputs = None  # the load replaces the optimizer's state tensors: capture anew
        return roll_back(spike, self.cfg, self.ckpts, self.state, self.rollbacks)


if __name__ == "__main__":
    run_program(main)
    finish_distributed()
