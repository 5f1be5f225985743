"""Launch heuristics and small helpers shared by every kernel file (the one place they live)."""
import functools
import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1, how CI tests them)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def row_block(n_cols: int) -> int:
    """Smallest power of two that holds one row of `n_cols` elements (one program reads a whole row)."""
    return triton.next_power_of_2(n_cols)


def row_num_warps(block: int) -> int:
    """Warps for a program that streams one row of `block` elements: enough 16-byte loads in flight."""
    if block <= 512:
        return 2
    if block <= 2048:
        return 4
    if block <= 8192:
        return 8
    return 16


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    """View x as (rows, last dim) with a contiguous last dim, copying only when the layout forces it."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:  # leading dims not collapsible without a copy
        return x.reshape(-1, x.shape[-1])


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device_index: int) -> int:
    """SM count of a CUDA device; a fixed small number under the interpreter."""
    if not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count
