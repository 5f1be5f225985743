"""Image-caption pairs from WebDataset tar shards, in the layout img2dataset writes (CC12M, CC3M, LAION):

    /data/cc12m/00000.tar:  000000000.jpg  000000000.txt  000000000.json  000000001.jpg  ...

A pair is the members that share a key, the member's name up to the first dot of its base name (WebDataset's
grouping): its image (.jpg, .jpeg, .png or .webp) and its caption (.txt, UTF-8); the .json is not read.
Shards are given as a folder (every *.tar in it), a glob (/data/cc12m/*.tar) or a brace pattern
(/data/cc12m/{00000..01242}.tar, WebDataset's spelling) and read in that order (a folder or a glob sorted by
name), the members of a shard in their order in the tar. Pair i is the i-th complete pair in that order: a
stable index, whatever the number of ranks. A key without an image or a caption is left out of the
numbering and reported once, naming the key and the shard, when the shards are indexed; an image that does
not decode or an empty caption is reported the same way when read, and its pair skipped.

Indexing reads the tar headers only (tarfile seeks past the data) and keeps each member's offset and size,
so reading a pair is two seeks and two reads: any pair can be read on its own, and a rank reads its share
without going through the others'. Only the standard library's tarfile: no WebDataset dependency.
Images are decoded by the reference decoder (fae_fast.data.backends.decode_reference: PIL, ADM centre crop)
on a thread pool.
"""
import collections
import glob
import re
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fae_fast.data.backends import decode_reference

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the first present is the pair's image
CAPTION_EXTENSION = "txt"
_BLOCK = tarfile.BLOCKSIZE
_BRACE = re.compile(r"\{([^{}]*)\}")
_EXAMPLES = "a folder of .tar shards, a glob such as /data/cc12m/*.tar or a brace pattern such as " \
            "/data/cc12m/{00000..01242}.tar"


class SkippedPairWarning(UserWarning):
    """An image-caption pair was left out: no caption, no image, or an image that does not decode."""


# ----------------------------------------------------------------------------------------------------
# Which shards
# ----------------------------------------------------------------------------------------------------
def expand_braces(pattern: str) -> list[str]:
    """Every {a..b} (a numeric range, zero-padded to a's width when a starts with 0) and {x,y} (alternatives)
    of `pattern` expanded, left to right, as WebDataset's brace patterns are."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    if ".." in body:
        low, high = body.split("..", 1)
        if not (low.isdigit() and high.isdigit()):
            raise ValueError(f"{pattern!r}: {{{body}}} is not a numeric range such as {{00000..00099}}")
        width = len(low) if low.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(low), int(high) + 1)]
    else:
        options = body.split(",")
    return [path for option in options for path in expand_braces(head + option + tail)]


def list_shards(spec: str) -> list[Path]:
    """The shard files `spec` names (see the module docstring), in reading order; one sentence naming the
    path and the fix when there are none."""
    if not spec:
        raise ValueError(f"no caption shards given; pass {_EXAMPLES}")
    if "{" in spec:
        paths = [Path(p) for p in expand_braces(spec)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of the {len(paths)} shards {spec!r} names do not exist (first: "
                                    f"{missing[0]}); fix the range, or fetch the missing shards again")
        return paths
    if any(c in spec for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())
        if not paths:
            raise FileNotFoundError(f"no file matches {spec!r}; pass {_EXAMPLES}")
        return paths
    path = Path(spec)
    if path.suffix == ".tar" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"caption shard {path} does not exist; pass {_EXAMPLES}")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"caption shard folder {path} does not exist; pass the output folder of "
                                f"img2dataset, or {_EXAMPLES}")
    paths = sorted(p for p in path.glob("*.tar") if p.is_file())
    if not paths:
        raise FileNotFoundError(f"no .tar shards in {path}; pass the folder img2dataset wrote with "
                                f"output_format=webdataset, or {_EXAMPLES}")
    return paths


# ----------------------------------------------------------------------------------------------------
# Indexing one shard: the headers only
# ----------------------------------------------------------------------------------------------------
@dataclass
class ShardIndex:
    """The complete pairs of one shard, in member order, and the keys left out."""

    keys: list[str]
    image_spans: np.ndarray
    """(n, 2) int64: (offset, size) of each pair's image bytes in the tar."""
    caption_spans: np.ndarray
    """(n, 2) int64: (offset, size) of each pair's caption bytes."""
    incomplete: list[tuple[str, str]]
    """(key, reason) of the keys without an image or a caption."""


