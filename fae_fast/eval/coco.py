"""Zero-shot MS-COCO evaluation of a text-to-image model: which captions are sampled and which images they
are scored against, read from COCO's own files (`annotations/captions_val2014.json` and the `val2014/`
image folder).

The protocol (FID-30K, as GLIDE, Imagen and Re-Imagen report it): 30,000 images drawn at random without
replacement from the 40,504 of val 2014, one of each image's (about five) captions drawn at random, both by
a seeded generator, so the set is a pure function of (annotations file, seed, count). The generator samples
one image per caption; FID compares the samples with those same 30,000 images, centre-cropped and resized to
256 px (ADM's crop, fae_fast.eval.fid.center_crop) and passed through the same Inception network.

The sampling program (training/sample.py with --coco.*) conditions sample i on caption i, embedded by the
frozen text tower, records image id i as the set's labels (ADM's arr_1), and writes the prompt list
(`prompts.json`: index, image id, file, caption of every sample) beside the .npz; the evaluation program
(training/evaluate.py) reads that list to know which reference images belong, and caches the reference
statistics in a file named by the prompt set's digest.
"""
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fae_fast.eval.fid import Extractor, Reference, count_images, files_reference
from fae_fast.eval.npz import npz_keys

COCO_FID_COUNT = 30_000
PROMPT_LIST = "prompts.json"
"""The prompt list's file name, beside the sample set."""


@dataclass(kw_only=True)
class CocoConfig:
    """The zero-shot COCO prompt set of a text-to-image evaluation: `count` val2014 images drawn without
    replacement by `seed`, one of each image's captions, one sample per caption (FID-30K: 30,000)."""

    annotations: str = ""
    """COCO's annotations/captions_val2014.json (from annotations_trainval2014.zip); empty: no COCO set."""
    images: str = ""
    """COCO's val2014/ image folder: the FID reference images."""
    count: int = COCO_FID_COUNT
    """Images (and captions, and samples) in the set: 30,000 for FID-30K."""
    seed: int = 0
    """Seed of the draw of images and captions (the sampling noise has its own seed)."""

    @property
    def wanted(self) -> bool:
        """Whether the options ask for a COCO set (either path given; a missing one is then an error)."""
        return bool(self.annotations or self.images)


@dataclass(frozen=True)
class CocoPrompt:
    image_id: int
    file: Path
    """The val2014 image the caption describes (the FID reference image)."""
    caption: str


def read_captions(annotations: str | Path) -> tuple[dict[int, str], dict[int, list[str]]]:
    """({image id: file name}, {image id: [captions]}) of a COCO captions JSON."""
    path = Path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"COCO captions file {str(path)!r} does not exist; pass annotations/"
                                f"captions_val2014.json from COCO's annotations_trainval2014.zip")
    try:
        data = json.loads(path.read_text())
        files = {int(im["id"]): im["file_name"] for im in data["images"]}
        captions: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            captions.setdefault(int(ann["image_id"]), []).append(ann["caption"].strip())
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a COCO captions file (needs 'images' with id and file_name, "
                         f"'annotations' with image_id and caption): {type(err).__name__}: {err}") from err
    return files, captions


def coco_prompts(annotations: str | Path, images: str | Path, *, count: int = COCO_FID_COUNT,
                 seed: int = 0) -> list[CocoPrompt]:
    """The evaluation set: `count` images with a caption each, drawn by `seed` (module docstring); every
    image file must exist under `images`."""
    files, captions = read_captions(annotations)
    ids = sorted(i for i in files if captions.get(i))
    if count > len(ids):
        raise ValueError(f"{annotations} has {len(ids)} captioned images, fewer than the {count} asked for; "
                         f"pass a smaller count")
    g = torch.Generator().manual_seed(seed)
    chosen = [ids[i] for i in torch.randperm(len(ids), generator=g)[:count].tolist()]
    picks = torch.randint(0, 1 << 30, (count,), generator=g).tolist()
    folder = Path(images)
    prompts = [CocoPrompt(i, folder / files[i], captions[i][pick % len(captions[i])])
               for i, pick in zip(chosen, picks)]
    check_images(prompts, folder)
    return prompts


