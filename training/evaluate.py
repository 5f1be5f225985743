"""Score a sample set: FID, Inception Score, precision and recall against reference statistics.

    python training/evaluate.py --samples=runs/samples-cfg/samples_50000x256x256x3.npz \\
        --ref=VIRTUAL_imagenet256_labeled.npz
    python training/evaluate.py --samples=runs/samples-cfg/png --ref=/data/imagenet/val   # folders work too

The reference is an ADM reference batch (guided-diffusion's evaluation files: its mu/sigma for FID, its
10k images for precision/recall) or an image folder (center-cropped as ADM does; statistics cached in
<ref>.inception-v3-compat.stats.npz, or --ref_cache). Features come from torch-fidelity's TF-compatible
Inception (`pip install -e .[eval]`); its weights file must be downloadable or already in place, and
without it the program stops with the path to put it at. Prints one line and writes a JSON file.

Zero-shot MS-COCO (text-to-image, FID-30K as GLIDE, Imagen and Re-Imagen report it; fae_fast/eval/coco.py):
a set sample.py drew from COCO captions has a prompt list, prompts.json, beside it. Without --ref the program
reads it (or the one --coco_prompts names), checks that the set holds one sample per caption and, in arr_1,
the same COCO image ids in order, and scores it against those same val2014 images (30,000, each centre-cropped
and resized to 256 px as ADM crops its references, through the same Inception network), their statistics
cached in <val2014>.coco-<prompt set digest>.<network>.stats.npz (or --ref_cache):

    python training/evaluate.py --samples=runs/samples-coco/samples_30000x256x256x3.npz \\
        --text_image_model=google/siglip2-so400m-patch16-256     # optional: the text-image score too
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path


import torch

from fae_fast.cli import UsageError, parse_command_line, run_program
from fae_fast.eval.coco import (PROMPT_LIST, CocoPrompt, check_sample_set, coco_reference, prompt_set_digest,
                                read_prompt_list)
from fae_fast.eval.fid import (Extractor, FeatureProgress, InceptionExtractor, Reference, count_images,
                               extract_features, iter_images, load_reference, score)
from fae_fast.eval.npz import npz_array_shape
from fae_fast.eval.text_image import TextImageScorer, text_image_score


@dataclass(kw_only=True)
class EvalConfig:
    """What evaluate.py scores against what; `--field=value` sets a field."""

    samples: str = ""
    """The sample set: an ADM .npz (arr_0 uint8 N x H x W x 3) or an image folder."""
    ref: str = ""
    """Reference: an ADM reference batch .npz (mu, sigma, arr_0) or an image folder; empty: the COCO images of
    the prompt list beside --samples."""
    coco_prompts: str = ""
    """Zero-shot COCO: the prompts.json sample.py wrote with a text-to-image set (default: the one beside
    --samples, when --ref is not given); the reference is then the COCO images it lists (FID-30K protocol:
    the same val2014 images, centre-cropped and resized to image_size, through the same network)."""
    coco_images: str = ""
    """COCO's val2014 folder, when it is not where the prompt list says (the set was drawn on another machine)."""
    text_image_model: str = ""
    """A COCO set's text-image score: a SigLIP / SigLIP 2 checkpoint (hub id or save_pretrained folder, model
    and processor); 100 x the mean cosine similarity of each sample with its caption (fae_fast/eval/
    text_image.py). Empty: not computed."""
    ref_cache: str = ""
    """Where statistics computed from reference images are cached (default: beside the reference; for COCO
    beside val2014, named by the prompt set's digest)."""
    out: str = ""
    """Results JSON (default: <samples>.metrics.json)."""
    inception_weights: str = ""
    """The Inception weights file (default: torch-fidelity's file in $TORCH_HOME/hub/checkpoints/)."""
    batch: int = 200
    """Images per extractor forward."""
    image_size: int = 256
    """Side of the center crop applied to images read from folders."""
    workers: int = 8
    """Processes decoding folder images."""
    log_every: float = 30.0
    """Seconds between progress lines of the sample pass."""
    isc: bool = True
    """Compute the Inception Score."""
    prc: bool = True
    """Compute precision and recall (k = 3) against the reference images' features."""