def split_key(name: str) -> tuple[str, str]:
    """('dir/000000001', 'jpg') for 'dir/000000001.jpg': the key ends at the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def damaged_shard(path: Path, reason: str) -> ValueError:
    return ValueError(f"caption shard {path} is damaged or not an uncompressed tar ({reason}); fetch it again, "
                      f"or leave it out of the shard list")


def _check_end(path: Path, tar: tarfile.TarFile, members: list[tarfile.TarInfo]) -> None:
    """tarfile stops quietly at a cut or overwritten header; a whole archive ends with zero blocks there."""
    tar.fileobj.seek(tar.offset)
    end = tar.fileobj.read(_BLOCK)
    if len(end) < _BLOCK or any(end):
        after = f"after member {members[-1].name}" if members else "at its start"
        raise damaged_shard(path, f"the archive is cut short or overwritten {after}")


def member_groups(path: Path) -> dict[str, dict[str, tarfile.TarInfo]]:
    """{key: {extension: member}} of a shard's regular files, keys in member order."""
    try:
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
            _check_end(path, tar, members)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise damaged_shard(path, f"{type(err).__name__}: {err}") from None
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    for member in members:
        if member.isfile():
            key, extension = split_key(member.name)
            groups.setdefault(key, {}).setdefault(extension, member)
    return groups


def _missing(image, caption) -> str:
    if image is None and caption is None:
        return f"no image ({'/'.join(IMAGE_EXTENSIONS)}) and no caption (.{CAPTION_EXTENSION})"
    return f"no caption (.{CAPTION_EXTENSION})" if caption is None else f"no image ({'/'.join(IMAGE_EXTENSIONS)})"


def index_shard(path: Path) -> ShardIndex:
    """The pairs of one shard from its headers."""
    keys, images, captions, incomplete = [], [], [], []
    for key, members in member_groups(path).items():
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        caption = members.get(CAPTION_EXTENSION)
        if image is None or caption is None:
            incomplete.append((key, _missing(image, caption)))
            continue
        keys.append(key)
        images.append((image.offset_data, image.size))
        captions.append((caption.offset_data, caption.size))
    spans = [np.array(x, dtype=np.int64).reshape(-1, 2) for x in (images, captions)]
    return ShardIndex(keys, *spans, incomplete)


# ----------------------------------------------------------------------------------------------------
# The pairs of all shards
# ----------------------------------------------------------------------------------------------------
@dataclass
class CaptionBatch:
    """Decoded pairs of one batch, in the order asked for."""

    indices: np.ndarray
    """(n,) int64 pair indices of the pairs that decoded."""
    pixels: torch.Tensor
    """(n, 3, S, S) uint8 ADM centre crops, on the CPU."""
    captions: list[str]
    skipped: np.ndarray
    """Pair indices of the batch that were left out (image does not decode, empty caption)."""


