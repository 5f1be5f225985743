"""ImageNet-layout image loading for FAE training and latent extraction: one API, three backends.

    loader = make_image_loader(ImageDataConfig(root="/data/imagenet", batch_size=256), rank=r, world=w, device=dev)
    for batch in loader:            # one epoch, from the saved position; the next `for` starts the next epoch
        batch["pixels"]             # (B, 3, 256, 256) float32 in [0, 1]: ADM centre crop (decode.py)
        batch["encoder_pixels"]     # (B, 3, 224, 224) float32 in [0, 1]: that crop resized (bicubic, antialiased)
        batch["labels"], batch["indices"], batch["flipped"]   # (B,) int64, int64, bool; all on `device`

Every rank lists the same sorted files; image i keeps index i whatever is excluded or skipped, so an
extraction run can store each image at its index exactly once. An epoch is a seeded permutation of the
indices (or the sorted order when shuffle=False); rank r takes every world-th item of what is left of
it. The position (epoch, offset into that order) is global, so a run resumes exactly, also on another
number of ranks. A file that cannot be decoded is skipped with a warning naming it (its batch is one
row shorter) or stops the run, as on_error says; the check tool lists such files up front.

Backends (same outputs): 'dali' (dali.py; GPU decode with device='mixed', CPU-only pipelines off
CUDA), 'torchvision_gpu' (backends.py; nvjpeg batched decode on the loader's device), 'pil' (PIL in
DataLoader worker processes). Decoding and cropping run in a background thread (on its own CUDA
stream on a GPU) so that the next batch is made while the model works on this one.
"""
import contextlib
import logging
import os
import queue
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


@dataclass(kw_only=True)
class ImageDataConfig:
    """Where the images are, how they are cut and batched, and which decoder runs."""

    root: str = ""
    """Data root holding <split>/<wnid>/*.JPEG (ImageNet train layout), or <split>/*.JPEG with val_labels."""
    split: str = "train"
    """Sub-folder of root to read ('train' or 'val')."""
    file_list: str = ""
    """A text file of 'relative/path label' lines (paths relative to root) used instead of scanning."""
    val_labels: str = ""
    """Labels of a flat val folder: 'name label' lines or LOC_val_solution.csv (label: int or wnid)."""
    batch_size: int = 256
    """Images read per batch on each rank (the batch holds twice as many rows with flip_twins)."""
    image_size: int = 256
    """Side of the ADM centre crop returned as `pixels`."""
    encoder_size: int = 224
    """Side of `encoder_pixels`, the crop resized for the frozen encoder (224 for DINOv2-g/14)."""
    random_flip: bool = False
    """Flip each image horizontally with probability 1/2 (seeded by seed, epoch and index)."""
    flip_twins: bool = False
    """Return every image twice, plain then flipped (rows B..2B-1 mirror rows 0..B-1): for extraction."""
    shuffle: bool = True
    """True: a new permutation every epoch, equal batches on every rank, the remainder dropped.
    False: sorted order, every image exactly once, the last batch may be short (extraction)."""
    backend: str = "auto"
    """'auto' (torchvision_gpu on CUDA, else pil), 'dali', 'torchvision_gpu' or 'pil'. The GPU two decode
    on `device`, also on a CPU one (tests). On an H200 torchvision_gpu read 4,674 images/s with 1.6 CPU
    cores, DALI 3,354 with 3.0 and PIL 2,158 with 12.3 (benchmarks/loader_compare.py): 'auto' takes the
    fastest."""
    workers: int = 8
    """PIL: DataLoader worker processes. GPU backends: file-reading threads (and DALI's CPU threads)."""
    exclude_list: str = ""
    """Output of `python -m fae_fast.data.check`: files listed there are never read."""
    seed: int = 0
    """Seed of the per-epoch permutation and of the random flips."""
    on_error: str = "skip"
    """A file that cannot be decoded: 'skip' it with a warning naming it (counted in loader.skipped),
    or 'stop' with an error naming it."""


class BadImageError(RuntimeError):
    """A file in the data set cannot be read or decoded."""


class BadImageWarning(UserWarning):
    """A file in the data set was skipped because it cannot be read or decoded."""


# ----------------------------------------------------------------------------------------------------
# Listing: sorted relative paths and labels
# ----------------------------------------------------------------------------------------------------
@dataclass
class ImageList:
    """The sorted files of a split; index i is image i everywhere (outputs, latent caches)."""

    root: str
    paths: np.ndarray
    """(N,) bytes: utf-8 paths relative to root (a numpy array, so forked workers share it)."""
    labels: np.ndarray
    """(N,) int64 class indices."""

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i].decode())


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _files_in(folder: str) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_file() and is_image(e.name))


