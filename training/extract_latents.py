"""Turn an image data set into the FAE latent cache that train_gen.py reads (format: fae_fast/data/latent_cache.py).

    torchrun --nproc_per_node=8 training/extract_latents.py --images /imagenet/train \\
        --fae runs/fae-dinov2-g-feature/ema.safetensors --encoder DINOv2-g/14 --out /latents/train
    # CPU smoke run with random weights (never implied: --random_weights must be said)
    python training/extract_latents.py --images /tmp/imgs/train --encoder tiny --random_weights --out /tmp/latents
    # a caption cache (text-to-image) from img2dataset's WebDataset shards, captions embedded by SigLIP 2
    torchrun --nproc_per_node=8 training/extract_latents.py --captions '/data/cc12m/{00000..01242}.tar' \\
        --text_tower google/siglip2-so400m-patch16-256 --fae ... --encoder DINOv2-g/14 --out /latents/cc12m

Each image's ADM centre crop (fae.image_size px) and its horizontal flip go through the frozen encoder
(bf16 on CUDA, no_grad, torch.compile) and the FAE encoder; the latent mean mu (no sampling) of both is
stored. Shard k (shard_size images) is made by rank k % world; a finished shard is skipped when the same
command runs again, a half-written one is redone. The run ends by checking that every image is present
exactly once, computing the per-channel stats and writing index.json. Run
`python -m fae_fast.data.check IMAGES --out problems.txt` first and pass --exclude_list problems.txt if
the folder may hold undecodable files: a file that cannot be decoded stops extraction, naming it.
With --captions, shard k holds pairs [k * shard_size, ...) of the caption shards (fae_fast/data/caption_shards.py)
and their captions' token embeddings beside the latents (fae_fast/data/caption_cache.py); a pair whose image
does not decode or whose caption is empty is reported and left out.
`--encoder.field=value` / `--fae_model.field=value` change single fields of the encoder and FAE configs;
`--help` lists every option (kebab-case spellings such as --shard-size work too).
"""
import datetime
import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Optional
from pathlib import Path


import numpy as np
import torch
import torch.distributed as dist

from fae_fast.cli import UsageError, parse_command_line, run_program
from fae_fast.config import (ENCODER_SIZES, FAE_SIZE_OF_ENCODER, FAE_SIZES, EncoderConfig, FAEConfig,
                             encoder_config, fae_config, validate_encoder)
from fae_fast.data import latent_cache as lc
from fae_fast.data.caption_cache import TextBatch, TextCacheWriter, caption_lengths
from fae_fast.data.caption_shards import CaptionBatch, CaptionShards
from fae_fast.data.images import ImageDataConfig, finish_batch, make_image_loader
from fae_fast.encoders import FrozenEncoder
from fae_fast.fae import FAEEncoder
from fae_fast.inference import fae_weights, frozen_encoder, load_fae_parts
from fae_fast.text import FrozenTextEncoder
from fae_fast.train.runtime import finish_distributed, init_distributed, print0


@dataclass(kw_only=True)
class Models:
    """The two models extraction runs."""

    encoder: EncoderConfig
    """The frozen encoder."""
    fae: FAEConfig
    """The FAE (only its encoder is used)."""


