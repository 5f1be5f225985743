"""Attention with the fastest backend for each shape, chosen by measurement once and cached.

Candidates: PyTorch SDPA with the cuDNN, flash and memory-efficient backends, and the flash-attn and
xformers packages when they are installed and load against this torch. Every backend runs full or causal
attention (`causal=True`: token i attends to tokens <= i, for autoregressive models such as the flow's). A missing or broken optional
package is skipped with a one-line note. On CPU, plain SDPA.

The choice is measured eagerly (forward + backward, CUDA events) by `choose_backend`, which the programs
call for their model's shape before compiling, so that the traced graph uses the winner. `attention` itself
never measures: a shape nobody measured goes to SDPA's own dispatch. The choice is logged on the
"fae_fast.attention" logger at INFO (the training programs show fae_fast's INFO lines on rank 0).
"""
import functools
import logging
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# (B, H, T, Dh, dtype, device, causal) -> backend name
_CHOICE: dict[tuple, str] = {}
_NOTES_SHOWN: set[str] = set()


def _note_once(message: str) -> None:
    if message not in _NOTES_SHOWN:
        _NOTES_SHOWN.add(message)
        log.warning(message)


def _sdpa_with(backend_name: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION,
               "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}[backend_name]

    def run(q, k, v, causal=False):  # (B, H, T, Dh)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def _flash_attn():
    try:
        from flash_attn import flash_attn_func
    except Exception as err:  # not installed, or built for another torch
        _note_once(f"flash-attn not used: {type(err).__name__}: {err}".splitlines()[0])
        return None
    return lambda q, k, v, causal=False: flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)


def _xformers():
    try:
        from xformers.ops import LowerTriangularMask, memory_efficient_attention
    except Exception as err:
        _note_once(f"xformers not used: {type(err).__name__}: {err}".splitlines()[0])
        return None
    return lambda q, k, v, causal=False: memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_bias=LowerTriangularMask() if causal else None).transpose(1, 2)


@functools.lru_cache(maxsize=1)
def candidates() -> dict[str, Callable]:
    """Backends that can run here, by name."""
    found = {name: _sdpa_with(name) for name in ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient")}
    for name, make in (("flash_attn", _flash_attn), ("xformers", _xformers)):
        fn = make()
        if fn is not None:
            found[name] = fn
    return found


def _time_fwd_bwd(name: str, fn: Callable, q, k, v, causal: bool = False, iters: int = 10) -> float:
    """Median ms of forward + backward; inf (with a one-line note) when the backend rejects the shape."""
    try:
        for _ in range(3):
            fn(q, k, v, causal=causal).sum().backward()
        torch.cuda.synchronize()
    except Exception as err:  # backend does not support this shape/dtype/GPU, or a package built for another torch
        _note_once(f"attention backend {name} not used for shape {tuple(q.shape)} {q.dtype}: "
                   f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        return float("inf")
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(q, k, v, causal=causal).sum().backward()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def choose_backend(batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device | str = "cuda", causal: bool = False) -> str:
    """Measure every candidate on this shape (full or causal attention) once, cache and log the winner,
    return its name."""
    device = torch.device(device)
    key = (batch, heads, tokens, head_dim, dtype, device.type, causal)
    if key in _CHOICE:
        return _CHOICE[key]
    if device.type != "cuda":
        _CHOICE[key] = "sdpa"
        return "sdpa"
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    timings = {name: _time_fwd_bwd(name, fn, q, k, v, causal) for name, fn in candidates().items()}
    best = min(timings, key=timings.get)
    if timings[best] == float("inf"):
        best = "sdpa"
    _CHOICE[key] = best
    shown = ", ".join(f"{n} {t:.3f} ms" for n, t in sorted(timings.items(), key=lambda kv: kv[1]))
    log.info("attention %s for B=%d H=%d T=%d Dh=%d %s%s (fwd+bwd: %s)", best, batch, heads, tokens,
             head_dim, dtype, " causal" if causal else "", shown)
    return best


def attention(q, k, v, causal: bool = False):
    """softmax(q k^T / sqrt(Dh)) v for q, k, v of shape (B, H, T, Dh), with the cached backend choice;
    causal=True masks each query's later keys."""
    B, H, T, Dh = q.shape
    name = _CHOICE.get((B, H, T, Dh, q.dtype, q.device.type, causal), "sdpa")
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if name.startswith("sdpa_"):
        return _sdpa_with(name)(q, k, v, causal)
    return candidates()[name](q, k, v, causal=causal)