def _class_folders(folder: str) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir())


def _label_of(token: str, classes: dict[str, int], where: str) -> int:
    if token.lstrip("-").isdigit():
        return int(token)
    if token not in classes:
        raise ValueError(f"{where}: label {token!r} is neither an integer nor a class folder name (wnid) "
                         f"of the train split; use integer labels or ImageNet wnids")
    return classes[token]


def _read_val_labels(path: str, classes: dict[str, int]) -> dict[str, int]:
    """{file stem: label} from 'name label' lines or Kaggle's LOC_val_solution.csv ('id,wnid x y ...')."""
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            fields = line.replace(",", " ").split()
            if not fields or fields[0].startswith("#") or (n == 1 and fields[0] == "ImageId"):
                continue
            if len(fields) < 2:
                raise ValueError(f"{path}:{n}: expected 'name label', got {line.strip()!r}")
            out[os.path.splitext(fields[0])[0]] = _label_of(fields[1], classes, f"{path}:{n}")
    return out


def _list_folder(cfg: ImageDataConfig) -> tuple[list[str], list[int]]:
    split_dir = os.path.join(cfg.root, cfg.split)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"{split_dir} is not a folder; set root to the folder holding "
                                f"{cfg.split}/<wnid>/*.JPEG, or give a file_list")
    classes = _class_folders(split_dir)
    if classes:
        paths, labels = [], []
        for label, wnid in enumerate(classes):
            names = _files_in(os.path.join(split_dir, wnid))
            paths += [f"{cfg.split}/{wnid}/{n}" for n in names]
            labels += [label] * len(names)
        return paths, labels
    return _list_flat(cfg, split_dir)


def _list_flat(cfg: ImageDataConfig, split_dir: str) -> tuple[list[str], list[int]]:
    names = _files_in(split_dir)
    if not cfg.val_labels:
        raise ValueError(f"{split_dir} holds images but no class folders; give their labels with "
                         f"val_labels=LOC_val_solution.csv (or 'name label' lines)")
    train_dir = os.path.join(cfg.root, "train")
    wnids = _class_folders(train_dir) if os.path.isdir(train_dir) else []
    table = _read_val_labels(cfg.val_labels, {w: i for i, w in enumerate(wnids)})
    missing = [n for n in names if os.path.splitext(n)[0] not in table]
    if missing:
        raise ValueError(f"{cfg.val_labels} has no label for {os.path.join(split_dir, missing[0])} "
                         f"({len(missing)} files lack one); use the labels file of this folder")
    return [f"{cfg.split}/{n}" for n in names], [table[os.path.splitext(n)[0]] for n in names]


def _read_file_list(path: str) -> tuple[list[str], list[int]]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            fields = line.rsplit(maxsplit=1)
            if not fields or line.startswith("#"):
                continue
            if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
                raise ValueError(f"{path}:{n}: expected 'relative/path integer_label', got {line.strip()!r}")
            rows.append((fields[0], int(fields[1])))
    rows.sort()
    return [r[0] for r in rows], [r[1] for r in rows]


def list_images(cfg: ImageDataConfig) -> ImageList:
    """The sorted files and labels a config names (scanning root/split, or reading file_list)."""
    paths, labels = _read_file_list(cfg.file_list) if cfg.file_list else _list_folder(cfg)
    if not paths:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} files under {os.path.join(cfg.root, cfg.split)}; "
                                f"check root and split")
    return ImageList(cfg.root, np.array([p.encode() for p in paths]), np.array(labels, dtype=np.int64))


def read_exclude_list(path: str) -> set[str]:
    """Absolute paths listed in a check-tool output ('path<TAB>reason' lines; '#' lines are comments)."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        names = [line.split("\t")[0].rstrip("\n") for line in f if line.strip() and not line.startswith("#")]
    return {os.path.normpath(os.path.join(base, n)) for n in names}


def _excluded_mask(images: ImageList, exclude_list: str) -> np.ndarray:
    mask = np.zeros(len(images), dtype=bool)
    if not exclude_list:
        return mask
    listed = read_exclude_list(exclude_list)
    root = os.path.abspath(images.root)
    for i, p in enumerate(images.paths):
        mask[i] = os.path.normpath(os.path.join(root, p.decode())) in listed
    if listed and not mask.any():
        warnings.warn(f"none of the {len(listed)} files in {exclude_list} lies under {root}; was the list "
                      f"made for another copy of the data? Run python -m fae_fast.data.check on this one",
                      BadImageWarning, stacklevel=3)
    return mask


# ----------------------------------------------------------------------------------------------------
# Output: float pixels, flips, the encoder's resize (the same for every backend, on the device)
# ----------------------------------------------------------------------------------------------------
def finish_batch(pixels: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, flip: torch.Tensor, *,
                 encoder_size: int, twins: bool) -> dict[str, torch.Tensor]:
    """pixels (B, 3, S, S) uint8 and per-image labels, indices, flip (B,) -> the loader's batch dict."""
    x = pixels.float().div_(255)
    if twins:
        x = torch.cat([x, x.flip(-1)])
        labels, indices = labels.repeat(2), indices.repeat(2)
        flip = torch.arange(len(x), device=x.device) >= len(pixels)
    else:
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    enc = x
    if encoder_size != x.shape[-1]:
        # bicubic with antialias = PIL's BICUBIC resize (a = -0.5, support widened when shrinking)
        enc = F.interpolate(x, size=(encoder_size, encoder_size), mode="bicubic", antialias=True,
                            align_corners=False).clamp_(0, 1)
    return {"pixels": x, "encoder_pixels": enc, "labels": labels, "indices": indices, "flipped": flip}


