"""Attention with the fastest backend for each shape, chosen by measurement once and cached.

Candidates: PyTorch SDPA with the cuDNN, flash and memory-efficient backends, and the flash-attn and
xformers packages when they are installed and load against this torch. Every backend runs full or causal
attention (`causal=True`: token i attends to tokens <= i, for autoregressive models such as the flow's). A
missing or broken optional package is skipped with a one-line note. On CPU, plain SDPA.

The choice is measured eagerly (forward + backward, CUDA events) by `choose_backend`, which the programs
call for their model's shape before compiling, so that the traced graph uses the winner. `attention` itself
never measures: a shape nobody measured goes to SDPA's own dispatch. The choice is logged on the
"fae_fast.attention" logger at INFO (the training programs show fae_fast's INFO lines on rank 0).

Gradients. With torch 2.11 on an H200, cuDNN attention's backward returned gradients unrelated to the true
ones (relative error 1.4 against fp64; flash 4e-3) when the output gradient's strides differed from the
output's (measured: q, k, v strided views of a packed (B, T, 3, H, Dh) projection, a contiguous gradient),
and a B-size generator trained with cuDNN chosen diverged where the same run with flash trained (README,
"Attention"). The fused model is the mirror case: q, k, v come contiguous from the rope kernel and the
output is read back as (B, T, H * Dh), so its gradient arrives strided. The rope kernel now writes q, k, v
laid out (B, T, H, Dh), so the output (cuDNN's follows q's layout) and its gradient share one layout; beyond
that, the models take cuDNN's output (and that of PyTorch's own dispatch) through `attention_tokens` /
`output_layout_tokens`: the output as the tokens (B, T, H * Dh) their projection reads, whose contiguous
gradient, seen again as (B, H, T, Dh), has the token-major output's layout, so that it reaches the backward
in that layout with no copy, eagerly and compiled (a copy is made only where the output is not token-major).
`attention` itself, for (B, H, T, Dh) callers, passes its output through `output_layout_gradient` (the
gradient copied into the output's layout where it differs eagerly, and always in a compiled graph, which
hands an autograd.Function a contiguous gradient: two copies a layer). A backend is only chosen if its
output and gradients, with q, k, v and the gradient each in both layouts a model uses, agree with PyTorch's
fp32 attention through both paths, eagerly and compiled (`checked_error`): one that fails is skipped with a
one-line note, so a wrong kernel costs speed, never the training.
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
BACKENDS = ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flash_attn", "xformers")
"""Every backend the chooser knows, available here or not (`candidates()`: those that are)."""
_ONLY: list[str | None] = [None]  # the backend run.attention insists on, or None: all of them


def only_backend(name: str) -> None:
    """Make `choose_backend` consider only the backend `name`, or every one for "auto" (run.attention's
    values); forgets earlier choices. The one named is still checked against fp32 attention: a wrong one
    raises."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {', '.join(BACKENDS)} (or 'auto': every one)")
    only = None if name == "auto" else name
    if _ONLY[0] != only:
        _ONLY[0] = only
        _CHOICE.clear()


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
    found = {name: _sdpa_with(name) for name in BACKENDS if name.startswith("sdpa_")}
    for name, make in (("flash_attn", _flash_attn), ("xformers", _xformers)):
        fn = make()
        if fn is not None:
            found[name] = fn
    return found


@torch.library.custom_op("fae_fast::copy_to_strides", mutates_args=())
def _copy_to_strides(grad: torch.Tensor, stride: list[int]) -> torch.Tensor:
    """A copy of `grad` laid out with `stride`. An op the compiler cannot see into: its output keeps that
    layout in a compiled graph, where a plain `new_empty_strided(...).copy_(grad)` is a pointwise copy whose
    layout inductor may choose anew."""
    return grad.new_empty_strided(grad.shape, stride).copy_(grad)


@_copy_to_strides.register_fake
def _(grad, stride):
    return grad.new_empty_strided(grad.shape, stride)


