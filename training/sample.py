"""Draw an evaluation set from a trained generator on every GPU, decode it to images, write ADM's .npz.

    torchrun --standalone --nproc_per_node=8 training/sample.py --recipe=paper-cfg \\
        --ckpt=runs/gen/ema.safetensors --fae=runs/fae/fae.safetensors --stats=/data/latents/stats.json \\
        --num_samples=50000 --out_dir=runs/samples-cfg
    python training/evaluate.py --samples=runs/samples-cfg/samples_50000x256x256x3.npz \\
        --ref=VIRTUAL_imagenet256_labeled.npz

Sample i's label, noise and SDE increments are functions of (seed, i) alone (fae_fast/eval/protocol.py),
so the set does not depend on the batch size, the number of GPUs or where a run was interrupted. Work
is cut into chunks named by their index range and written atomically; the same command after a crash
draws only the ranges missing on disk. At the end rank 0 checks that every index is there exactly once
and streams the chunks into one ADM-format .npz (arr_0 images, arr_1 labels).

Without --fae the program writes latents (latents_<N>xTxC.npz), not images: the FID protocol needs
images, so pass the FAE decoders and the latent cache's statistics for that.

A text-to-image generator is evaluated zero-shot on MS-COCO (FID-30K, fae_fast/eval/coco.py): 30,000 val2014
images drawn without replacement by --coco.seed, one of each image's captions, one sample per caption. Sample
i is conditioned on caption i, embedded by the frozen SigLIP 2 text tower the generator was trained with
(--text_tower) and guided against the null caption; its noise is a function of (--seed, i) as above. The
.npz's arr_1 holds the COCO image ids, and prompts.json beside it lists the index, image id, file and caption
of every sample, which evaluate.py reads to score against those same 30,000 images:

    torchrun --standalone --nproc_per_node=8 training/sample.py --ckpt=runs/t2i/ema.safetensors \\
        --fae=runs/fae/fae.safetensors --stats=/data/latents/stats.json --text_tower=/models/siglip2-so400m \\
        --coco.annotations=/data/coco/annotations/captions_val2014.json --coco.images=/data/coco/val2014 \\
        --out_dir=runs/samples-coco
    python training/evaluate.py --samples=runs/samples-coco/samples_30000x256x256x3.npz
"""
import dataclasses
import datetime
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path


import numpy as np
import torch
import torch.distributed as dist

from fae_fast.cli import UsageError, parse_command_line, run_program
from fae_fast.conditioning import TextEmbeddings
from fae_fast.config import GeneratorConfig, SamplerConfig
from fae_fast.eval.coco import (PROMPT_LIST, CocoConditions, CocoConfig, CocoPrompt, coco_prompts, prompt_set_digest,
                                write_prompt_list)
from fae_fast.eval.npz import (check_coverage, list_chunks, npz_array_shape, pending_ranges,
                               remove_partial_chunks, write_adm_npz, write_chunk)
from fae_fast.eval.protocol import GRID_INDEX_OFFSET, STREAM_SDE, index_normal
from fae_fast.families import family_of
from fae_fast.fp8 import use_fp8_sampling
from fae_fast.generators import Generator
from fae_fast.inference import LatentDecoder, load_generator
from fae_fast.sampling import ClassConditions
from fae_fast.text import DEFAULT_TEXT_TOWER, FrozenTextEncoder
from fae_fast.viz import latents_to_images, save_grid
from fae_fast.train.runtime import finish_distributed, init_distributed, print0

# DiT's sample classes: macaw, valley, golden retriever, otter, lesser panda, geyser, balloon, arctic fox
GRID_CLASSES = [88, 979, 207, 360, 387, 974, 417, 279]
ADM_SAMPLES = 50_000