# ----------------------------------------------------------------------------------------------------
# Background production: decode the next batches while the caller works on this one
# ----------------------------------------------------------------------------------------------------
_DONE = object()


def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
    """Put item unless the consumer has stopped listening (then False)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def _produce_into(q: queue.Queue, stop: threading.Event, make, stream: torch.cuda.Stream | None) -> None:
    if stream is not None:
        torch.cuda.set_device(stream.device)  # the current device is per thread
    try:
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            gen = make()
            try:
                for item in gen:
                    event = torch.cuda.Event() if stream is not None else None
                    if event is not None:
                        event.record(stream)
                    if not _put(q, stop, (item, event)):
                        return
            finally:
                gen.close()  # shuts down the backend's readers or hands its DataLoader back
        _put(q, stop, (_DONE, None))
    except BaseException as e:  # handed to the consumer, which raises it in its own thread
        _put(q, stop, (e, None))


def _background(make, stream: torch.cuda.Stream | None, depth: int = 2):
    """Iterate make(), which yields (raw batch, output dict or None), in a thread `depth` items ahead.
    On CUDA the items are made on `stream`; the caller's stream waits for each one and owns its output
    tensors from then on."""
    q, stop = queue.Queue(maxsize=depth), threading.Event()
    thread = threading.Thread(target=_produce_into, args=(q, stop, make, stream), daemon=True)
    thread.start()
    try:
        while True:
            item, event = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            if event is not None and item[1] is not None:
                current = torch.cuda.current_stream(stream.device)
                current.wait_event(event)
                for t in item[1].values():
                    t.record_stream(current)  # the side stream's allocator must not reuse them early
            yield item
    finally:
        stop.set()
        thread.join()


# ----------------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------------
class ImageLoader:
    """Batches of one rank (see the module docstring). `iter(loader)` runs the rest of the current
    epoch and then moves to the next one; state_dict() / load_state_dict() save and restore that
    position. Files that fail to decode are in `skipped` ({path: reason})."""

    def __init__(self, cfg: ImageDataConfig, images: ImageList, backend, *, rank: int, world: int,
                 device: torch.device, excluded: np.ndarray):
        self.cfg, self.images, self.backend = cfg, images, backend
        self.rank, self.world, self.device = rank, world, device
        self.excluded = excluded
        self.epoch, self.offset = 0, 0
        self.skipped: dict[str, str] = {}
        # one side stream for the loader's life: cached tensors (resampling weights) stay on it
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def num_images(self) -> int:
        """Images an epoch visits over all ranks (listed minus excluded)."""
        return len(self.images) - int(self.excluded.sum())

    def order(self, epoch: int) -> np.ndarray:
        """Global indices in the order epoch `epoch` visits them (excluded files removed)."""
        n = len(self.images)
        idx = np.random.default_rng([self.cfg.seed, epoch]).permutation(n) if self.cfg.shuffle else np.arange(n)
        return idx[~self.excluded[idx]]

    def _rank_batches(self, order: np.ndarray) -> list[np.ndarray]:
        rest = order[self.offset:]
        if self.cfg.shuffle:  # every rank gets as many images, so collectives stay in step
            rest = rest[:len(rest) - len(rest) % self.world]
        mine, B = rest[self.rank::self.world], self.cfg.batch_size
        count = len(mine) // B if self.cfg.shuffle else -(-len(mine) // B)
        return [mine[i * B:(i + 1) * B] for i in range(count)]

    def __len__(self) -> int:
        """Batches this rank yields in a whole epoch."""
        n, B = self.num_images, self.cfg.batch_size
        if self.cfg.shuffle:
            return n // self.world // B
        mine = len(range(self.rank, n, self.world))
        return -(-mine // B)

    def _flips(self, epoch: int) -> np.ndarray:
        if not self.cfg.random_flip:
            return np.zeros(len(self.images), dtype=bool)
        return np.random.default_rng([self.cfg.seed, epoch, 1]).random(len(self.images)) < 0.5

    def _produce(self, batches: list[np.ndarray], flips: np.ndarray):
        for raw in self.backend.batches(batches):
            if len(raw.indices) == 0:
                yield raw, None
                continue
            idx = torch.from_numpy(raw.indices)
            labels = torch.from_numpy(self.images.labels[raw.indices])
            flip = torch.from_numpy(flips[raw.indices])
            to = dict(device=self.device, non_blocking=True)
            yield raw, finish_batch(raw.pixels, labels.to(**to), idx.to(**to), flip.to(**to),
                                    encoder_size=self.cfg.encoder_size, twins=self.cfg.flip_twins)

    def __iter__(self):
        order = self.order(self.epoch)
        batches = self._rank_batches(order)
        start, step = self.offset, self.cfg.batch_size * self.world
        flips = self._flips(self.epoch)
        items = _background(lambda: self._produce(batches, flips), self.stream)
        for j, (raw, out) in enumerate(items):
            self._report(raw.failures)
            self.offset = min(start + (j + 1) * step, len(order))
            if out is not None:
                yield out
        self.epoch, self.offset = self.epoch + 1, 0

    def _report(self, failures: list[tuple[int, str]]) -> None:
        for index, reason in failures:
            path = self.images.path(index)
            if self.cfg.on_error == "stop":
                raise BadImageError(f"{path} cannot be decoded ({reason}); exclude it with "
                                    f"`python -m fae_fast.data.check {self.images.root} --out problems.txt` "
                                    f"and exclude_list=problems.txt, or set on_error='skip'")
            if path not in self.skipped:
                self.skipped[path] = reason
                warnings.warn(f"skipped {path}: {reason} ({len(self.skipped)} skipped so far)", BadImageWarning)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "num_files": len(self.images),
                "num_images": self.num_images, "seed": self.cfg.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["num_files"] != len(self.images) or state["seed"] != self.cfg.seed:
            raise ValueError(f"the loader state was saved for {state['num_files']} files with seed {state['seed']}; "
                             f"this loader lists {len(self.images)} with seed {self.cfg.seed}: point it at the same "
                             f"data and seed to resume")
        if state["num_images"] != self.num_images:
            warnings.warn(f"resuming with {self.num_images} images per epoch where the saved run had "
                          f"{state['num_images']} (exclude_list changed): the epoch's order differs from the saved one",
                          BadImageWarning)
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------
BACKENDS = ("auto", "dali", "torchvision_gpu", "pil")


def _check_config(cfg: ImageDataConfig) -> None:
    if not cfg.root:
        raise ValueError("root is empty; set it to the folder holding train/<wnid>/*.JPEG (e.g. /data/imagenet)")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend={cfg.backend!r} is not one of {BACKENDS}")
    if cfg.on_error not in ("skip", "stop"):
        raise ValueError(f"on_error={cfg.on_error!r} must be 'skip' or 'stop'")
    if cfg.random_flip and cfg.flip_twins:
        raise ValueError("random_flip and flip_twins are both set; flip_twins already returns every image "
                         "both ways, so set random_flip=False")
    if cfg.batch_size < 1 or cfg.image_size < 1 or cfg.encoder_size < 1:
        raise ValueError(f"batch_size={cfg.batch_size}, image_size={cfg.image_size} and "
                         f"encoder_size={cfg.encoder_size} must be positive")


def pick_backend(name: str, device: torch.device) -> str:
    """The backend 'auto' means here: torchvision's nvJPEG decode on CUDA (measured faster than DALI's, on
    fewer cores: ImageDataConfig.backend), else PIL."""
    if name != "auto":
        return name
    return "torchvision_gpu" if device.type == "cuda" else "pil"


def make_image_loader(cfg: ImageDataConfig, *, rank: int = 0, world: int = 1, device="cpu") -> ImageLoader:
    """The loader of rank `rank` of `world`, producing batches on `device` (see ImageLoader)."""
    from fae_fast.data import backends

    _check_config(cfg)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    images = list_images(cfg)
    excluded = _excluded_mask(images, cfg.exclude_list)
    name = pick_backend(cfg.backend, device)
    backend = backends.make_backend(name, images, size=cfg.image_size, batch_size=cfg.batch_size,
                                    workers=cfg.workers, device=device)
    return ImageLoader(cfg, images, backend, rank=rank, world=world, device=device, excluded=excluded)
