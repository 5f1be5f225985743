"""Decoding backends: each turns a list of batches of image indices into ADM crops on the device.

`backend.batches(plan)` yields one RawBatch per batch of the plan, in order: the indices it decoded,
their (n, 3, S, S) uint8 crops on the device, and (index, reason) for each file it could not decode.

- PilBackend: PIL in DataLoader worker processes (the reference; any machine).
- AcceleratedBackend: threads read the files and sniff their headers; plain colour and gray JPEGs go to
  a batched decoder (torchvision's nvjpeg decode here, DALI in dali.py); the odd files (CMYK, PNG
  named .JPEG, other formats, JPEGs without an end marker) go to the PIL reference on a thread. A batch
  the fast decoder rejects is retried file by file, and a file it rejects alone is tried with PIL, so
  one corrupt file costs neither its batch nor its name.
"""
import collections
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fae_fast.data.decode import Sniff, adm_crop_pil, adm_crop_torch, open_rgb, sniff

log = logging.getLogger(__name__)


@dataclass
class RawBatch:
    indices: np.ndarray
    """(n,) int64 global indices of the decoded images."""
    pixels: torch.Tensor
    """(n, 3, S, S) uint8 ADM crops on the device."""
    failures: list[tuple[int, str]]
    """(index, reason) of the files of this batch that could not be read or decoded."""


def _describe(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".strip().rstrip(":")


def decode_reference(data, size: int) -> np.ndarray:
    """PIL decode + ADM crop of one file's bytes: (size, size, 3) uint8; raises on a bad file."""
    return adm_crop_pil(open_rgb(data), size)


# ----------------------------------------------------------------------------------------------------
# PIL in DataLoader workers
# ----------------------------------------------------------------------------------------------------
class _PilDataset(Dataset):
    def __init__(self, images, size: int):
        self.images, self.size = images, size

    def __getitem__(self, index: int):
        try:
            with open(self.images.path(index), "rb") as f:
                return index, decode_reference(f.read(), self.size), None
        except Exception as e:  # noqa: BLE001 - any failure is reported with the file's name
            return index, None, _describe(e)

    def __len__(self) -> int:
        return len(self.images)


def _collate(items, *, size: int):
    """Runs in the worker: (indices (n,), crops (n, 3, S, S) uint8, failures) of one batch."""
    ok = [(i, a) for i, a, _ in items if a is not None]
    failures = [(i, r) for i, a, r in items if a is None]
    indices = np.array([i for i, _ in ok], dtype=np.int64)
    arrays = np.stack([a for _, a in ok]) if ok else np.zeros((0, size, size, 3), np.uint8)
    return torch.from_numpy(indices), torch.from_numpy(np.ascontiguousarray(arrays.transpose(0, 3, 1, 2))), failures


class _PlanSampler:
    """The batch sampler of a persistent DataLoader: yields whatever plan it was last given."""

    def __init__(self):
        self.plan: list[np.ndarray] = []

    def __iter__(self):
        return iter([b.tolist() for b in self.plan])

    def __len__(self) -> int:
        return len(self.plan)


class PilBackend:
    name = "pil"

    def __init__(self, images, *, size: int, workers: int, device: torch.device):
        self.device, self.sampler = device, _PlanSampler()
        self.loader = DataLoader(_PilDataset(images, size), batch_sampler=self.sampler,
                                 collate_fn=functools.partial(_collate, size=size),
                                 num_workers=workers, pin_memory=device.type == "cuda",
                                 persistent_workers=workers > 0)

    def batches(self, plan: list[np.ndarray]):
        self.sampler.plan = plan
        for indices, pixels, failures in self.loader:
            yield RawBatch(indices.numpy(), pixels.to(self.device, non_blocking=True), failures)


# ----------------------------------------------------------------------------------------------------
# Batched fast decoders with a PIL fallback
# ----------------------------------------------------------------------------------------------------
@dataclass
class _Item:
    index: int
    data: np.ndarray | None
    sniff: Sniff | None
    error: str | None


def _read(images, index: int) -> _Item:
    try:
        data = np.fromfile(images.path(index), dtype=np.uint8)
        return _Item(index, data, sniff(data), None)
    except Exception as e:  # noqa: BLE001
        return _Item(index, None, None, _describe(e))


def _read_ahead(plan, read, pool: ThreadPoolExecutor, depth: int = 2):
    """Lists of read items per batch; the files of the next `depth` batches are read meanwhile."""
    pending = collections.deque()
    for batch in plan:
        pending.append([pool.submit(read, int(i)) for i in batch])
        if len(pending) > depth:
            yield [f.result() for f in pending.popleft()]
    while pending:
        yield [f.result() for f in pending.popleft()]


class AcceleratedBackend:
    """Reader threads + a batched decoder (`decoder.accepts(sniff)`, `decoder.decode(datas, sniffs)`
    -> (n, 3, S, S) uint8 on the device, raising when any file fails; `decoder.reset()` after a failure)."""

    def __init__(self, images, decoder, *, size: int, workers: int, device: torch.device):
        self.images, self.decoder, self.size = images, decoder, size
        self.workers, self.device = max(1, workers), device
        self.name = decoder.name

    def batches(self, plan: list[np.ndarray]):
        with ThreadPoolExecutor(self.workers, thread_name_prefix="fae-read") as pool:
            for items in _read_ahead(plan, lambda i: _read(self.images, i), pool):
                yield self._decode(items, pool)

    def _decode(self, items: list[_Item], pool: ThreadPoolExecutor) -> RawBatch:
        S = self.size
        out = torch.empty((len(items), 3, S, S), dtype=torch.uint8, device=self.device)
        readable = [k for k, it in enumerate(items) if it.error is None]
        fast = [k for k in readable if self.decoder.accepts(items[k].sniff)]
        odd = [k for k in readable if not self.decoder.accepts(items[k].sniff)]
        rejected = self._decode_fast(items, fast, out)
        errors = {k: it.error for k, it in enumerate(items) if it.error is not None}
        errors.update(self._decode_slow(items, odd, rejected, out, pool))
        keep = [k for k in range(len(items)) if k not in errors]
        indices = np.array([items[k].index for k in keep], dtype=np.int64)
        return RawBatch(indices, out[keep], [(items[k].index, r) for k, r in sorted(errors.items())])

    def _decode_fast(self, items: list[_Item], fast: list[int], out: torch.Tensor) -> list[int]:
        """Decode `fast` into out as one batch; on failure file by file. Returns those left for PIL."""
        if not fast:
            return []
        try:
            out[fast] = self.decoder.decode([items[k].data for k in fast], [items[k].sniff for k in fast])
            return []
        except Exception:  # noqa: BLE001 - which file failed is found below
            self.decoder.reset()
        rejected = []
        for k in fast:
            try:
                out[k] = self.decoder.decode([items[k].data], [items[k].sniff])[0]
            except Exception:  # noqa: BLE001 - PIL decides whether the file is bad
                self.decoder.reset()
                rejected.append(k)
        return rejected

    def _decode_slow(self, items, odd: list[int], rejected: list[int], out: torch.Tensor, pool) -> dict[int, str]:
        """PIL decodes the odd files and those the fast decoder rejected; returns {position: reason}
        for the files PIL cannot decode either."""
        def one(k):
            try:
                return k, decode_reference(items[k].data, self.size), None
            except Exception as e:  # noqa: BLE001
                return k, None, _describe(e)

        errors = {}
        for k, array, reason in pool.map(one, odd + rejected):
            if array is None:
                errors[k] = reason
                continue
            if k in rejected:  # a decoder bug or an unusual file: either way someone should know
                log.warning("%s rejected %s, which PIL decodes; used PIL's decode", self.name,
                            self.images.path(items[k].index))
            out[k] = torch.from_numpy(array).permute(2, 0, 1).to(self.device)
        return errors


def crop_decoded(images: list[torch.Tensor], size: int, chunk: int = 64) -> torch.Tensor:
    """ADM crops of decoded (3, H, W) uint8 images, cropped together where their shapes agree."""
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=images[0].device)
    groups = collections.defaultdict(list)
    for k, im in enumerate(images):
        groups[tuple(im.shape)].append(k)
    for ks in groups.values():
        for s in range(0, len(ks), chunk):  # bounded float32 working memory
            part = ks[s:s + chunk]
            out[part] = adm_crop_torch(torch.stack([images[k] for k in part]), size)
    return out