@dataclass(kw_only=True)
class ExtractConfig:
    """What extract_latents.py reads and writes; `--encoder NAME` and `--fae_size NAME` pick the models,
    `--encoder.field=value` / `--fae_model.field=value` change single fields of them."""

    images: str = ""
    """A split folder: <class>/*.JPEG, or flat with --val_labels; with --file_list the folder its paths are
    relative to."""
    captions: str = ""
    """Instead of --images: WebDataset tar shards of image-caption pairs (img2dataset's layout) as a folder, a
    glob or a brace pattern such as /data/cc12m/{00000..01242}.tar; writes a caption cache."""
    text_tower: str = ""
    """With --captions: the SigLIP 2 text tower that embeds the captions (hub id or save_pretrained folder)."""
    text_length: int = 64
    """With --captions: caption tokens, padded or cut to this length (SigLIP 2 was trained on 64)."""
    out: str = ""
    """Cache folder (created; an unfinished one is resumed)."""
    fae: str = ""
    """FAE weights: the feature stage's ema.safetensors, its run folder, or a DCP checkpoint folder."""
    random_weights: bool = False
    """Randomly initialised FAE (and encoder, unless it has weights_path): tests and speed runs only."""
    seed: int = 0
    """Seed of random weights (the same on every rank)."""
    batch: int = 256
    """Images per step on each rank (2x rows with flips)."""
    shard_size: int = 10240
    """Images per shard (a multiple of batch)."""
    workers: int = 8
    """Decoding workers / reader threads per rank."""
    backend: str = "auto"
    """Image decoder: auto, dali, torchvision_gpu or pil."""
    file_list: str = ""
    """'relative/path label' lines used instead of scanning."""
    val_labels: str = ""
    """Labels of a flat val folder (LOC_val_solution.csv)."""
    exclude_list: str = ""
    """Output of python -m fae_fast.data.check: files to leave out."""
    compile: Optional[bool] = None
    """torch.compile the models (none: on CUDA)."""
    max_shards: int = 0
    """Stop after this many shards per rank (0: all)."""
    log_every: float = 30.0
    """Seconds between progress lines."""
    encoder: EncoderConfig = field(default_factory=lambda: encoder_config("DINOv2-g/14"))
    """The frozen encoder (picked by --encoder NAME)."""
    fae_model: FAEConfig = field(default_factory=lambda: fae_config("FAE-DINOv2-g"))
    """The FAE's architecture (picked by --fae_size NAME; default: the one of the encoder)."""


def _build(picked: dict[str, str]) -> ExtractConfig:
    fae_size = FAE_SIZE_OF_ENCODER.get(picked["encoder"], "") if picked["fae_size"] == "auto" else picked["fae_size"]
    if not fae_size:
        raise UsageError(f"no FAE size is registered for encoder {picked['encoder']!r}; pass --fae_size NAME")
    return ExtractConfig(encoder=encoder_config(picked["encoder"]), fae_model=fae_config(fae_size))


def parse_args(argv: list[str]) -> tuple[ExtractConfig, Models]:
    choices = {"encoder": ("DINOv2-g/14", {name: sizes["timm_name"] for name, sizes in ENCODER_SIZES.items()}),
               "fae_size": ("auto", {"auto": "the FAE of --encoder", **{n: "" for n in FAE_SIZES}})}
    args = parse_command_line(argv, prog="extract_latents.py", summary=__doc__.split("\n")[0], choices=choices,
                              build=_build)
    if not args.out:
        raise UsageError("--out is required (see --help)")
    if bool(args.images) == bool(args.captions):
        raise UsageError("pass one of --images (a class-labelled image folder) and --captions (caption shards)")
    if args.captions and not args.text_tower:
        raise UsageError("--captions needs --text_tower: the SigLIP 2 text tower (hub id or save_pretrained folder) "
                         "that embeds the captions")
    if args.shard_size % args.batch:
        raise UsageError(f"--shard_size={args.shard_size} is not a multiple of --batch={args.batch}; batches must "
                         f"not straddle shards")
    if not args.fae and not args.random_weights:
        raise UsageError("no FAE weights given: pass --fae runs/fae-dinov2-g-feature/ema.safetensors (or its folder), "
                         "or --random_weights to extract with a randomly initialised FAE (tests and speed runs only)")
    models = Models(encoder=args.encoder, fae=args.fae_model)
    validate_encoder(models.encoder, models.fae.grid)
    if models.encoder.feature_dim != models.fae.feature_dim:
        raise UsageError(f"encoder.feature_dim={models.encoder.feature_dim} differs from fae_model.feature_dim="
                         f"{models.fae.feature_dim}; pass the --fae_size that belongs to --encoder")
    return args, models


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------
def build_models(args: ExtractConfig, models: Models, device: torch.device) -> tuple[FrozenEncoder, FAEEncoder]:
    """Frozen encoder (bf16 on CUDA) and FAE encoder, in eval mode, optionally compiled. Random weights
    are drawn from args.seed, so every rank builds the same ones."""
    torch.manual_seed(args.seed)
    enc_cfg = models.encoder
    if args.random_weights and not enc_cfg.weights_path:
        enc_cfg.pretrained = False
    encoder = frozen_encoder(enc_cfg, models.fae.grid, device)
    with device:  # random init on the device: fast for a billion parameters
        if args.fae:
            (fae,) = load_fae_parts(fae_weights(args.fae), models.fae, ("encoder",),
                                    "pass the --fae_size the FAE was trained with (its encoder.* weights are read)")
        else:
            fae = FAEEncoder(models.fae).eval().requires_grad_(False)
    if args.compile if args.compile is not None else device.type == "cuda":
        encoder.compile()
        fae.compile()
    return encoder, fae