class CaptionShards:
    """The image-caption pairs of a list of shards, indexed once (headers only, `workers` shards at a time).
    `skipped` maps 'shard:key' to why the pair was left out; each is reported once as a SkippedPairWarning."""

    def __init__(self, spec: str, *, workers: int = 8):
        self.spec, self.shards = spec, list_shards(spec)
        self.skipped: dict[str, str] = {}
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="caption-index") as pool:
            indexes = list(pool.map(index_shard, self.shards))
        for path, index in zip(self.shards, indexes):
            for key, reason in index.incomplete:
                self._report(path, key, reason)
        self.shard_of = np.concatenate([np.full(len(ix.keys), k, np.int32) for k, ix in enumerate(indexes)])
        self.keys = np.array([key.encode() for ix in indexes for key in ix.keys], dtype=bytes)
        self.image_spans = np.concatenate([ix.image_spans for ix in indexes])
        self.caption_spans = np.concatenate([ix.caption_spans for ix in indexes])
        if not len(self):
            raise ValueError(f"the {len(self.shards)} shards of {spec!r} hold no image-caption pairs (keys with "
                             f"an image and a .{CAPTION_EXTENSION} caption); check that they are img2dataset output")

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, index: int) -> str:
        return self.keys[index].decode()

    def shard(self, index: int) -> Path:
        """The shard file holding pair `index`."""
        return self.shards[self.shard_of[index]]

    def for_rank(self, rank: int, world: int) -> np.ndarray:
        """Pair indices of rank `rank` of `world`: the pairs of every world-th shard (shard k to rank k % world),
        in order, so that each rank reads whole shards front to back."""
        return np.flatnonzero(self.shard_of % world == rank)

    def _report(self, shard: Path, key: str, reason: str) -> None:
        name = f"{shard}:{key}"
        if name in self.skipped:
            return
        self.skipped[name] = reason
        warnings.warn(f"skipped pair {key} of {shard}: {reason} ({len(self.skipped)} skipped so far)",
                      SkippedPairWarning, stacklevel=3)

    def read(self, index: int) -> tuple[bytes, bytes]:
        """The image file's bytes and the caption file's bytes of pair `index`."""
        path = self.shard(index)
        with open(path, "rb") as f:
            parts = []
            for offset, size in (self.image_spans[index], self.caption_spans[index]):
                f.seek(offset)
                parts.append(f.read(size))
                if len(parts[-1]) != size:
                    raise damaged_shard(path, f"it ends inside pair {self.key(index)}, which it held when indexed")
        return parts[0], parts[1]

    def load(self, index: int, image_size: int) -> tuple[np.ndarray | None, str, str | None]:
        """(ADM crop (S, S, 3) uint8, caption, None) of pair `index`, or (None, '', why it is unusable)."""
        image, caption = self.read(index)
        try:
            text = caption.decode("utf-8").strip()
        except UnicodeDecodeError:
            return None, "", "the caption is not UTF-8"
        if not text:
            return None, "", "empty caption"
        try:
            return decode_reference(image, image_size), text, None
        except Exception as err:  # noqa: BLE001 - any failure is reported with the pair's key and shard
            return None, "", f"the image does not decode ({type(err).__name__}: {err})"

    def batches(self, indices: np.ndarray, *, batch_size: int, image_size: int, workers: int = 8,
                ahead: int = 2):
        """CaptionBatch per `batch_size` of `indices`, in order; `workers` threads decode the pairs of the next
        `ahead` batches meanwhile. Unusable pairs are reported and listed in their batch's `skipped`."""
        indices = np.asarray(indices, dtype=np.int64)
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="caption-read") as pool:
            pending = collections.deque()
            for s in range(0, len(indices), batch_size):
                chunk = indices[s:s + batch_size]
                pending.append((chunk, [pool.submit(self.load, int(i), image_size) for i in chunk]))
                if len(pending) > ahead:
                    yield self._collect(*pending.popleft(), image_size)
            while pending:
                yield self._collect(*pending.popleft(), image_size)

    def _collect(self, chunk: np.ndarray, futures: list, image_size: int) -> CaptionBatch:
        crops, captions, kept, skipped = [], [], [], []
        for index, future in zip(chunk, futures):
            crop, caption, reason = future.result()
            if reason is not None:
                self._report(self.shard(index), self.key(index), reason)
                skipped.append(index)
                continue
            crops.append(crop)
            captions.append(caption)
            kept.append(index)
        pixels = np.stack(crops) if crops else np.zeros((0, image_size, image_size, 3), np.uint8)
        return CaptionBatch(np.array(kept, dtype=np.int64), torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),
                            captions, np.array(skipped, dtype=np.int64))