@dataclass(kw_only=True)
class SampleConfig:
    """Everything sample.py needs; `--recipe NAME` (or `--preset NAME`) picks the sampler, `--field=value`
    changes one field."""

    ckpt: str = ""
    """Generator weights: the ema.safetensors of a train_gen run, or a DCP checkpoint folder (its EMA)."""
    model_config: str = ""
    """A train_gen config.json for the generator; default: beside ckpt, else the run's latest checkpoint."""
    published: str = ""
    """'sit' or 'lightningdit': --ckpt is a file of the public SiT / LightningDiT code (train.py dict, EMA state
    dict, .pt or .safetensors); its options are read off the file and time and RoPE are converted
    (fae_fast.adapters). Pair with --sampler.guide_channels=3 for their guidance protocol."""
    fae: str = ""
    """safetensors holding `feature_decoder.*` and `pixel_decoder.*` weights; empty writes latents only."""
    fae_size: str = "FAE-DINOv2-g"
    """FAE size in the registry, used when neither fae_config nor a fae_config.json beside --fae exists."""
    fae_config: str = ""
    """A JSON file with the FAEConfig fields (top level or under 'fae' or 'model'); by default the
    fae_config.json that train_fae.py writes beside fae.safetensors."""
    stats: str = ""
    """Per-channel 'mean' and 'std' of the latent cache (JSON or safetensors): z = z_norm * std + mean;
    'identity' when the generator was trained on unnormalised latents."""
    num_samples: int = ADM_SAMPLES
    """Images in the set (ADM protocol: 50k); a COCO set has coco.count, one per caption."""
    labels: str = "balanced"
    """Class-conditional models: 'balanced' (label i mod K: 50 per class for 50k) or 'random' (uniform, from
    (seed, i))."""
    seed: int = 0
    """Seed of every label and noise draw."""
    batch: int = 256
    """Samples per forward on each GPU (CFG doubles the forward batch); also the chunk size."""
    out_dir: str = "runs/samples"
    """Folder for chunks, the final .npz, the grid and manifest.json."""
    png: bool = False
    """Also write every image as png/<index>.png."""
    keep_chunks: bool = False
    """Keep the chunk files after the final .npz is written (they double the disk use)."""
    grid_classes: list[int] = field(default_factory=lambda: list(GRID_CLASSES))
    """Classes (rows) of grid.png; a text-to-image model draws the first that many captions of the COCO set
    instead; empty skips the grid."""
    grid_seeds: int = 4
    """Samples per class (columns) of grid.png."""
    compile: bool = True
    """torch.compile the generator forward (CUDA only)."""
    cuda_graphs: bool = False
    """Compile with mode='reduce-overhead' (CUDA graphs): less launch overhead, more memory. Heun keeps
    two outputs alive, which a graph replay overwrites in fp32: use it with bf16."""
    precision: str = "bf16"
    """'bf16' (bf16 weights and matmuls, as the training forward; CUDA only), 'fp32', or 'fp8': bf16 weights with
    the blocks' attention and MLP GEMMs in FP8 (weights quantised once, inputs rowwise per forward;
    fae_fast.fp8.use_fp8_sampling; GPUs with FP8 tensor cores). fp8 changes the samples: measure its FID
    against a bf16 set before relying on it."""
    impl: str = "auto"
    """'auto', 'triton' or 'torch' for the fused layers."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """Sampler (method, steps, time shift, CFG intervals), usually from a preset."""
    text_tower: str = DEFAULT_TEXT_TOWER
    """Text-to-image models: the frozen SigLIP 2 text tower the generator was trained with, a save_pretrained
    folder or a hub id in the hub cache (fae_fast.text.FrozenTextEncoder)."""
    coco: CocoConfig = field(default_factory=CocoConfig)
    """Text-to-image models: the zero-shot COCO prompt set, one sample per caption (fae_fast/eval/coco.py)."""


# The paper (Section 4) samples with time shift 0.4 and 250 steps: SDE without guidance, Euler ODE with
# guidance on the low-noise part of the path. Its per-interval scales are not all published; the one
# ablated setting is a single scale on the low-noise 70% (t in [0.3, 1), t = 1 data). 1.5 is a
# starting point (SiT/DiT's usual all-path value); guidance on an interval often wants more: sweep
# --sampler.cfg='[(0.3, 1.0, s)]' on 10k samples before a 50k run.
PRESETS = {
    "paper-no-cfg": lambda: SamplerConfig(method="euler_maruyama", steps=250, time_shift=0.4, cfg=[]),
    "paper-cfg": lambda: SamplerConfig(method="euler", steps=250, time_shift=0.4, cfg=[(0.3, 1.0, 1.5)]),
}
PRESET_DOCS = {
    "paper-no-cfg": "SDE (Euler-Maruyama), 250 steps, time shift 0.4, no guidance (the paper's no-CFG numbers)",
    "paper-cfg": "Euler ODE, 250 steps, time shift 0.4, guidance 1.5 on t in [0.3, 1) (120 of the steps)",
}


SAMPLE_PRECISIONS = ("bf16", "fp32", "fp8")


def parse_args(argv: list[str]) -> SampleConfig:
    """`--recipe NAME` (default paper-cfg; `--preset` is the same option), then `--field=value` /
    `--sampler.field=value` overrides."""
    argv = ["--recipe" + a[len("--preset"):] if a.startswith("--preset") else a for a in argv]
    cfg = parse_command_line(argv, prog="sample.py", summary=__doc__.split("\n")[0],
                             choices={"recipe": ("paper-cfg", PRESET_DOCS)},
                             build=lambda picked: SampleConfig(sampler=PRESETS[picked["recipe"]]()))
    if cfg.precision not in SAMPLE_PRECISIONS:
        raise UsageError(f"--precision={cfg.precision!r} is not one of {', '.join(SAMPLE_PRECISIONS)}")
    if cfg.coco.wanted:  # one sample per caption: the set's size is the prompt set's
        if cfg.num_samples not in (ADM_SAMPLES, cfg.coco.count):
            raise UsageError(f"--num_samples={cfg.num_samples} and --coco.count={cfg.coco.count} disagree; a COCO "
                             f"set has one sample per caption: set its size with --coco.count")
        cfg.num_samples = cfg.coco.count
    return cfg


# ----------------------------------------------------------------------------------------------------
# Loading (the library's fae_fast.inference, with this program's options)
# ----------------------------------------------------------------------------------------------------
def load_generator_of(cfg: SampleConfig, device: torch.device, dtype: torch.dtype) -> Generator:
    return load_generator(cfg.ckpt, device, dtype, impl=cfg.impl, model_config=cfg.model_config,
                          published=cfg.published)


def decoder_of(cfg: SampleConfig, gcfg: GeneratorConfig, device: torch.device, dtype: torch.dtype) -> LatentDecoder:
    return LatentDecoder(cfg.fae, cfg.stats, grid=gcfg.grid, channels=gcfg.in_channels, device=device, dtype=dtype,
                         impl=cfg.impl, fae_config_file=cfg.fae_config, fae_size=cfg.fae_size)


Conditions = ClassConditions | CocoConditions
"""Sample index -> (condition, the label the set records); `grid_rows` gives grid.png's rows."""


