"""The latent cache: FAE latents of every image of a data set (and of its flipped twin), on disk, with each
image's condition beside them: its class label (format 1) or its caption's token embeddings (format 2).

Written by training/extract_latents.py (labels) and fae_fast/data/caption_cache.py (captions), read by
train_gen.py (data.source='cache') and the linear probe.

    folder/
      index.json             written last, atomically, by rank 0 once every image is present exactly once:
                             {"format": 1, "num_images": N, "tokens": T, "channels": C, "dtype": "float16",
                              "flips": true, "shards": [{"file": "shard_00000.npy", "labels":
                              "shard_00000.labels.npy", "start": s, "count": n}, ...],
                              "encoder": timm name, "fae": weights file (or "random (seed s)"),
                              "complete": true, ...}  (extra keys: shard_size, images, image_size, stats)
      shard_XXXXX.npy        float16 (n, 2, T, C), memory-mappable (np.load(mmap_mode='r')): [:, 0] is the
                             latent mean mu of image start + i, [:, 1] that of its horizontally flipped twin
      shard_XXXXX.labels.npy int64 (n,): class labels of those images
      stats.json             {"mean": [C floats], "std": [C floats], "count": 2 N T}: per-channel mean and
                             population std over every latent vector, flips included, computed in float64
      images.txt             'relative/path label' per image in cache order (a valid file_list)
      settings.json          what the extraction was started with; a resumed run must match it

A caption cache (format 2, "condition": "text", plus "text_length": L, "text_dim": D, "num_pairs": P) holds,
instead of the labels file, per shard:
      shard_XXXXX.text.npy        float16 (n, L, D): the caption's token embeddings from the frozen text tower,
                                  at the tower's padded length (SigLIP 2 attends to the padding: no mask needed)
      shard_XXXXX.text_length.npy int32 (n,): the caption's tokens before the padding (for models that mask it)
      shard_XXXXX.pairs.npy       int64 (n,): the pair index in the caption shards (caption_shards.py) of each row
Its shard k was planned for pairs [k * shard_size, ...) and holds those that decoded (a pair whose image or
caption is unusable is left out), so its "start" and "count" in the index are cache positions, counted once
every shard is written. At CC12M scale the embeddings dominate: 64 x 1152 float16 = 147 kB per caption.
The format-1 files are written exactly as before; a format-1 reader refuses a caption cache by its format.

Image i of a class cache is the i-th image of the sorted listing (fae_fast.data.images.list_images) once the
excluded files are removed. Shard k holds images [k * shard_size, min(N, (k + 1) * shard_size)).
A shard is written under '.tmp' names and renamed when complete (condition files first, latents last), so a
shard whose latents file exists is finished, and anything else is redone by a resumed run.

The statistics are a fixed-order reduction: per shard, float64 moments (count, mean, M2) over fixed
chunks merged with Chan's formula; then the shards' moments merged in shard order. Whoever computes a
shard, the numbers are the same, so 1 or 64 ranks give bit-identical stats.json.
"""
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fae_fast.config import DataConfig, LatentModel, TextGeneratorConfig

FORMATS = {"labels": 1, "text": 2}  # the format a cache of each condition kind is written in
FORMAT = FORMATS["labels"]
DTYPES = {"float16": np.float16, "float32": np.float32}
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_STATS_CHUNK = 256  # images per float64 chunk of the statistics (fixed: it is part of the reduction order)


# ----------------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """A per-image array stored beside the latents, in shard_XXXXX.<name>.npy of shape (n, *shape)."""

    shape: tuple[int, ...]
    dtype: type


@dataclass(frozen=True)
class Condition:
    """What a cache holds beside each image's latents."""

    kind: str
    """'labels' (class labels) or 'text' (caption token embeddings)."""
    columns: dict[str, Column]
    """The per-image arrays, by file name part."""
    may_skip: bool
    """A shard may hold fewer images than the items it was planned for (caption pairs that did not decode)."""
    items: str = "images"
    """What a writer's positions count, for messages: 'images' (cache positions) or 'pairs'."""


