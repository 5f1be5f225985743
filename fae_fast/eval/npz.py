"""Sample sets on disk: chunk files written atomically, resume bookkeeping, and ADM-format .npz files.

A run writes `chunk_<start>-<end>.npz` files (indices start..end-1, 9 digits each), each holding
`indices`, `labels` and `images` (uint8, N x H x W x 3) or `latents`. A chunk is written to a dot-file
and renamed, so a chunk name on disk always means a complete chunk; a killed run leaves at worst a
dot-file, which is ignored and removed. The final file is ADM's format (guided-diffusion's
evaluations/evaluator.py reads it): `arr_0` the images, `arr_1` the labels, written by streaming the
chunks in index order, so a 50k x 256 x 256 x 3 set (9.8 GB) never has to fit in memory.
"""
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

_CHUNK = re.compile(r"^chunk_(\d{9})-(\d{9})\.npz$")


def chunk_path(folder: str | Path, start: int, end: int) -> Path:
    return Path(folder) / f"chunk_{start:09d}-{end:09d}.npz"


def _atomic_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())  # the data is on disk before the name says it is complete
    os.replace(tmp, final)


def write_chunk(folder: str | Path, start: int, end: int, **arrays: np.ndarray) -> Path:
    """Write arrays (first dim end - start) as one chunk: a dot-file first, then an atomic rename."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    final = chunk_path(folder, start, end)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    _atomic_replace(tmp, final)
    return final


def list_chunks(folder: str | Path) -> list[tuple[int, int, Path]]:
    """Complete chunks in `folder` as (start, end, path), sorted; dot-files and other names are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m[1]), int(m[2]), folder / m[0]) for p in folder.iterdir() if (m := _CHUNK.match(p.name))]
    return sorted(found)


def remove_partial_chunks(folder: str | Path) -> int:
    """Delete half-written dot-files left by a killed run; returns how many there were."""
    stale = list(Path(folder).glob(".chunk_*.tmp*")) if Path(folder).is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def pending_ranges(done: list[tuple[int, int]], n: int, size: int) -> list[tuple[int, int]]:
    """The index ranges of 0..n-1 that no `done` range covers, cut into pieces of at most `size`.

    Works from whatever chunks exist, so a run resumed with another batch size or world size still
    fills exactly the gaps.
    """
    ranges, cursor = [], 0
    for start, end in sorted(done) + [(n, n)]:
        while cursor < min(start, n):
            ranges.append((cursor, min(cursor + size, start, n)))
            cursor = ranges[-1][1]
        cursor = max(cursor, end)
    return ranges


def check_coverage(folder: str | Path, n: int) -> list[Path]:
    """The chunk paths in index order after checking that every index 0..n-1 is in exactly one chunk
    and that each chunk holds the indices its name says; otherwise one error naming the problem."""
    chunks = list_chunks(folder)
    counts = np.zeros(n, dtype=np.int64)
    for start, end, path in chunks:
        with np.load(path) as f:
            indices = f["indices"]
        if not np.array_equal(indices, np.arange(start, end)):
            raise ValueError(f"chunk {path} does not hold indices {start}..{end - 1}; delete it and run the "
                             f"same command again to redraw it")
        if end > n:
            raise ValueError(f"chunk {path} reaches index {end - 1}, beyond the {n} samples of this run; "
                             f"it belongs to another run: use a fresh out_dir")
        counts[start:end] += 1
    if (dup := np.flatnonzero(counts > 1)).size:
        raise ValueError(f"{dup.size} sample indices (first {dup[0]}) are in more than one chunk in {folder}; "
                         f"delete the overlapping chunk files and run the same command again")
    if (missing := np.flatnonzero(counts == 0)).size:
        raise ValueError(f"{missing.size} of {n} sample indices (first {missing[0]}) have no chunk in {folder}; "
                         f"run the same command again to draw them")
    return [path for _, _, path in chunks]


def write_adm_npz(path: str | Path, chunks: list[Path], key: str = "images") -> tuple[int, ...]:
    """Stream the chunks' `key` arrays (as arr_0) and labels (as arr_1) into one .npz, atomically;
    returns arr_0's shape. The chunks must be in index order (as `check_coverage` returns them)."""
    path = Path(path)
    with np.load(chunks[0]) as f:
        row_shape, dtype = f[key].shape[1:], f[key].dtype
    n = 0
    for chunk in chunks:
        with np.load(chunk) as f:
            n += len(f["indices"])
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, field, shape, dt in (("arr_0", key, (n, *row_shape), dtype), ("arr_1", "labels", (n,), np.int64)):
            with zf.open(f"{name}.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array_header_1_0(
                    out, {"descr": np.lib.format.dtype_to_descr(np.dtype(dt)), "fortran_order": False, "shape": shape})
                for chunk in chunks:
                    with np.load(chunk) as f:
                        out.write(np.ascontiguousarray(f[field], dtype=dt).tobytes())
    _atomic_replace(tmp, path)
    return (n, *row_shape)


def npz_keys(path: str | Path) -> list[str]:
    """Array names in an .npz (without loading any of them)."""
    with np.load(path) as f:
        return list(f.files)


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an .npy stream positioned at its start."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def iter_npz_array(path: str | Path, key: str = "arr_0", batch: int = 256) -> Iterator[np.ndarray]:
    """Yield `key` of an .npz in batches along dim 0, reading the zip member as a stream (a 50k-image
    arr_0 is never loaded whole)."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        shape, fortran, dtype = _read_header(f)
        if fortran:
            raise ValueError(f"{path}:{key} is stored in Fortran order; re-save it with numpy's default C order")
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch):
            count = min(batch, shape[0] - start)
            yield np.frombuffer(f.read(count * row), dtype=dtype).reshape(count, *shape[1:])


def npz_array_shape(path: str | Path, key: str = "arr_0") -> tuple[int, ...]:
    """Shape of one array of an .npz, read from its header only; a damaged file is one ValueError naming it."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
            return _read_header(f)[0]
    except (zipfile.BadZipFile, KeyError, ValueError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npz with {key} ({type(err).__name__}: {str(err)[:100]}); "
                         f"write it again (sample.py resumes from its chunks) or pass another file") from None
