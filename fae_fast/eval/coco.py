"""Zero-shot MS-COCO evaluation of a text-to-image model: which captions are sampled and which images they
are scored against, read from COCO's own files (`annotations/captions_val2014.json` and the `val2014/`
image folder).

The protocol (FID-30K, as GLIDE, Imagen and Re-Imagen report it): 30,000 images drawn at random without
replacement from the 40,504 of val 2014, one of each image's (about five) captions drawn at random, both by
a seeded generator, so the set is a pure function of (annotations file, seed, count). The generator samples
one image per caption; FID compares the samples with those same 30,000 images, centre-cropped and resized to
256 px (ADM's crop, fae_fast.eval.fid.center_crop) and passed through the same Inception network.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch

COCO_FID_COUNT = 30_000


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
    missing = [p.file for p in prompts if not p.file.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} COCO images of the evaluation set are missing under {folder}, "
                                f"e.g. {missing[0]}; pass the val2014 image folder")
    return prompts