def check_images(prompts: list[CocoPrompt], folder: str | Path) -> None:
    """One error naming the folder when it, or any prompt's image in it, does not exist."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"COCO image folder {str(folder)!r} does not exist; pass the val2014 image folder "
                                f"(from COCO's val2014.zip)")
    missing = [p.file for p in prompts if not p.file.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} COCO images of the evaluation set are missing under {folder}, "
                                f"e.g. {missing[0]}; pass the val2014 image folder")


def prompt_set_digest(prompts: list[CocoPrompt]) -> str:
    """16 hex digits naming a prompt set by its content (image ids, file names, captions, in order), not by
    where the images lie: the key of its reference statistics and of a resumable sampling run."""
    rows = [[p.image_id, p.file.name, p.caption] for p in prompts]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()[:16]


def write_prompt_list(path: str | Path, prompts: list[CocoPrompt], cfg: CocoConfig) -> None:
    """The prompt list (index, image id, file name, caption of every sample), with the options that drew it
    and its digest, written atomically."""
    path = Path(path)
    record = {"annotations": str(Path(cfg.annotations).resolve()), "images": str(Path(cfg.images).resolve()),
              "count": len(prompts), "seed": cfg.seed, "digest": prompt_set_digest(prompts),
              "prompts": [{"index": i, "image_id": p.image_id, "file": p.file.name, "caption": p.caption}
                          for i, p in enumerate(prompts)]}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=0, ensure_ascii=False))
    os.replace(tmp, path)


def read_prompt_list(path: str | Path, images: str | Path = "") -> list[CocoPrompt]:
    """The prompts of a list `write_prompt_list` wrote, their files under `images` (default: the folder the
    list names), every image checked; an edited list (its digest no longer fits) is an error."""
    try:
        record = json.loads(Path(path).read_text())
        folder = Path(images or record["images"])
        prompts = [CocoPrompt(int(p["image_id"]), folder / p["file"], p["caption"]) for p in record["prompts"]]
        digest = record["digest"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a prompt list written by sample.py ({type(err).__name__}: {err}); pass "
                         f"the prompts.json beside the sample set") from err
    if prompt_set_digest(prompts) != digest:
        raise ValueError(f"{path} was changed after sample.py wrote it (its digest does not fit its prompts); use "
                         f"the list written with the samples")
    check_images(prompts, folder)
    return prompts


class CocoConditions:
    """What sample i of a COCO evaluation set is conditioned on: caption i of the prompt set embedded by the
    frozen text tower, (B, text_length, text_dim); the set records image id i as its label (ADM's arr_1)."""

    def __init__(self, prompts: list[CocoPrompt], encoder, text_dim: int):
        """encoder: a fae_fast.text.FrozenTextEncoder padding to the generator's text_length."""
        if encoder.width != text_dim:
            raise ValueError(f"the text tower gives {encoder.width}-wide caption embeddings but the generator "
                             f"was trained on {text_dim}-wide ones (model.text_dim); pass the --text_tower it "
                             f"was trained with")
        self.prompts, self.encoder = prompts, encoder

    def __len__(self) -> int:
        return len(self.prompts)

    def __call__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(caption embeddings (B, L, D) fp32, image ids (B,) int64) of prompt `indices` (B,), on their device."""
        chosen = [self.prompts[i] for i in indices.tolist()]
        embeddings = self.encoder([p.caption for p in chosen])
        ids = torch.tensor([p.image_id for p in chosen], dtype=torch.int64, device=indices.device)
        return embeddings.to(indices.device, torch.float32), ids

    def grid_rows(self, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditions of a sample grid's rows, one per entry of `classes` (the rows a class-conditional grid
        would have): the first len(classes) captions of the set."""
        return self(torch.arange(min(len(classes), len(self))))


def coco_reference(prompts: list[CocoPrompt], extractor: Extractor, *, cache: str | Path = "", batch: int = 200,
                   size: int = 256, workers: int = 8) -> Reference:
    """FID reference statistics of the prompt set's images, centre-cropped to `size` (ADM's crop), cached at
    `cache` (default: <image folder>.coco-<digest>.<extractor>.stats.npz beside the folder)."""
    digest = prompt_set_digest(prompts)
    folder = prompts[0].file.parent
    cache = Path(cache or f"{folder}.coco-{digest}.{extractor.name}.stats.npz")
    source = f"COCO prompt set {digest}: {len(prompts):,} images of {folder}"
    ref = files_reference([p.file for p in prompts], extractor, cache=cache, source=source, batch=batch,
                          size=size, workers=workers)
    if digest not in ref.source:
        raise ValueError(f"reference cache {cache} holds the statistics of {ref.source}, not of prompt set "
                         f"{digest}; pass another --ref_cache")
    return ref


def check_sample_set(samples: str | Path, prompts: list[CocoPrompt]) -> None:
    """The sample set has one image per prompt and, when it records labels (ADM's arr_1), the prompts' image ids
    in order; otherwise one error saying that the samples were drawn for another prompt set."""
    path = Path(samples)
    count = count_images(path)
    if count != len(prompts):
        raise ValueError(f"{samples} holds {count:,} samples but the prompt list names {len(prompts):,} captions; "
                         f"pass the prompts.json written with these samples")
    if path.is_file() and "arr_1" in npz_keys(path):
        with np.load(path) as f:
            ids = f["arr_1"]
        if not np.array_equal(ids, [p.image_id for p in prompts]):
            raise ValueError(f"{samples} was drawn for other COCO images than the prompt list names (its arr_1 "
                             f"image ids differ); pass the prompts.json written with these samples")