@torch.no_grad()
def latent_means(encoder: FrozenEncoder, fae: FAEEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """pixels (R, 3, S, S) in [0, 1] -> mu (R, T, C): frozen features, then the FAE's mean (no sampling).
    On CUDA the FAE runs under bf16 autocast like the encoder; mu is stored as float16 anyway."""
    features = encoder(pixels)  # (R, T, F)
    with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=pixels.device.type == "cuda"):
        _, mu, _ = fae.encode(features, sample=False)
    return mu


# ----------------------------------------------------------------------------------------------------
# Images and settings
# ----------------------------------------------------------------------------------------------------
def make_loader(args: ExtractConfig, models: Models, device: torch.device):
    """An every-image-once loader (sorted order, flipped twins) of this process alone: the rank split is
    by shard, done here by excluding the images of other shards (loader.excluded)."""
    images = os.path.abspath(args.images)
    root, split = (images, "") if args.file_list else (os.path.dirname(images), os.path.basename(images))
    cfg = ImageDataConfig(root=root, split=split, file_list=args.file_list, val_labels=args.val_labels,
                          batch_size=args.batch, image_size=models.fae.image_size,
                          encoder_size=models.encoder.image_size, flip_twins=True, shuffle=False,
                          backend=args.backend, workers=args.workers, exclude_list=args.exclude_list,
                          on_error="stop")
    return make_image_loader(cfg, rank=0, world=1, device=device)