class TorchvisionDecoder:
    """torchvision.io.decode_jpeg on the device (nvjpeg on CUDA, batched), then the ADM crop in torch."""

    name = "torchvision_gpu"

    def __init__(self, *, size: int, device: torch.device):
        from torchvision.io import ImageReadMode

        self.size, self.device, self.mode = size, device, ImageReadMode.RGB

    def accepts(self, s: Sniff) -> bool:
        return s.plain_jpeg

    def decode(self, datas: list[np.ndarray], sniffs: list[Sniff]) -> torch.Tensor:
        from torchvision.io import decode_jpeg

        images = decode_jpeg([torch.from_numpy(d) for d in datas], mode=self.mode, device=self.device)
        return crop_decoded(images, self.size)

    def reset(self) -> None:
        pass


def make_backend(name: str, images, *, size: int, batch_size: int, workers: int, device: torch.device):
    """The backend called `name` ('pil', 'torchvision_gpu' or 'dali') for these images."""
    if name == "pil":
        return PilBackend(images, size=size, workers=workers, device=device)
    if name == "torchvision_gpu":
        decoder = TorchvisionDecoder(size=size, device=device)
    elif name == "dali":
        from fae_fast.data.dali import DaliDecoder

        decoder = DaliDecoder(size=size, batch_size=batch_size, threads=workers, device=device)
    else:
        raise ValueError(f"backend {name!r} is not one of 'pil', 'torchvision_gpu', 'dali'")
    return AcceleratedBackend(images, decoder, size=size, workers=workers, device=device)