def prompts_of(cfg: SampleConfig) -> list[CocoPrompt] | None:
    """The COCO prompt set the options name (files checked), or None without --coco options."""
    if not cfg.coco.wanted:
        return None
    return coco_prompts(cfg.coco.annotations, cfg.coco.images, count=cfg.coco.count, seed=cfg.coco.seed)


def conditions_of(model: Generator, cfg: SampleConfig, prompts: list[CocoPrompt] | None,
                  device: torch.device) -> Conditions:
    """What each sample index is conditioned on: its class label (class-conditional models) or its COCO caption
    embedded by the frozen text tower (text-to-image models); options that do not fit the model are an error."""
    if not isinstance(model.conditioning, TextEmbeddings):
        if prompts is not None:
            raise ValueError(f"{cfg.ckpt} is a class-conditional generator; the --coco options are for text-to-image "
                             f"generators: drop them, or pass a text-to-image checkpoint")
        return ClassConditions(model.conditioning, cfg.seed, cfg.labels)
    if prompts is None:
        raise ValueError(f"{cfg.ckpt} is a text-to-image generator: it draws one sample per COCO caption, not "
                         f"per class label; pass --coco.annotations=.../captions_val2014.json and "
                         f"--coco.images=.../val2014")
    if cfg.labels != "balanced":
        raise ValueError(f"--labels={cfg.labels} picks class labels, but {cfg.ckpt} is a text-to-image generator "
                         f"conditioned on captions; drop --labels")
    encoder = FrozenTextEncoder.load(cfg.text_tower, max_length=model.cfg.text_length, device=device)
    return CocoConditions(prompts, encoder, model.cfg.text_dim)


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------
def sample_batch(model: Generator, indices: torch.Tensor, cfg: SampleConfig,
                 conditions: Conditions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (B, T, C) fp32 and recorded labels (B,) of samples `indices` (B,), on the model's device;
    `conditions` default to the protocol's (seed, index) class labels."""
    gcfg, device = model.cfg, next(model.parameters()).device
    indices = indices.to(device)
    if conditions is None:
        conditions = ClassConditions(model.conditioning, cfg.seed, cfg.labels)
    condition, labels = (t.to(device) for t in conditions(indices))
    noise = index_normal(cfg.seed, indices, (gcfg.grid ** 2, gcfg.in_channels))

    def step_noise(k):  # each sample's SDE increments from its own index: independent of batch and GPU
        return index_normal(cfg.seed, indices, noise.shape[1:], stream=STREAM_SDE + k)

    return family_of(gcfg).sample(model, condition, noise, cfg.sampler, step_noise=step_noise), labels


def sample_padded(model: Generator, start: int, end: int, cfg: SampleConfig,
                  conditions: Conditions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_batch for indices start..end-1, padded to cfg.batch rows so that a compiled model or a
    CUDA graph sees one shape; the padding rows are dropped."""
    n = end - start
    indices = torch.arange(start, start + max(n, cfg.batch)).clamp(max=end - 1)
    z, y = sample_batch(model, indices, cfg, conditions)
    return z[:n], y[:n]


def prepare_for_speed(model: Generator, cfg: SampleConfig, device: torch.device, dtype: torch.dtype) -> None:
    """On CUDA: measure the attention backend for the B and 2B (CFG) shapes, then compile the forward
    (in place, so the traced graph uses the measured backends and the model keeps its attributes)."""
    if device.type != "cuda":
        return
    for rows in (cfg.batch, 2 * cfg.batch):
        family_of(model.cfg).choose_attention(model.cfg, rows, dtype, device)
    if cfg.compile:
        model.compile(mode="reduce-overhead" if cfg.cuda_graphs else None, dynamic=False)


def seconds_per_call(fn, device: torch.device, repeats: int = 3, warmup: int = 2) -> float:
    """Mean seconds of fn() over `repeats` calls after `warmup` calls (compilation happens there)."""
    def run(n):
        for _ in range(n):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run(warmup)
    start = time.perf_counter()
    run(repeats)
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def estimate_seconds_per_batch(model: Generator, decoder: LatentDecoder | None, cfg: SampleConfig,
                               device: torch.device, conditions: Conditions) -> float:
    """Time of one batch of cfg.batch samples, plus one timed decode: for a family sampled by integrating
    its forward, timed forwards of B and 2B rows times its evaluation plan; for another, one timed batch."""
    g, seconds = model.cfg, 0.0
    plan = family_of(g).evaluation_plan
    if plan is None:
        def members(indices):  # the grid's noise indices, any set member's condition
            return conditions(indices % cfg.num_samples)

        indices = GRID_INDEX_OFFSET + torch.arange(cfg.batch)
        seconds += seconds_per_call(lambda: sample_batch(model, indices, cfg, members), device, repeats=1, warmup=0)
    for rows, count in zip((cfg.batch, 2 * cfg.batch), plan(cfg.sampler) if plan else (0, 0)):
        if count:
            x, t = torch.randn(rows, g.grid ** 2, g.in_channels, device=device), torch.rand(rows, device=device)
            y = conditions(torch.arange(rows, device=device) % cfg.num_samples)[0].to(device)
            seconds += count * seconds_per_call(lambda: model(x, t, y), device)
    if decoder is not None:
        z = torch.randn(cfg.batch, g.grid ** 2, g.in_channels, device=device)
        seconds += seconds_per_call(lambda: decoder(z), device, repeats=1)
    return seconds


# ----------------------------------------------------------------------------------------------------
# The run: manifest, grid, chunks, final file
# ----------------------------------------------------------------------------------------------------
def manifest(cfg: SampleConfig, dtype: torch.dtype, prompts: list[CocoPrompt] | None = None) -> dict:
    """The settings that determine the samples; a resumed run must have the same ones. A COCO set adds its
    prompt set (by content: fae_fast.eval.coco.prompt_set_digest) and the text tower."""
    keys = ("ckpt", "fae", "fae_size", "fae_config", "stats", "num_samples", "labels", "seed")
    out = {k: getattr(cfg, k) for k in keys}
    out.update(ckpt=str(Path(cfg.ckpt).resolve()), sampler=dataclasses.asdict(cfg.sampler), dtype=str(dtype))
    if cfg.precision == "fp8":  # a set is all bf16 or all FP8 draws; older manifests (no fp8) still match bf16
        out["dtype"] += " with FP8 block GEMMs"
    if prompts is not None:
        tower = Path(cfg.text_tower)
        out.update(prompt_set=prompt_set_digest(prompts),
                   text_tower=str(tower.resolve()) if tower.exists() else cfg.text_tower)
    return json.loads(json.dumps(out))  # tuples as lists, as they read back


def check_manifest(out: Path, wanted: dict, is_main: bool) -> None:
    """Every rank compares with the manifest on disk; rank 0 writes it when there is none."""
    path = out / "manifest.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if diff := [k for k in wanted if saved.get(k) != wanted[k]]:
            k = diff[0]
            raise ValueError(f"{out} holds samples drawn with {k}={saved.get(k)!r}, but this run has "
                             f"{k}={wanted[k]!r}; run with the same settings to resume, or pass another --out_dir")
    elif is_main:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".manifest.json.tmp"
        tmp.write_text(json.dumps(wanted, indent=1))
        tmp.replace(path)


def final_path(out: Path, cfg: SampleConfig, gcfg: GeneratorConfig, decoder: LatentDecoder | None) -> Path:
    if decoder is None:
        return out / f"latents_{cfg.num_samples}x{gcfg.grid ** 2}x{gcfg.in_channels}.npz"
    size = decoder.parts[1].cfg.image_size
    return out / f"samples_{cfg.num_samples}x{size}x{size}x3.npz"


def save_sample_grid(model: Generator, decoder: LatentDecoder | None, cfg: SampleConfig, path: Path,
                     conditions: Conditions) -> None:
    """grid.png: one row per class of cfg.grid_classes (or per caption of the first that many of a COCO set),
    cfg.grid_seeds samples each (own noise indices)."""
    condition, labels = (t.repeat_interleave(cfg.grid_seeds, dim=0) for t in conditions.grid_rows(cfg.grid_classes))

    def rows(indices):  # the grid's own noise indices, its rows' conditions
        return condition, labels

    z, _ = sample_batch(model, GRID_INDEX_OFFSET + torch.arange(len(labels)), cfg, rows)
    if decoder is None:
        images = latents_to_images(z.cpu(), model.cfg.grid)
    else:
        images = decoder(z).permute(0, 3, 1, 2).float().cpu() / 255
    save_grid(images, path, nrow=cfg.grid_seeds)


def write_pngs(folder: Path, start: int, images: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{start + i:06d}.png")


def images_on_disk(chunks: Path) -> int:
    return sum(end - start for start, end, _ in list_chunks(chunks))


def progress_line(done: int, total: int, started: int, elapsed: float) -> str:
    rate = (done - started) / max(elapsed, 1e-9)
    eta = datetime.timedelta(seconds=int((total - done) / max(rate, 1e-9)))
    filled = int(20 * done / total)
    return f"[{'#' * filled}{'.' * (20 - filled)}] {done:,}/{total:,} images | {rate:,.1f} img/s | ETA {eta}"


def draw_chunks(model, decoder, cfg: SampleConfig, ranges, out: Path, d, started: int,
                conditions: Conditions) -> None:
    """Sample, decode and write this rank's chunks; rank 0 prints a progress line after each of its own."""
    t0 = time.perf_counter()
    for start, end in ranges:
        z, y = sample_padded(model, start, end, cfg, conditions)
        arrays = {"indices": np.arange(start, end), "labels": y.cpu().numpy()}
        if decoder is None:
            arrays["latents"] = z.float().cpu().numpy()
        else:
            arrays["images"] = decoder(z).cpu().numpy()
            if cfg.png:
                write_pngs(out / "png", start, arrays["images"])
        write_chunk(out / "chunks", start, end, **arrays)
        if d.is_main:
            print0(progress_line(images_on_disk(out / "chunks"), cfg.num_samples, started, time.perf_counter() - t0))


def finish(out: Path, cfg: SampleConfig, final: Path, has_images: bool) -> None:
    """Rank 0: check that every index is on disk exactly once, stream the chunks into the final .npz."""
    chunks = check_coverage(out / "chunks", cfg.num_samples)
    shape = write_adm_npz(final, chunks, key="images" if has_images else "latents")
    print0(f"checked {cfg.num_samples:,} samples (every index once) and wrote {final} {shape}")
    if not has_images:
        print0("no --fae given: these are latents, not images; the FID protocol needs images (pass --fae and --stats)")
    if not cfg.keep_chunks:
        for path in chunks:
            path.unlink()


def hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def pending_chunks(folder: Path, cfg: SampleConfig) -> list[tuple[int, int]]:
    """Rank 0: remove half-written chunks, then the index ranges no complete chunk covers."""
    remove_partial_chunks(folder)
    return pending_ranges([(s, e) for s, e, _ in list_chunks(folder)], cfg.num_samples, cfg.batch)


def draw_all(model, decoder, cfg: SampleConfig, todo: list[tuple[int, int]], out: Path, d,
             conditions: Conditions) -> None:
    """Estimate the time, write the grid (rank 0), draw this rank's share of `todo`, report the time."""
    started = cfg.num_samples - sum(e - s for s, e in todo)
    per_batch = estimate_seconds_per_batch(model, decoder, cfg, d.device, conditions)
    estimate = math.ceil(len(todo) / d.world) * per_batch
    family = family_of(model.cfg)
    if family.evaluation_plan is not None:
        plain, guided = family.evaluation_plan(cfg.sampler)
        how = f"{cfg.sampler.method}, {cfg.sampler.steps} steps: {guided} guided and {plain} plain evaluations per sample"
    else:
        how = f"{family.name} sampler"
    print0(f"{started:,} of {cfg.num_samples:,} samples on disk; {len(todo)} batches of <= {cfg.batch} to draw on "
           f"{d.world} rank(s) ({how}). Estimate: {hms(estimate)} ({cfg.batch / per_batch:.2f} img/s per GPU; "
           f"{hms(estimate * d.world)} on one GPU)")
    if d.is_main and cfg.grid_classes and not (out / "grid.png").exists():
        save_sample_grid(model, decoder, cfg, out / "grid.png", conditions)
        print0(f"wrote {out / 'grid.png'}")
    t0 = time.perf_counter()
    draw_chunks(model, decoder, cfg, todo[d.rank::d.world], out, d, started, conditions)
    dist.barrier()
    seconds, drawn = time.perf_counter() - t0, cfg.num_samples - started
    print0(f"measured: {drawn:,} samples in {hms(seconds)} on {d.world} rank(s) ({drawn / seconds:.2f} img/s, "
           f"{drawn / seconds / d.world:.2f} per GPU; estimate was {hms(estimate)})")


def main(argv: list[str]) -> Path:
    cfg = parse_args(argv)
    d = init_distributed()
    cuda = d.device.type == "cuda"
    dtype = torch.bfloat16 if cuda and cfg.precision in ("bf16", "fp8") else torch.float32
    out = Path(cfg.out_dir)
    prompts = prompts_of(cfg)
    model = load_generator_of(cfg, d.device, dtype)
    if cfg.precision == "fp8":
        use_fp8_sampling(model, d.device)
    conditions = conditions_of(model, cfg, prompts, d.device)  # before the manifest: options that do not fit
    check_manifest(out, manifest(cfg, dtype, prompts), d.is_main)
    if prompts is not None and d.is_main:
        write_prompt_list(out / PROMPT_LIST, prompts, cfg.coco)
    decoder = decoder_of(cfg, model.cfg, d.device, dtype) if cfg.fae else None
    final = final_path(out, cfg, model.cfg, decoder)
    if final.is_file():  # written atomically after the coverage check: complete unless it is another run's
        try:
            shape = npz_array_shape(final)
        except ValueError as err:  # npz_array_shape's one error for a damaged file; --debug shows its cause
            raise ValueError(f"{final} exists but is not a readable ADM .npz; move it away and run the same command "
                             f"again (kept chunks are reused, the rest is redrawn)") from err
        if shape[0] != cfg.num_samples:
            raise ValueError(f"{final} holds {shape[0]:,} samples, not the {cfg.num_samples:,} asked for; it belongs "
                             f"to another run: use a fresh --out_dir or pass --num_samples={shape[0]}")
        print0(f"{final} exists with {shape[0]:,} samples: this set is complete")
        return final
    prepare_for_speed(model, cfg, d.device, dtype)
    todo = [pending_chunks(out / "chunks", cfg) if d.is_main else None]
    dist.broadcast_object_list(todo, src=0)  # one listing, made before anyone writes, for every rank
    todo = todo[0]
    if todo:
        draw_all(model, decoder, cfg, todo, out, d, conditions)
    if d.is_main:
        finish(out, cfg, final, decoder is not None)
        if prompts is not None:
            print0(f"the caption and COCO image id of every sample: {out / PROMPT_LIST} (evaluate.py reads it)")
    return final


if __name__ == "__main__":
    run_program(main)
    finish_distributed()