class _GradientInOutputLayout(torch.autograd.Function):
    """Identity forward; the backward passes the gradient on in the forward output's memory layout. Eagerly
    the strides are known and the copy is made only where they differ; in a compiled graph the layouts are
    inductor's to choose after tracing, so the traced backward always copies, through `_copy_to_strides`
    (one copy of the attention output's size per layer, about 0.5% of an XL step)."""

    @staticmethod
    def forward(ctx, out):
        ctx.stride = out.stride()
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        if grad.stride() == ctx.stride and not torch.compiler.is_compiling():
            return grad
        return torch.ops.fae_fast.copy_to_strides(grad, list(ctx.stride))


class _TokensInOutputLayout(torch.autograd.Function):
    """out (B, H, T, Dh) -> its token view (B, T, H * Dh), the layout a projection reads (a view where out is
    laid out (B, T, H, Dh), else a copy); the backward hands the gradient back in out's layout. That gradient
    arrives contiguous (a projection's input gradient; in a compiled graph every autograd.Function's gradient
    is made contiguous first), and a contiguous (B, T, H * Dh) gradient seen as (B, H, T, Dh) is laid out
    (B, T, H, Dh), which is out's layout when out is token-major: then nothing is copied, eagerly or
    compiled (the strides are compared when the graph is traced, and the compiler keeps an SDPA backward's
    aligned inputs in their traced strides). `_GradientInOutputLayout` on out itself costs two copies a layer
    in a compiled graph: the forced contiguous gradient (B, H, T, Dh), then the copy back to out's layout."""

    @staticmethod
    def forward(ctx, out):
        ctx.stride, ctx.heads = out.stride(), out.shape[1]
        return _tokens(out)

    @staticmethod
    def backward(ctx, grad):
        B, T, width = grad.shape
        grad = grad.reshape(B, T, ctx.heads, width // ctx.heads).transpose(1, 2)
        if grad.stride() == ctx.stride:
            return grad
        return torch.ops.fae_fast.copy_to_strides(grad, list(ctx.stride))


def output_layout_tokens(out: torch.Tensor) -> torch.Tensor:
    """An attention output (B, H, T, Dh) as the tokens (B, T, H * Dh) a projection reads, whose gradient
    reaches the op that made `out` in `out`'s strides (cuDNN's backward needs that): without a copy where `out`
    is laid out (B, T, H, Dh), eagerly and compiled (`_TokensInOutputLayout`)."""
    return _TokensInOutputLayout.apply(out) if out.requires_grad else _tokens(out)


def _tokens(out: torch.Tensor) -> torch.Tensor:
    """An attention output (B, H, T, Dh) as tokens (B, T, H * Dh): a view where it is laid out (B, T, H, Dh)."""
    B, H, T, Dh = out.shape
    return out.transpose(1, 2).reshape(B, T, H * Dh)


def output_layout_gradient(out: torch.Tensor) -> torch.Tensor:
    """`out` itself, whose gradient reaches the op that made it in `out`'s strides (see the module docstring:
    cuDNN attention's backward needs that)."""
    return _GradientInOutputLayout.apply(out) if out.requires_grad else out


ERROR_TOLERANCE = 0.05
"""Largest relative error `attention_error` accepts: bf16 rounding gives about 5e-3 (H200, B-size and XL
shapes, every SDPA backend), the cuDNN backward fed a gradient of another layout gave 1.4."""


def attention_error(fn: Callable, shape: tuple[int, int, int, int], dtype: torch.dtype,
                    device: torch.device | str, causal: bool = False) -> float:
    """The largest relative (Frobenius) error of fn's output and q, k, v gradients against PyTorch's attention
    in fp32, on random inputs of `shape` (B, H, T, Dh) in `dtype`. q, k, v come both ways a model makes them
    (contiguous, and laid out (B, T, H, Dh) in memory as the rope kernel writes them), and the output
    gradient reaches fn both ways a model hands it over (through the output read as (B, T, H * Dh), the
    blocks' projection, and contiguous): four backward passes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, T, Dh = shape
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, device=device) for _ in range(3))
    as_tokens = torch.randn(B, T, H * Dh, generator=g, device=device)  # the projection's gradient
    as_heads = torch.randn(shape, generator=g, device=device)  # a contiguous (B, H, T, Dh) one

    def run(attend, dt, token_major: bool, through_tokens: bool):
        leaves = [(t.transpose(1, 2).to(dt).contiguous().transpose(1, 2) if token_major else t.to(dt, copy=True))
                  .detach().requires_grad_() for t in (q, k, v)]
        out = attend(*leaves, causal)
        if through_tokens:
            (out.transpose(1, 2).reshape(B, T, H * Dh).float() * as_tokens).sum().backward()
        else:
            (out.float() * as_heads).sum().backward()
        return [out.detach().float()] + [t.grad.float() for t in leaves]

    def reference(q, k, v, causal):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    errors = []
    for token_major in (True, False):
        for through_tokens in (True, False):
            want = run(reference, torch.float32, token_major, through_tokens)
            got = run(fn, dtype, token_major, through_tokens)
            errors += [((a - b).norm() / b.norm().clamp(min=1e-30)).item() for a, b in zip(got, want)]
    return max(errors)


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


def checked_error(name: str, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device | str,
                  causal: bool = False) -> float:
    """`attention_error` of the backend `name` run as the models run it: eagerly and compiled (torch.compile,
    static shapes, as the blocks' first compile), the larger of the two; inf, with a one-line note, when
    either raises. Compiled, the gradient's layout is the compiler's choice, and cuDNN's backward is only
    right when it matches the output's."""
    def attend(q, k, v, causal):
        return _attend(name, q, k, v, causal)

    def attend_tokens(q, k, v, causal):
        return _attend_tokens_as_heads(name, q, k, v, causal)

    errors = []
    try:
        for path, way in (("", attend), (" as tokens", attend_tokens)):
            for mode, fn in (("eagerly", way), ("compiled", torch.compile(way, fullgraph=True, dynamic=False))):
                try:
                    errors.append(attention_error(fn, shape, dtype, device, causal))
                except Exception as err:  # the backend rejects the layout, or the compiler the op
                    _note_once(f"attention backend {name} not used: it failed {mode}{path}: {type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}")
                    return float("inf")
    finally:  # drop this check's graphs: every check shares `attend`'s code, and dynamo stops compiling a
        # code after 8 graphs (recompile_limit), which would fail every later check of a many-shape process
        torch._dynamo.reset_code(attend.__code__)
        torch._dynamo.reset_code(attend_tokens.__code__)
    return max(errors)


def fastest_correct(timings: dict[str, float], error_of: Callable[[str], float]) -> str:
    """The fastest backend (finite time) whose `error_of` is within ERROR_TOLERANCE, checked fastest first;
    "sdpa" (PyTorch's own dispatch) when none is. Each one that fails gets a one-line note."""
    for name in sorted((n for n, t in timings.items() if t != float("inf")), key=timings.get):
        error = error_of(name)
        if error <= ERROR_TOLERANCE:
            return name
        _note_once(f"attention backend {name} not used: its output or gradients differ from PyTorch's fp32 "
                   f"attention by {error:.3g} (relative; bf16 rounding gives about 5e-3)")
    return "sdpa"


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
    pool, only = candidates(), _ONLY[0]
    if only is not None:
        if only not in pool:
            raise ValueError(f"run.attention={only}: that backend cannot run here (its package is missing or does not "
                             f"load; the log says why); available: {', '.join(pool)}, or run.attention=auto")
        pool = {only: pool[only]}
    q, k, v = (torch.randn(batch, tokens, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
               .requires_grad_() for _ in range(3))  # laid out (B, T, H, Dh), as the rope kernel writes them
    timings = {name: _time_fwd_bwd(name, fn, q, k, v, causal) for name, fn in pool.items()}
    check = (min(batch, 4), heads, tokens, head_dim)  # a few samples: the layouts are what matter
    errors: dict[str, float] = {}

    def error_of(name: str) -> float:
        errors[name] = checked_error(name, check, dtype, device, causal)
        return errors[name]

    best = fastest_correct(timings, error_of)
    if only is not None and best != only:
        raise ValueError(f"run.attention={only} fails here for B={batch} H={heads} T={tokens} Dh={head_dim} {dtype}: "
                         + (f"its output or gradients differ from fp32 attention by {errors[only]:.3g} (bf16 "
                            f"rounding gives about 5e-3)" if only in errors else "it rejects this shape (see the "
                            "note above)") + "; use another backend or run.attention=auto")
    _CHOICE[key] = best
    shown = ", ".join(f"{n} {t:.3f} ms" for n, t in sorted(timings.items(), key=lambda kv: kv[1]))
    checked = ", ".join(f"{n} {e:.1e}" for n, e in errors.items())
    log.info("attention %s for B=%d H=%d T=%d Dh=%d %s%s (fwd+bwd: %s; error against fp32: %s)", best, batch, heads,
             tokens, head_dim, dtype, " causal" if causal else "", shown, checked)
    return best


def attention(q, k, v, causal: bool = False):
    """softmax(q k^T / sqrt(Dh)) v for q, k, v of shape (B, H, T, Dh), with the cached backend choice;
    causal=True masks each query's later keys."""
    return _attend(_chosen(q, causal), q, k, v, causal)


def attention_tokens(q, k, v, causal: bool = False):
    """`attention`, returned as the tokens (B, T, H * Dh) a projection reads: for the backends whose backward
    needs the output gradient in the output's layout, handed over without a copy where the output is laid out
    (B, T, H, Dh) (`_TokensInOutputLayout`; q, k, v from the rope kernel are), eagerly and compiled."""
    return _attend_tokens(_chosen(q, causal), q, k, v, causal)


def _chosen(q, causal: bool) -> str:
    B, H, T, Dh = q.shape
    return _CHOICE.get((B, H, T, Dh, q.dtype, q.device.type, causal), "sdpa")


NEEDS_THE_OUTPUT_LAYOUT = ("sdpa", "sdpa_cudnn")
"""Backends whose backward is handed the output gradient in the output's layout: cuDNN's (and PyTorch's own
dispatch, which may pick it). The others read any layout right (flash: measured on the H200), and skip the
hand-over: under torch.compile a backward that reads strides gets its gradient made contiguous first, which
would cost a copy per layer."""


def _backend_output(name: str, q, k, v, causal: bool):
    """The backend `name`'s attention output ("sdpa": PyTorch's dispatch), its gradient's layout not handled."""
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if name.startswith("sdpa_"):
        return _sdpa_with(name)(q, k, v, causal)
    return candidates()[name](q, k, v, causal=causal)


def _attend(name: str, q, k, v, causal: bool):
    """Attention with the backend `name`, as `attention` runs it: (B, H, T, Dh), its gradient handed over in
    its layout where the backend needs that."""
    out = _backend_output(name, q, k, v, causal)
    return output_layout_gradient(out) if name in NEEDS_THE_OUTPUT_LAYOUT else out


def _attend_tokens(name: str, q, k, v, causal: bool):
    """Attention with the backend `name`, as `attention_tokens` runs it: (B, T, H * Dh)."""
    out = _backend_output(name, q, k, v, causal)
    return output_layout_tokens(out) if name in NEEDS_THE_OUTPUT_LAYOUT else _tokens(out)


def _attend_tokens_as_heads(name: str, q, k, v, causal: bool):
    """`_attend_tokens` seen again as (B, H, T, Dh) (a view): how `attention_error` checks that path."""
    B, H, T, Dh = q.shape
    return _attend_tokens(name, q, k, v, causal).view(B, T, H, Dh).transpose(1, 2)