LABELS = Condition("labels", {"labels": Column((), np.int64)}, may_skip=False)


def text_condition(text_length: int, text_dim: int) -> Condition:
    """Caption token embeddings (L, D) float16, the caption's length before padding, and the pair index."""
    columns = {"text": Column((text_length, text_dim), np.float16), "text_length": Column((), np.int32),
               "pairs": Column((), np.int64)}
    return Condition("text", columns, may_skip=True, items="pairs")


def condition_of(index: dict) -> Condition:
    """The condition an index (or a writer's metadata) describes; no "condition" key means class labels."""
    kind = index.get("condition", "labels")
    if kind == "text":
        return text_condition(index["text_length"], index["text_dim"])
    if kind != "labels":
        raise ValueError(f"cache condition {kind!r} is not one of {', '.join(FORMATS)}; the index is corrupt or "
                         f"from a newer version")
    return LABELS


@dataclass(frozen=True)
class Shard:
    k: int
    start: int
    count: int

    @property
    def file(self) -> str:
        return f"shard_{self.k:05d}.npy"

    @property
    def labels(self) -> str:
        return self.column_file("labels")

    def column_file(self, name: str) -> str:
        return f"shard_{self.k:05d}.{name}.npy"

    def entry(self, condition: Condition = LABELS) -> dict:
        columns = {name: self.column_file(name) for name in condition.columns}
        return {"file": self.file, **columns, "start": self.start, "count": self.count}


def plan_shards(num_images: int, shard_size: int) -> list[Shard]:
    """Shard k holds images [k * shard_size, ...): the last one is short."""
    return [Shard(k, s, min(shard_size, num_images - s)) for k, s in enumerate(range(0, num_images, shard_size))]