def parse_args(argv: list[str]) -> EvalConfig:
    cfg = parse_command_line(argv, prog="evaluate.py", summary=__doc__.split("\n")[0], choices={},
                             build=lambda picked: EvalConfig())
    if not cfg.samples or not Path(cfg.samples).exists():
        raise FileNotFoundError(f"--samples={cfg.samples!r} does not exist; pass an .npz file or an image folder")
    beside = Path(cfg.samples.rstrip("/")).parent / PROMPT_LIST
    if not cfg.ref and not cfg.coco_prompts and beside.is_file():
        cfg.coco_prompts = str(beside)
    if cfg.ref and cfg.coco_prompts:
        raise UsageError("--ref and --coco_prompts name two references; pass one of them")
    if cfg.text_image_model and not cfg.coco_prompts:
        raise UsageError("--text_image_model scores samples against their captions: it needs a COCO set (the "
                         "prompts.json sample.py writes beside it, or --coco_prompts)")
    if cfg.coco_prompts and not Path(cfg.coco_prompts).is_file():
        raise FileNotFoundError(f"--coco_prompts={cfg.coco_prompts!r} does not exist; pass the prompts.json "
                                f"sample.py wrote beside the sample set")
    if not cfg.coco_prompts and (not cfg.ref or not Path(cfg.ref).exists()):
        raise FileNotFoundError(f"--ref={cfg.ref!r} does not exist; pass an .npz file or an image folder (or, for "
                                f"a COCO set, keep the prompts.json sample.py wrote beside it)")
    shape = npz_array_shape(cfg.samples) if cfg.samples.endswith(".npz") else (0, 0, 0, 3)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{cfg.samples} holds arr_0 of shape {tuple(shape)}, not images (N, H, W, 3); latents "
                         f"from sample.py without --fae cannot be scored: sample with --fae and --stats")
    return cfg


def results_line(metrics: dict, cfg: EvalConfig, extractor_name: str, against: str) -> str:
    parts = [f"FID {metrics['fid']:.3f}"]
    if "inception_score" in metrics:
        parts.append(f"IS {metrics['inception_score']:.2f} +- {metrics['inception_score_std']:.2f}")
    if "precision" in metrics:
        parts.append(f"precision {metrics['precision']:.4f} | recall {metrics['recall']:.4f}")
    if "text_image_score" in metrics:
        parts.append(f"text-image {metrics['text_image_score']:.2f} ({cfg.text_image_model})")
    parts.append(f"{metrics['num_samples']:,} samples of {cfg.samples} vs {against} ({extractor_name})")
    return " | ".join(parts)


def coco_set(cfg: EvalConfig) -> list[CocoPrompt] | None:
    """The prompts of a COCO set (its images checked, the samples checked against them), or None."""
    if not cfg.coco_prompts:
        return None
    prompts = read_prompt_list(cfg.coco_prompts, cfg.coco_images)
    check_sample_set(cfg.samples, prompts)
    return prompts


def reference_of(cfg: EvalConfig, prompts: list[CocoPrompt] | None, extractor: Extractor) -> Reference:
    """The COCO images of the prompt list, or the --ref batch or folder, as statistics (cached)."""
    if prompts is not None:
        return coco_reference(prompts, extractor, cache=cfg.ref_cache, batch=cfg.batch, size=cfg.image_size,
                              workers=cfg.workers)
    return load_reference(cfg.ref, extractor, batch=cfg.batch, cache=cfg.ref_cache or None, size=cfg.image_size,
                          workers=cfg.workers)


def main(argv: list[str], extractor=None) -> dict:
    """Score and report; `extractor` replaces the Inception network (tests pass a random one)."""
    cfg = parse_args(argv)
    prompts = coco_set(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    extractor = extractor or InceptionExtractor(device, cfg.inception_weights or None)  # fails before any work
    scorer = TextImageScorer.load(cfg.text_image_model, device) if cfg.text_image_model else None  # so does this
    t0 = time.perf_counter()
    ref = reference_of(cfg, prompts, extractor)
    samples = extract_features(iter_images(cfg.samples, cfg.batch, cfg.image_size, cfg.workers), extractor,
                               progress=FeatureProgress("samples", count_images(cfg.samples), cfg.log_every))
    metrics = score(samples, ref, isc=cfg.isc, prc=cfg.prc)
    record = {**metrics, "samples": cfg.samples, "reference": ref.source, "extractor": extractor.name,
              "seconds": time.perf_counter() - t0}
    if prompts is not None:
        record.update(protocol="coco-zero-shot", prompt_list=cfg.coco_prompts, prompt_set=prompt_set_digest(prompts))
    if scorer is not None:
        images = iter_images(cfg.samples, cfg.batch, cfg.image_size, cfg.workers)
        metrics["text_image_score"] = record["text_image_score"] = text_image_score(
            scorer, images, [p.caption for p in prompts])
        record["text_image_model"] = cfg.text_image_model
    out = Path(cfg.out or f"{cfg.samples.rstrip('/')}.metrics.json")
    out.write_text(json.dumps(record, indent=1))
    against = cfg.ref or f"COCO prompt set {prompt_set_digest(prompts)} ({len(prompts):,} val2014 images)"
    print(results_line(metrics, cfg, extractor.name, against), flush=True)
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    run_program(main)