def _sha256_file(path: Path) -> str:
    """sha256 of a weights file, or of a DCP checkpoint folder's .metadata."""
    h = hashlib.sha256()
    with open(path / ".metadata" if path.is_dir() else path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def model_settings(args, models: Models) -> dict:
    """Which encoder and FAE made the latents (recorded in settings.json and index.json)."""
    enc = models.encoder
    enc_weights = enc.weights_path or ("hub" if enc.pretrained and not args.random_weights else f"random (seed {args.seed})")
    return {
        "encoder": enc.timm_name, "encoder_weights": enc_weights, "encoder_size": enc.image_size,
        "image_size": models.fae.image_size,
        "fae": str(fae_weights(args.fae)) if args.fae else f"random (seed {args.seed})",
        "fae_sha256": _sha256_file(fae_weights(args.fae)) if args.fae else "",
    }


def make_settings(args, models: Models, loader, kept: np.ndarray) -> dict:
    """What must not change between a run and its resumption."""
    listing = hashlib.sha256(b"\n".join(loader.images.paths[kept]))
    listing.update(loader.images.labels[kept].tobytes())
    return {
        "format": lc.FORMAT, "num_images": int(len(kept)), "shard_size": args.shard_size,
        "tokens": models.fae.grid ** 2, "channels": models.fae.latent_dim, "dtype": "float16", "flips": True,
        **model_settings(args, models), "images": loader.images.root, "images_sha256": listing.hexdigest(),
    }


def prepare_folder(out: Path, settings: dict, d) -> None:
    """Create the folder and record the settings (rank 0), or check that a resumed run uses the same ones."""
    if d.is_main and not (out / "settings.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        lc.write_json(out / "settings.json", settings)
    dist.barrier()
    lc.check_settings(out, settings)


# ----------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------
class ExtractProgress:
    """Rank 0's line: images done over all ranks (estimated from rank 0's pace), images/s, ETA."""

    def __init__(self, *, total: int, done_before: int, world: int, every: float):
        self.total, self.done_before, self.world, self.every = total, done_before, world, every
        self.start = self.last = time.perf_counter()
        self.images = 0

    def update(self, images: int, shards_done: int, shards: int, force: bool = False) -> None:
        self.images += images
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        rate = self.images * self.world / max(now - self.start, 1e-9)
        done = min(self.total, self.done_before + self.images * self.world)
        eta = datetime.timedelta(seconds=int((self.total - done) / max(rate, 1e-9)))
        filled = int(20 * done / max(self.total, 1))
        print0(f"[{'#' * filled}{'.' * (20 - filled)}] {done:,}/{self.total:,} images (all ranks, est.) | "
               f"shard {shards_done}/{shards} of rank 0 | {rate:,.1f} img/s | ETA {eta}")


class BatchSink:
    """Receives the latents of one batch at a time and routes them into the shard they belong to."""

    def __init__(self, out: Path, shards: list[lc.Shard], shard_size: int, position_of: np.ndarray, tokens: int,
                 channels: int, progress: ExtractProgress):
        self.out, self.position_of, self.tokens, self.channels = out, position_of, tokens, channels
        self.by_start, self.size = {s.start: s for s in shards}, shard_size
        self.progress, self.shards_done, self.shards = progress, 0, len(shards)
        self.writer: lc.ShardWriter | None = None

    def put(self, latents: np.ndarray, indices: np.ndarray, labels: np.ndarray) -> None:
        """latents (n, 2, T, C) float16; indices (2n,) listed image indices of the rows (plain, then flipped)."""
        n = len(latents)
        if not np.array_equal(indices[:n], indices[n:]):
            raise RuntimeError("the loader's flipped rows do not mirror its plain rows; fae_fast.data.images changed")
        positions = self.position_of[indices[:n]]
        start = positions[0] - positions[0] % self.size
        if self.writer is None or self.writer.shard.start != start:
            self.finish()
            self.writer = lc.ShardWriter(self.out, self.by_start[start], self.tokens, self.channels)
        self.writer.write(positions, latents, labels[:n])
        self.progress.update(n, self.shards_done, self.shards)

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.finish()
            self.writer, self.shards_done = None, self.shards_done + 1
            self.progress.update(0, self.shards_done, self.shards, force=True)


def _launch(encoder, fae, batch: dict, rows: int) -> tuple:
    """Start one batch on the device; returns host buffers filled asynchronously and their event."""
    pixels, indices, labels = batch["encoder_pixels"], batch["indices"], batch["labels"]
    n = pixels.shape[0] // 2
    if pixels.shape[0] < rows:  # the last batch: pad to the compiled shape, drop the padding below
        pixels = torch.cat([pixels, pixels[-1:].expand(rows - pixels.shape[0], *pixels.shape[1:])])
    mu = latent_means(encoder, fae, pixels)[:2 * n]  # (2n, T, C): plain rows, then flipped rows
    mu = mu.view(2, n, *mu.shape[1:]).transpose(0, 1).to(torch.float16)  # (n, 2, T, C)
    pin = pixels.device.type == "cuda"
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in (mu, indices, labels)]
    for h, t in zip(host, (mu, indices, labels)):
        h.copy_(t, non_blocking=True)
    event = torch.cuda.Event() if pin else None
    if event is not None:
        event.record()
    return host, event


def extract(loader, todo: list[lc.Shard], kept: np.ndarray, encoder, fae, sink: BatchSink, batch: int) -> None:
    """Latents of every image of the `todo` shards into the sink; batch i + 1 is launched on the device
    before batch i's results are written, so the device never waits for the disk."""
    wanted = np.zeros(len(loader.images), dtype=bool)
    for s in todo:
        wanted[kept[s.start:s.start + s.count]] = True
    loader.excluded = ~wanted  # the user's exclusions are not in `kept`, so they stay out
    pending = None
    for b in loader:
        launched = _launch(encoder, fae, b, 2 * batch)
        if pending is not None:
            _store(pending, sink)
        pending = launched
    if pending is not None:
        _store(pending, sink)
    sink.finish()


def _store(launched: tuple, sink: BatchSink) -> None:
    (mu, indices, labels), event = launched
    if event is not None:
        event.synchronize()
    sink.put(mu.numpy(), indices.numpy(), labels.numpy())


# ----------------------------------------------------------------------------------------------------
# Finishing: stats, the exactly-once check, index.json
# ----------------------------------------------------------------------------------------------------
def finalize(out: Path, plan: list[lc.Shard], settings: dict, loader, kept: np.ndarray, d) -> bool:
    """When every shard is on disk: stats (each rank its shards, merged in shard order), coverage check
    and index.json by rank 0. Returns False (and says so) while shards are missing."""
    T, C = settings["tokens"], settings["channels"]
    missing = [s.k for s in plan if not lc.shard_done(out, s, T, C)]
    if missing:
        print0(f"{len(missing)} of {len(plan)} shards are not written yet (first: shard {missing[0]}); run the "
               f"same command again to finish the cache")
        return False
    mine = [lc.shard_moments(out / s.file) for s in plan if s.k % d.world == d.rank]
    gathered = [None] * d.world
    dist.all_gather_object(gathered, mine)
    if d.is_main:
        lines = [f"{p.decode()} {y}" for p, y in zip(loader.images.paths[kept], loader.images.labels[kept])]
        (out / "images.txt").write_text("\n".join(lines) + "\n")
        lc.finish_cache(out, plan, settings, [gathered[s.k % d.world][s.k // d.world] for s in plan])
        print0(f"latent cache complete: {len(kept):,} images present exactly once ({2 * len(kept):,} latents with "
               f"flips), {T} tokens x {C} channels, {len(plan)} shards -> {out}")
    dist.barrier()
    return True


# ----------------------------------------------------------------------------------------------------
# Caption caches
# ----------------------------------------------------------------------------------------------------
def caption_writer(args, models: Models, pairs: CaptionShards, text_encoder: FrozenTextEncoder) -> TextCacheWriter:
    """The caption cache's writer; its metadata (shapes, models, the pairs' listing) is the run's settings."""
    listing = hashlib.sha256(pairs.keys.tobytes())
    listing.update(pairs.shard_of.tobytes())
    listing.update("\n".join(p.name for p in pairs.shards).encode())
    return TextCacheWriter(Path(args.out), num_pairs=len(pairs), shard_size=args.shard_size,
                           tokens=models.fae.grid ** 2, channels=models.fae.latent_dim, text_length=args.text_length,
                           text_dim=text_encoder.width, **model_settings(args, models), captions=args.captions,
                           captions_sha256=listing.hexdigest(), text_tower=args.text_tower)


def caption_latents(batch: CaptionBatch, encoder, fae, text_encoder, *, rows: int, encoder_size: int,
                    device: torch.device) -> TextBatch:
    """One decoded batch of pairs -> what the cache stores: the latents of each crop and of its flip (as the
    class path computes them, `_launch`), the captions' token embeddings and lengths."""
    n = len(batch.indices)
    if n == 0:  # every pair of the batch was skipped
        return TextBatch(batch.indices, np.zeros((0,)), np.zeros((0,)), np.zeros(0), batch.skipped)
    to = dict(device=device, non_blocking=True)
    images = finish_batch(batch.pixels.to(**to), torch.zeros(n, dtype=torch.int64, device=device),
                          torch.from_numpy(batch.indices).to(**to), torch.zeros(n, dtype=torch.bool, device=device),
                          encoder_size=encoder_size, twins=True)
    (mu, _, _), event = _launch(encoder, fae, images, rows)
    text = text_encoder(batch.captions).to(torch.float16).cpu().numpy()  # (n, L, D)
    if event is not None:
        event.synchronize()
    return TextBatch(batch.indices, mu.numpy(), text, caption_lengths(text_encoder, batch.captions), batch.skipped)


def extract_captions(args, models: Models, d, built: tuple | None) -> bool:
    """Run (or resume) a caption cache: shard k of pairs by rank k % world, finished by rank 0 once every
    shard is on disk; True when the cache is complete."""
    out = Path(args.out)
    pairs = CaptionShards(args.captions, workers=args.workers)
    text_encoder = FrozenTextEncoder.load(args.text_tower, max_length=args.text_length, device=d.device)
    writer = caption_writer(args, models, pairs, text_encoder)
    prepare_folder(out, writer.meta, d)
    if (out / "index.json").is_file():
        print0(f"{out} is already a complete caption cache of {len(pairs):,} pairs; nothing to do")
        return True
    todo = writer.todo(d.rank, d.world)
    todo = todo[:args.max_shards] if args.max_shards else todo
    print0(f"{len(pairs):,} image-caption pairs in {len(pairs.shards)} tar shards -> {len(writer.plan)} cache shards "
           f"of {args.shard_size}; {d.world} rank(s) on {d.device.type}; text tower {args.text_tower}")
    if todo:
        encoder, fae = built or build_models(args, models, d.device)
        write_caption_shards(args, models, pairs, todo, writer, (encoder, fae, text_encoder), d)
    dist.barrier()
    return finalize_captions(writer, len(pairs), d)


def write_caption_shards(args, models: Models, pairs: CaptionShards, todo: list[lc.Shard], writer: TextCacheWriter,
                         encoders: tuple, d) -> None:
    """The `todo` shards of this rank: their pairs decoded, encoded (image, flip, caption) and written."""
    indices = np.concatenate([np.arange(s.start, s.start + s.count) for s in todo])
    done_before = sum(s.count for s in writer.plan if s.k in writer.done)
    progress = ExtractProgress(total=len(pairs), done_before=done_before, world=d.world, every=args.log_every)
    for batch in pairs.batches(indices, batch_size=args.batch, image_size=models.fae.image_size,
                               workers=args.workers):
        writer.put(caption_latents(batch, *encoders, rows=2 * args.batch, encoder_size=models.encoder.image_size,
                                   device=d.device))
        progress.update(len(batch.indices) + len(batch.skipped), sum(s.k in writer.done for s in todo), len(todo))
    writer.close()


def finalize_captions(writer: TextCacheWriter, num_pairs: int, d) -> bool:
    """When every shard is on disk: stats and index.json by rank 0. False (and says so) while shards are missing."""
    if missing := writer.missing():
        print0(f"{len(missing)} of {len(writer.plan)} shards are not written yet (first: shard {missing[0].k}); run "
               f"the same command again to finish the cache")
        return False
    if d.is_main:
        index = writer.finish()
        left_out = num_pairs - index["num_images"]
        print0(f"caption cache complete: {index['num_images']:,} of {num_pairs:,} pairs ({left_out:,} left out: "
               f"undecodable images or empty captions), {index['tokens']} tokens x {index['channels']} "
               f"channels and {index['text_length']} x {index['text_dim']} caption embeddings per image, "
               f"{len(writer.plan)} shards -> {writer.folder}")
    dist.barrier()
    return True


def main(argv: list[str], built: tuple | None = None) -> bool:
    """Run (or resume) an extraction; True when the cache is complete. `built`: (encoder, fae) already
    made by build_models for these arguments, to reuse compiled models (benchmarks)."""
    args, models = parse_args(argv)
    d = init_distributed()
    if args.captions:
        return extract_captions(args, models, d, built)
    out = Path(args.out)
    loader = make_loader(args, models, d.device)
    kept = np.flatnonzero(~loader.excluded)  # cache position j <-> listed image kept[j]
    settings = make_settings(args, models, loader, kept)
    prepare_folder(out, settings, d)
    plan = lc.plan_shards(len(kept), args.shard_size)
    T, C = settings["tokens"], settings["channels"]
    if (out / "index.json").is_file():
        print0(f"{out} is already a complete latent cache of {len(kept):,} images; nothing to do")
        return True
    todo = [s for s in plan if s.k % d.world == d.rank and not lc.shard_done(out, s, T, C)]
    todo = todo[:args.max_shards] if args.max_shards else todo
    done_before = sum(s.count for s in plan if lc.shard_done(out, s, T, C))
    print0(f"{len(kept):,} images in {len(plan)} shards of {args.shard_size}; {done_before:,} images done before; "
           f"{d.world} rank(s) on {d.device.type}; encoder {models.encoder.timm_name}, FAE {settings['fae']}")
    if args.random_weights:
        print0("WARNING: --random_weights: these latents come from randomly initialised weights (tests, speed runs)")
    if todo:
        encoder, fae = built or build_models(args, models, d.device)
        position_of = np.full(len(loader.images), -1, dtype=np.int64)
        position_of[kept] = np.arange(len(kept))
        progress = ExtractProgress(total=len(kept), done_before=done_before, world=d.world, every=args.log_every)
        sink = BatchSink(out, todo, args.shard_size, position_of, T, C, progress)
        extract(loader, todo, kept, encoder, fae, sink, args.batch)
    dist.barrier()
    return finalize(out, plan, settings, loader, kept, d)


if __name__ == "__main__":
    run_program(main)
    finish_distributed()