def _fsync_rename(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def write_json(path: Path, value: dict) -> None:
    """Write JSON atomically (temp file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    _fsync_rename(tmp, path)


def check_settings(folder: Path, settings: dict) -> None:
    """Record what a cache is started with in folder/settings.json, or, when it is there, check that this run
    (a resumption) has the same: shards planned with another shard_size or models must not be mixed."""
    path = Path(folder) / "settings.json"
    if not path.is_file():
        write_json(path, settings)
        return
    saved = json.loads(path.read_text())
    changed = [k for k in settings if saved.get(k) != settings[k]]
    if changed:
        k = changed[0]
        raise ValueError(f"{folder} holds latents extracted with {k}={saved.get(k)!r}, this run has {settings[k]!r}; "
                         f"pass a new --out folder, or delete {folder} to start over")


def shard_rows(folder: Path, shard: Shard, tokens: int, channels: int, flips: bool = True,
               condition: Condition = LABELS) -> int | None:
    """Rows of a renamed (hence complete) shard whose files all exist with consistent shapes, else None."""
    try:
        x = np.load(Path(folder) / shard.file, mmap_mode="r")
        columns = {name: np.load(Path(folder) / shard.column_file(name), mmap_mode="r") for name in condition.columns}
    except (ValueError, OSError, EOFError):
        return None
    n = x.shape[0]
    if x.shape != (n, 2 if flips else 1, tokens, channels) or n > shard.count:
        return None
    if any(columns[name].shape != (n, *column.shape) for name, column in condition.columns.items()):
        return None
    return n


def shard_done(folder: Path, shard: Shard, tokens: int, channels: int, flips: bool = True,
               condition: Condition = LABELS) -> bool:
    """True when the shard's files exist with the expected shapes (a renamed, hence complete, shard): all of
    its images, or for a condition that may skip them, at most that many."""
    rows = shard_rows(folder, shard, tokens, channels, flips, condition)
    return rows is not None and (rows == shard.count or condition.may_skip)


def _ranges(indices: np.ndarray, most: int = 8) -> str:
    """'3, 10-19, 40' for sorted indices, the first `most` runs."""
    if len(indices) == 0:
        return ""
    breaks = np.flatnonzero(np.diff(indices) != 1)
    starts, ends = np.r_[indices[0], indices[breaks + 1]], np.r_[indices[breaks], indices[-1]]
    runs = [f"{a}" if a == b else f"{a}-{b}" for a, b in zip(starts[:most], ends[:most])]
    more = f" and {len(starts) - most} more runs" if len(starts) > most else ""
    return ", ".join(runs) + more


def check_coverage(num_images: int, spans: list[tuple[int, int]]) -> None:
    """Raise naming the indices of 0..N-1 that the (start, count) spans miss or cover more than once."""
    diff = np.zeros(num_images + 1, dtype=np.int64)
    for start, count in spans:
        if start < 0 or start + count > num_images:
            raise ValueError(f"a shard holds images {start}-{start + count - 1}, outside 0-{num_images - 1}")
        diff[start] += 1
        diff[start + count] -= 1
    cover = np.cumsum(diff[:-1])
    missing, twice = np.flatnonzero(cover == 0), np.flatnonzero(cover > 1)
    if len(missing) or len(twice):
        parts = []
        if len(missing):
            parts.append(f"{len(missing)} images missing ({_ranges(missing)})")
        if len(twice):
            parts.append(f"{len(twice)} images present more than once ({_ranges(twice)})")
        raise ValueError(f"the latent cache does not hold every image exactly once: {'; '.join(parts)}")


# ----------------------------------------------------------------------------------------------------
# Writing one shard
# ----------------------------------------------------------------------------------------------------
class ShardWriter:
    """Fills one shard batch by batch in temporary memory-mapped files; `finish()` checks that every image
    came exactly once (or, where the condition allows it, was skipped), leaves the skipped ones out, then
    renames the condition's files and, last, the latents into place."""

    def __init__(self, folder: Path, shard: Shard, tokens: int, channels: int, condition: Condition = LABELS):
        self.folder, self.shard, self.condition = Path(folder), shard, condition
        columns = {"latents": Column((2, tokens, channels), np.float16), **condition.columns}
        self.files = {"latents": shard.file, **{name: shard.column_file(name) for name in condition.columns}}
        self.arrays = {name: np.lib.format.open_memmap(self._tmp(name), mode="w+", dtype=column.dtype,
                                                       shape=(shard.count, *column.shape))
                       for name, column in columns.items()}
        self.seen = np.zeros(shard.count, dtype=np.int64)
        self.skipped = np.zeros(shard.count, dtype=bool)

    def _tmp(self, name: str) -> Path:
        return self.folder / (self.files[name] + ".tmp")

    def _local(self, positions: np.ndarray) -> np.ndarray:
        local = positions - self.shard.start
        outside = positions[(local < 0) | (local >= self.shard.count)]
        if len(outside):
            raise ValueError(f"{self.condition.items} {_ranges(np.sort(outside))} do not belong to shard "
                             f"{self.shard.k} ({self.condition.items} {self.shard.start}-"
                             f"{self.shard.start + self.shard.count - 1})")
        return local

    def write(self, positions: np.ndarray, latents: np.ndarray, labels: np.ndarray | None = None,
              **columns: np.ndarray) -> None:
        """positions (n,) cache indices inside this shard (a caption cache: pair indices); latents (n, 2, T, C);
        the condition's columns by name: labels (n,), or text (n, L, D), text_length (n,) and pairs (n,)."""
        values = {"latents": latents, **({} if labels is None else {"labels": labels}), **columns}
        if values.keys() != self.arrays.keys():
            raise TypeError(f"shard {self.shard.k} stores {', '.join(self.arrays)}; got {', '.join(values)}")
        local = self._local(positions)
        for name, value in values.items():
            self._check_finite(name, positions, value)
        np.add.at(self.seen, local, 1)
        for name, value in values.items():
            self.arrays[name][local] = value

    def _check_finite(self, name: str, positions: np.ndarray, value: np.ndarray) -> None:
        if not np.issubdtype(value.dtype, np.floating) or np.isfinite(value).all():
            return
        bad = np.sort(positions[~np.isfinite(value).reshape(len(positions), -1).all(1)])
        source = "the FAE weights" if name == "latents" else "the text tower's weights"
        raise FloatingPointError(f"{name} of {self.condition.items} {_ranges(bad)} are not finite (NaN, or beyond "
                                 f"float16's range); check {source}")

    def skip(self, positions: np.ndarray) -> None:
        """Mark items left out (an image that does not decode, an empty caption): accounted for, not stored."""
        if not self.condition.may_skip:
            raise ValueError(f"a {self.condition.kind} cache holds every image; a shard cannot skip "
                             f"{self.condition.items} {_ranges(np.sort(positions))}")
        local = self._local(positions)
        np.add.at(self.seen, local, 1)
        self.skipped[local] = True

    def finish(self) -> None:
        missing, twice = np.flatnonzero(self.seen == 0), np.flatnonzero(self.seen > 1)
        if len(missing) or len(twice):
            s, items = self.shard.start, self.condition.items
            raise RuntimeError(f"shard {self.shard.k} got no latent for {items} {_ranges(missing + s)} and more than "
                               f"one for {items} {_ranges(twice + s)}; the loader skipped or repeated files")
        for array in self.arrays.values():
            array.flush()
        names = [*self.arrays][1:] + ["latents"]  # latents last: their presence marks the shard done
        self.arrays.clear()  # unmapped before the files are rewritten or renamed
        keep = np.flatnonzero(~self.skipped)
        for name in names:
            if len(keep) < self.shard.count:
                keep_rows(self._tmp(name), keep)
            _fsync_rename(self._tmp(name), self.folder / self.files[name])


def keep_rows(path: Path, keep: np.ndarray, chunk: int = 256) -> None:
    """Rewrite the .npy file `path` with only its rows `keep` (sorted), chunk by chunk (bounded memory)."""
    source = np.load(path, mmap_mode="r")
    part = path.with_name(path.name + ".part")
    kept = np.lib.format.open_memmap(part, mode="w+", dtype=source.dtype, shape=(len(keep), *source.shape[1:]))
    for s in range(0, len(keep), chunk):
        kept[s:s + chunk] = source[keep[s:s + chunk]]
    kept.flush()
    del source, kept
    os.replace(part, path)


# ----------------------------------------------------------------------------------------------------
# Statistics: float64 moments in a fixed order
# ----------------------------------------------------------------------------------------------------
def merge_moments(a: tuple, b: tuple) -> tuple:
    """Chan et al.'s parallel merge of (count, mean (C,), M2 (C,)) pairs, float64."""
    na, ma, m2a = a
    nb, mb, m2b = b
    if na == 0:
        return b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + delta * delta * (na * nb / n)


def shard_moments(path: Path) -> tuple:
    """(count, mean (C,), M2 (C,)) of every latent vector of one shard file, float64, fixed chunks."""
    x = np.load(path, mmap_mode="r")  # (n, 2, T, C)
    C = x.shape[-1]
    acc = (0, np.zeros(C), np.zeros(C))
    for s in range(0, x.shape[0], _STATS_CHUNK):
        chunk = np.asarray(x[s:s + _STATS_CHUNK], dtype=np.float64).reshape(-1, C)
        mean = chunk.mean(0)
        acc = merge_moments(acc, (chunk.shape[0], mean, np.square(chunk - mean).sum(0)))
    return acc


def combine_stats(moments: list[tuple]) -> dict:
    """stats.json content from per-shard moments given in shard order."""
    acc = moments[0]
    for m in moments[1:]:
        acc = merge_moments(acc, m)
    n, mean, m2 = acc
    return {"mean": mean.tolist(), "std": np.sqrt(m2 / n).tolist(), "count": int(n)}


def finish_cache(folder: Path, plan: list[Shard], meta: dict, moments: list[tuple]) -> dict:
    """Check that the shards on disk hold images 0..N-1 exactly once, write stats.json from the shards'
    moments (in shard order), then index.json, last. Returns the index.

    A caption cache (meta["condition"] == "text") counts its images here: shard k starts where shard k - 1
    ends, whatever pairs its source range left out."""
    folder, condition = Path(folder), condition_of(meta)
    rows = [np.load(folder / s.file, mmap_mode="r").shape[0] for s in plan]
    if condition.may_skip:
        starts = np.r_[0, np.cumsum(rows)[:-1]].tolist()
        meta = {**meta, "num_images": int(sum(rows))}
    else:
        starts = [s.start for s in plan]
    check_coverage(meta["num_images"], list(zip(starts, rows)))
    write_json(folder / "stats.json", combine_stats(moments))
    shards = [Shard(s.k, int(start), int(n)).entry(condition) for s, start, n in zip(plan, starts, rows)]
    index = {**meta, "format": FORMATS[condition.kind], "shards": shards, "stats": "stats.json", "complete": True}
    write_json(folder / "index.json", index)
    return index


def write_cache(folder: str | Path, latents: np.ndarray, labels: np.ndarray, *, shard_size: int, **meta) -> dict:
    """A complete cache from arrays in memory: latents (N, 2, T, C), labels (N,) (small data sets, tests)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    N, _, T, C = latents.shape
    plan = plan_shards(N, shard_size)
    for s in plan:
        writer = ShardWriter(folder, s, T, C)
        rows = np.arange(s.start, s.start + s.count)
        writer.write(rows, latents[rows].astype(np.float16), labels[rows])
        writer.finish()
    meta = {"num_images": N, "tokens": T, "channels": C, "dtype": "float16", "flips": True, "shard_size": shard_size,
            "encoder": "", "fae": "", **meta}
    return finish_cache(folder, plan, meta, [shard_moments(folder / s.file) for s in plan])


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------
def read_index(folder: str | Path) -> dict:
    """index.json of a complete cache; anything else raises one sentence saying how to finish it."""
    path = Path(folder) / "index.json"
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"latent cache folder {str(folder)!r} does not exist; set data.path to the --out "
                                f"folder of training/extract_latents.py")
    index = json.loads(path.read_text()) if path.is_file() else {}
    if index.get("complete") is not True:
        raise ValueError(f"{str(folder)!r} is not a complete latent cache (no index.json marked complete); run "
                         f"training/extract_latents.py with --out {folder} again to finish it (it resumes)")
    kind = index.get("condition", "labels")
    if index.get("format") != FORMATS.get(kind):
        readable = ", ".join(f"{number} ({name})" for name, number in FORMATS.items())
        raise ValueError(f"{path} has cache format {index.get('format')!r} for condition {kind!r}, this code reads "
                         f"formats {readable}; extract the latents again with this version")
    if index.get("dtype") not in DTYPES:
        raise ValueError(f"{path} says dtype {index.get('dtype')!r}, not one of {', '.join(DTYPES)}; the index is "
                         f"corrupt or from another program")
    return index


class LatentCache:
    """Memory-mapped shards, the images' conditions and per-channel stats of a complete cache. The condition's
    per-image scalars (labels; or caption lengths and pair indices) are read whole into `scalars` (N,); a
    caption cache's token embeddings stay memory-mapped per shard."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        ix = self.index
        self.num_images, self.tokens, self.channels = ix["num_images"], ix["tokens"], ix["channels"]
        self.flips = bool(ix["flips"])
        self.condition = condition_of(ix)
        self.shards = [self._open(s["file"], mmap_mode="r") for s in ix["shards"]]
        self.starts = np.array([s["start"] for s in ix["shards"]], dtype=np.int64)
        self.columns = {name: [self._open(s[name], mmap_mode="r") for s in ix["shards"]]
                        for name in self.condition.columns}
        self._check_files()
        self.scalars = {name: np.concatenate(parts) for name, parts in self.columns.items()
                        if self.condition.columns[name].shape == ()}
        self.mean, self.std = self._read_stats()

    @property
    def labels(self) -> np.ndarray:
        """Class labels (N,) int64 of a class cache."""
        if "labels" not in self.scalars:
            raise ValueError(f"latent cache {str(self.folder)!r} holds caption embeddings, not class labels; use a "
                             f"cache extracted from a class-labelled image folder")
        return self.scalars["labels"]

    def redo_hint(self, file: str) -> str:
        return (f"delete {self.folder / file} and {self.folder / 'index.json'}, then run training/extract_latents.py "
                f"with --out {self.folder} again (it redoes missing shards only)")

    def _open(self, file: str, **kwargs) -> np.ndarray:
        """np.load of one shard or label file, or one sentence naming the file and the fix."""
        try:
            return np.load(self.folder / file, **kwargs)
        except (ValueError, OSError, EOFError) as err:
            reason = str(err).split(". ")[0][:120]
            raise ValueError(f"latent cache file {self.folder / file} cannot be read ({reason}); it is damaged: "
                             f"{self.redo_hint(file)}") from None

    def shard_of(self, image: int) -> str:
        """The shard file holding an image's latents."""
        return self.index["shards"][int(np.searchsorted(self.starts, image, side="right")) - 1]["file"]

    def _check_files(self) -> None:
        want = (2 if self.flips else 1, self.tokens, self.channels)
        for k, (s, x) in enumerate(zip(self.index["shards"], self.shards)):
            if x.shape != (s["count"], *want) or x.dtype != DTYPES[self.index["dtype"]]:
                raise ValueError(f"{self.folder / s['file']} holds {x.dtype} {x.shape}, the index says "
                                 f"{self.index['dtype']} {(s['count'], *want)}; extract this cache again")
            for name, column in self.condition.columns.items():
                a = self.columns[name][k]
                if a.shape != (s["count"], *column.shape) or a.dtype != column.dtype:
                    expected = f"{np.dtype(column.dtype)} {(s['count'], *column.shape)}"
                    raise ValueError(f"{self.folder / s[name]} holds {a.dtype} {a.shape}, the index says {expected}; "
                                     f"{self.redo_hint(s[name])}")
        check_coverage(self.num_images, [(s["start"], s["count"]) for s in self.index["shards"]])

    def _read_stats(self) -> tuple[np.ndarray, np.ndarray]:
        path = self.folder / "stats.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; run training/extract_latents.py with --out {self.folder} "
                                    f"again to write it")
        stats = json.loads(path.read_text())
        mean, std = np.array(stats["mean"], np.float64), np.array(stats["std"], np.float64)
        if mean.shape != (self.channels,) or std.shape != (self.channels,) or not (std > 0).all():
            raise ValueError(f"{path} does not hold {self.channels} channel means and positive stds; extract "
                             f"this cache again")
        return mean, std

    def _by_shard(self, images: np.ndarray):
        """(shard k, rows of `images` in it, their indices inside the shard) per shard, each shard's indices
        increasing, so that every shard is read in order by one fancy-indexing call."""
        order = np.argsort(images, kind="stable")
        sorted_images = images[order]
        shard_of = np.searchsorted(self.starts, sorted_images, side="right") - 1
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(images)]):
            k = shard_of[a]
            yield k, order[a:b], sorted_images[a:b] - self.starts[k]

    def gather(self, images: np.ndarray, flips: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Latents (B, T, C) of `images` (B,) (flipped twin where `flips`), in the cache's dtype."""
        images = np.asarray(images, dtype=np.int64)
        if out is None:
            out = np.empty((len(images), self.tokens, self.channels), dtype=DTYPES[self.index["dtype"]])
        for k, rows, local in self._by_shard(images):
            out[rows] = self.shards[k][local, flips[rows].astype(np.int64)]
        return out

    def text(self, images: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Caption token embeddings (B, L, D) float16 of `images` (B,) of a caption cache."""
        if self.condition.kind != "text":
            raise ValueError(f"latent cache {str(self.folder)!r} holds class labels, not caption embeddings; "
                             f"extract a caption cache (fae_fast/data/caption_cache.py)")
        images = np.asarray(images, dtype=np.int64)
        if out is None:
            out = np.empty((len(images), *self.condition.columns["text"].shape), dtype=np.float16)
        for k, rows, local in self._by_shard(images):
            out[rows] = self.columns["text"][k][local]
        return out


# ----------------------------------------------------------------------------------------------------
# The training source
# ----------------------------------------------------------------------------------------------------
def check_fits(cache: LatentCache, model: LatentModel) -> None:
    tokens = model.grid * model.grid
    if (cache.tokens, cache.channels) != (tokens, model.in_channels):
        raise ValueError(f"latent cache {str(cache.folder)!r} holds {cache.tokens} tokens x {cache.channels} "
                         f"channels per image but the generator expects {model.grid}x{model.grid}={tokens} tokens x "
                         f"{model.in_channels} channels; set --model.grid={int(round(cache.tokens ** 0.5))} "
                         f"--model.in_channels={cache.channels} or extract latents with an FAE of that shape")
    fits = {"labels": check_labels_fit, "text": check_text_fits}
    fits[cache.condition.kind](cache, model)


def check_labels_fit(cache: LatentCache, model: LatentModel) -> None:
    """A class cache fits a class-conditional generator with as many classes as its labels need."""
    if hasattr(model, "text_dim"):
        raise ValueError(f"latent cache {str(cache.folder)!r} holds class labels, but the generator is conditioned "
                         f"on captions; train it on a caption cache (fae_fast/data/caption_cache.py) or use a "
                         f"class-conditional recipe")
    labels = cache.labels
    if len(labels) and (labels.min() < 0 or labels.max() >= model.num_classes):
        raise ValueError(f"latent cache {str(cache.folder)!r} holds class labels {int(labels.min())}-"
                         f"{int(labels.max())} but the generator has {model.num_classes} classes; set "
                         f"--model.num_classes={int(labels.max()) + 1} (ImageNet: 1000)")


def check_text_fits(cache: LatentCache, model: TextGeneratorConfig) -> None:
    """A caption cache fits a text-conditioned generator whose caption shape is the cache's."""
    if not hasattr(model, "text_dim"):
        raise ValueError(f"latent cache {str(cache.folder)!r} holds caption embeddings, which only a "
                         f"text-conditioned generator takes; use a text recipe (TextGeneratorConfig, e.g. "
                         f"--recipe t2i-demo) or a class-labelled cache")
    length, width = cache.condition.columns["text"].shape
    if (length, width) != (model.text_length, model.text_dim):
        raise ValueError(f"latent cache {str(cache.folder)!r} holds captions of {length} tokens x {width} channels "
                         f"but the generator expects {model.text_length} x {model.text_dim}; set "
                         f"--model.text_length={length} --model.text_dim={width} or embed the captions with that "
                         f"text tower")


class LatentCacheSource:
    """This rank's share of each global batch, read from a latent cache (see latents.py for the API).

    Epoch e visits the images in a permutation seeded by (seed, e); global batch s of the epoch is its
    items [s * G, (s + 1) * G) (the N % G left over are dropped, different ones each epoch) and rank r
    takes the contiguous items [r * B, (r + 1) * B) of it. With random_flip the flipped twin is used
    where a coin seeded by (seed, e) comes up at the item's position. Everything is a function of the
    step, so a resumed run reads exactly the batches of an uninterrupted one. Latents come normalised
    with the cache's per-channel stats, (z - mean) / std, float32 on the device; the condition is the
    image's class label, or in a caption cache its caption's token embeddings (what TextEmbeddings takes).
    """

    def __init__(self, data: DataConfig, model: LatentModel, *, rank: int, world: int, device):
        self.cache = LatentCache(data.path)
        check_fits(self.cache, model)
        if data.random_flip and not self.cache.flips:
            raise ValueError(f"latent cache {data.path!r} holds no flipped twins; set --data.random_flip=false")
        N, G = self.cache.num_images, data.global_batch
        if G > N:
            raise ValueError(f"data.global_batch={G} is larger than the {N} images of {data.path!r}; use a smaller batch")
        self.seed, self.random_flip, self.global_batch = data.seed, data.random_flip, G
        self.local, self.rank, self.device = G // world, rank, torch.device(device)
        self.steps_per_epoch = N // G
        self.pin = self.device.type == "cuda"
        self.mean = torch.tensor(self.cache.mean, dtype=torch.float32, device=self.device)  # (C,)
        self.std = torch.tensor(self.cache.std, dtype=torch.float32, device=self.device)
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="latent-cache")
        self._ahead: tuple[int, object] | None = None
        self.next_step = 0

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(permutation (N,), flip coins (N,)) of an epoch; the last two are kept."""
        with self._lock:
            if epoch not in self._epochs:
                N = self.cache.num_images
                perm = np.random.default_rng([self.seed, epoch]).permutation(N)
                coins = np.random.default_rng([self.seed, epoch, 1]).random(N) < 0.5
                self._epochs = {e: v for e, v in self._epochs.items() if e >= epoch - 1}
                self._epochs[epoch] = (perm, coins & self.random_flip)
            return self._epochs[epoch]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, offset into the epoch's permutation) where global batch `step` starts."""
        return step // self.steps_per_epoch, (step % self.steps_per_epoch) * self.global_batch

    def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (images (B,), flipped (B,)) of a step."""
        epoch, offset = self.position(step)
        perm, coins = self._epoch(epoch)
        items = slice(offset + self.rank * self.local, offset + (self.rank + 1) * self.local)
        return perm[items], coins[items]

    def _host_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, flips = self.indices(step)
        x = torch.empty((self.local, self.cache.tokens, self.cache.channels), pin_memory=self.pin,
                        dtype=TORCH_DTYPES[self.cache.index["dtype"]])
        self.cache.gather(images, flips, out=x.numpy())
        finite = np.isfinite(x.numpy()).reshape(len(images), -1).all(1)  # read in the background: off the step
        if not finite.all():
            bad = int(images[np.argmin(finite)])
            file = self.cache.shard_of(bad)
            raise ValueError(f"the latents of image {bad} (step {step}) in {self.cache.folder / file} are NaN or inf: "
                             f"the latent cache is damaged, not the training; {self.cache.redo_hint(file)}")
        return x, self._host_condition(images)

    def _host_condition(self, images: np.ndarray) -> torch.Tensor:
        """Labels (B,) int64, or caption embeddings (B, L, D) float16, of `images`, pinned on CUDA."""
        if self.cache.condition.kind == "labels":
            y = torch.from_numpy(self.cache.labels[images])
            return y.pin_memory() if self.pin else y
        y = torch.empty((len(images), *self.cache.condition.columns["text"].shape), dtype=torch.float16,
                        pin_memory=self.pin)
        self.cache.text(images, out=y.numpy())
        return y

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) float32 normalised and the condition: y (B,) int64 labels, or (B, L, D) float32 caption
        embeddings; both on the device. The next step is read meanwhile."""
        ahead, self._ahead = self._ahead, None
        x, y = ahead[1].result() if ahead is not None and ahead[0] == step else self._host_batch(step)
        self._ahead = (step + 1, self._pool.submit(self._host_batch, step + 1))
        self.next_step = step + 1
        x = x.to(self.device, non_blocking=True).float()
        y = y.to(self.device, non_blocking=True)
        return x.sub_(self.mean).div_(self.std), (y.float() if y.is_floating_point() else y)

    def state_dict(self) -> dict:
        """Where the next batch starts (for inspection: batch(step) derives it from the step) and what it reads."""
        epoch, offset = self.position(self.next_step)
        return {"epoch": epoch, "position": offset, "num_images": self.cache.num_images, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if (int(state["num_images"]), int(state["seed"])) != (self.cache.num_images, self.seed):
            raise ValueError(f"the checkpoint's data position is for a cache of {int(state['num_images'])} images with "
                             f"data.seed={int(state['seed'])}; {str(self.cache.folder)!r} holds "
                             f"{self.cache.num_images} images with data.seed={self.seed}: resume on the same cache and seed")
        epoch, offset = int(state["epoch"]), int(state["position"])
        self.next_step = epoch * self.steps_per_epoch + offset // self.global_batch
