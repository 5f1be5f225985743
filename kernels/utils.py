"""Launch heuristics and small helpers shared by every kernel file (the one place they live)."""
import functools
import os
from dataclasses import dataclass, replace

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1, how CI tests them)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host integers. Plain Python: triton.cdiv is a constexpr function whose host
    calls cost microseconds each, and launchers run on every op call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1), in plain Python for the same reason as cdiv."""
    return 1 << max(n - 1, 0).bit_length()


def row_block(n_cols: int) -> int:
    """Smallest power of two that holds one row of `n_cols` elements (one program reads a whole row)."""
    return next_power_of_2(n_cols)


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


def _sms(device: torch.device) -> int:
    return multiprocessor_count(device.index or 0) if device.type == "cuda" else 4


def tile_rows(block_cols: int, n_rows: int, elements: int = 4096) -> int:
    """Rows per program for a (rows, block_cols) tile of about `elements` values (a power of two,
    at least 1, no more than the rows there are): small rows are batched so every program streams enough."""
    return max(1, min(elements // block_cols, next_power_of_2(max(n_rows, 1))))


def persistent_programs(n_tiles: int, device: torch.device, per_sm: int = 8) -> int:
    """Programs for a grid-stride loop over `n_tiles` tiles: `per_sm` per SM (4 SMs under the interpreter).
    Used where each program keeps a partial sum: few partials, in an order fixed by the device alone."""
    sms = multiprocessor_count(device.index or 0) if device.type == "cuda" else 4
    return max(1, min(n_tiles, sms * per_sm))


def persistent_row_runs(n_rows: int, rows: int, device: torch.device, per_sm: int = 8) -> tuple[int, int]:
    """(rows_per_program, programs) for a kernel whose programs each walk a run of `rows`-row tiles and keep one
    fp32 partial sum (persistent_programs of them, `per_sm` an SM): few partials, summed afterwards in a fixed
    order."""
    tiles = cdiv(n_rows, rows)
    tiles_per_program = cdiv(tiles, persistent_programs(tiles, device, per_sm))
    return rows * tiles_per_program, cdiv(n_rows, rows * tiles_per_program)


def row_loop_num_warps(block: int) -> int:
    """Warps for a program that loops over rows keeping fp32 row accumulators (the backward kernels):
    twice the streaming count, so each thread holds half as many elements per live vector and the
    kernel keeps its registers low enough for several programs per SM."""
    return min(2 * row_num_warps(block), 16)


def reduction_grid(n_groups: int, group_rows: int, device: torch.device, multiple_of: int = 1) -> tuple[int, int]:
    """(rows_per_program, n_chunks) for a backward that sums row gradients within each group (the T
    tokens of one sample): each group is cut into n_chunks chunks of rows_per_program rows (a multiple of
    the kernel's row tile), one program per (group, chunk), about 8 programs per SM in all; each program
    sums its chunk in fp32 registers and writes one partial row. The split depends only on the shape
    and the device, so the order of every fp32 sum, and so the result, is the same on every run."""
    sms = multiprocessor_count(device.index or 0) if device.type == "cuda" else 4
    n_chunks = max(1, min(group_rows, cdiv(8 * sms, max(n_groups, 1))))
    rows_per_program = max(1, cdiv(cdiv(group_rows, n_chunks), multiple_of)) * multiple_of
    return rows_per_program, cdiv(group_rows, rows_per_program)


@dataclass(frozen=True, kw_only=True)
class RowLoop:
    """Launch of a kernel over (B, T, D) rows whose programs each walk a run of tokens of one sample, a
    (rows, BLOCK) tile at a time (modulated_norm.py, gated_residual.py). An explicit launcher argument, so a
    sweep (benchmarks/sweep_norms.py) can pass any and the best becomes the default here."""

    rows: int
    """Rows per tile: a power of two."""
    num_warps: int
    """Warps per program."""
    rows_per_program: int
    """Tokens of one sample a program walks (a multiple of rows); equal to rows: one tile per program."""
    num_stages: int = 1
    """Software-pipelining depth of the row loop: the next num_stages - 1 tiles' loads in flight (1: none)."""

    def check(self) -> "RowLoop":
        if self.rows < 1 or self.rows & (self.rows - 1) or self.rows_per_program < self.rows:
            raise ValueError(f"{self}: rows must be a power of two and rows_per_program at least rows.")
        return self


def norm_tile_rows(block: int, group_rows: int, elements: int) -> int:
    """Rows of a norm kernel's (rows, block) tile of about `elements` values; under the interpreter, whose
    cost is per Triton op rather than per element, tiles hold 16384 values so CPU tests stay fast."""
    return tile_rows(block, group_rows, elements=16384 if interpreting() else elements)


@functools.lru_cache(maxsize=1024)
def norm_fwd_launch(n_cols: int, n_groups: int, group_rows: int, device: torch.device) -> RowLoop:
    """Default RowLoop of the norm forwards (modulated_norm, gated_residual[_modulated_norm]): tiles of about
    4096 values; each program walks up to 16 tiles of one sample (fewer while that leaves under 8 programs per
    SM), the next three tiles' loads in flight through shared memory: registers cap how many rows each SM
    holds in one-tile programs, the pipeline does not. A per-sample modulation row is loaded once per program."""
    block = row_block(n_cols)
    rows = norm_tile_rows(block, group_rows, 4096)
    rows_per_program = 16 * rows
    while rows_per_program > rows and n_groups * cdiv(group_rows, rows_per_program) < 8 * _sms(device):
        rows_per_program //= 2
    return RowLoop(rows=rows, num_warps=row_num_warps(rows * block), rows_per_program=rows_per_program, num_stages=4)


@functools.lru_cache(maxsize=1024)
def norm_bwd_launch(n_cols: int, n_groups: int, group_rows: int, device: torch.device) -> RowLoop:
    """Default RowLoop of the norm backward: tiles of about 2048 values (the loop keeps ~6 fp32 tiles live),
    chunks of each sample's tokens from reduction_grid (about 8 programs per SM), loads of the next three
    tiles in flight through shared memory."""
    block = row_block(n_cols)
    rows = norm_tile_rows(block, group_rows, 2048)
    rows_per_program, _ = reduction_grid(n_groups, group_rows, device, multiple_of=rows)
    return RowLoop(rows=rows, num_warps=row_loop_num_warps(rows * block), rows_per_program=rows_per_program,
                   num_stages=4)


@functools.lru_cache(maxsize=None)
def shared_memory_per_program(device_index: int) -> int:
    """Bytes of shared memory one program may use on a CUDA device: the opt-in per-block limit the
    device reports (227 KiB on H100/H200, 99 KiB on most consumer GPUs), never an assumed number."""
    props = torch.cuda.get_device_properties(device_index)
    limit = getattr(props, "shared_memory_per_block_optin", 0)  # torch < 2.6 lacks it: ask Triton's driver
    return limit or triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


# Shared memory a row-loop kernel needs beyond its pipelined tiles: the row reductions' scratch and the
# per-row statistics (mean, rstd) of the tiles in flight. Measured 64 bytes on an H200; 8 KiB is room to spare.
_SHARED_MEMORY_RESERVE = 8192


def pipelined_bytes(launch: RowLoop, block: int, bytes_per_element: int) -> int:
    """Shared memory the row loop's software pipeline holds: num_stages - 1 tiles of (rows, block) of every
    tensor loaded a tile at a time, `bytes_per_element` being the sum of those tensors' element sizes."""
    return (launch.num_stages - 1) * launch.rows * block * bytes_per_element


@functools.lru_cache(maxsize=4096)
def fit_shared_memory(launch: RowLoop, block: int, bytes_per_element: int, device: torch.device) -> RowLoop:
    """`launch` fitted to the shared memory of `device` (fit_to_budget); unchanged under the interpreter,
    which has no shared memory."""
    if device.type != "cuda":
        return launch
    index = device.index if device.index is not None else torch.cuda.current_device()
    return fit_to_budget(launch, block, bytes_per_element, shared_memory_per_program(index) - _SHARED_MEMORY_RESERVE)


def fit_to_budget(launch: RowLoop, block: int, bytes_per_element: int, budget: int) -> RowLoop:
    """`launch` with fewer pipeline stages, then fewer rows per tile, until its pipelined tiles take at most
    `budget` bytes (an fp32 per-token fused pair streams five tensors: 240 KiB at four stages of 4096-value
    tiles, over an H100's or H200's 227 KiB). One stage pipelines nothing and always fits."""
    rows, stages = launch.rows, launch.num_stages
    while stages > 1 and pipelined_bytes(replace(launch, rows=rows, num_stages=stages), block, bytes_per_element) > budget:
        if stages > 2:
            stages -= 1
        elif rows > 1:
            rows //= 2
        else:
            stages = 1
    return replace(launch, rows=rows, num_stages=stages)


def tile_bytes(*tensors: "torch.Tensor | None") -> int:
    """Sum of the element sizes of the tensors a row loop loads a tile at a time (None: not loaded)."""
    return sum(t.element_size() for t in tensors if t is not None)


import triton.language as tl  # noqa: E402  (for the jit helper below)

_INTERPRETING = tl.constexpr(interpreting())


@triton.jit
def cast_rtne(x, dtype: tl.constexpr):
    """fp32 x cast to `dtype` (an output pointer's element type) rounding to nearest even, as the GPU's
    plain cast does. Triton's interpreter truncates fp32 -> bf16 instead (up to a whole ulp of error,
    which fails the bf16 "2x torch" tests on CPU), so there the rounding is done on the bits; its fp32 ->
    fp8 e4m3 cast loses the carry into the exponent, so there the value is first rounded in fp32. fp8
    inputs must already lie within the format's range (the quantising kernels clamp them)."""
    if _INTERPRETING:  # a constexpr: compiled GPU code is the plain cast alone
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)  # carry into the kept 16 bits: round half to even
            rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            return tl.where(x != x, x.to(dtype), rounded)  # NaN keeps its (truncated) bits
        if dtype == tl.float8e4nv:
            # the interpreter drops the carry when rounding overflows the mantissa (127.5 -> 64): round to
            # the e4m3 grid in fp32 first (step 2^(e-3), e the exponent, at least e4m3's smallest, -6), so
            # that the cast itself is exact. (|x| + m) - m with m = 1.5 * 2^23 * step rounds half to even.
            bits = x.to(tl.uint32, bitcast=True)
            exponent = ((bits >> 23) & 0xFF).to(tl.int32) - 127
            step = ((tl.maximum(exponent, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
            magic = 12582912.0 * step
            rounded = ((tl.abs(x) + magic) - magic).to(tl.uint32, bitcast=True) | (bits & 0x80000000)  # keep -0.0
            return rounded.to(tl.float32, bitcast=True).to(dtype)
    return x.to(dtype)


def pow2_divisor(*values: int, cap: int = 16) -> int:
    """Largest power of two, at most `cap`, that divides every value (0 counts as divisible by anything):
    what a kernel may promise with tl.multiple_of about offsets built from these strides."""
    d = cap
    while d > 1 and any(v % d for v in values):
        d //= 2
    return d
