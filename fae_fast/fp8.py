"""FP8 training of the generator's block linears (`run.precision=fp8`): the forward GEMM and the input-gradient
GEMM run in float8 e4m3 with rowwise scales (`torch._scaled_mm`), the weight-gradient GEMM in bf16.

Each GEMM operand is quantised by one pass of `kernels/fp8.quantize_rows`, which computes the row's scale
from the row it holds (no amax pass, no history to keep). The weights are quantised per step from the
master weights (fp32 under autocast, bf16 under FSDP2), along K for the forward and along N for the
input gradient. Master weights, gradients and the optimizer are as in bf16 training; outputs are bf16.

    y  = (q(x) * s_x) @ (q(W) * s_W)^T + b          x (M, K), W (N, K): both quantised along K
    dx = (q(dy) * s_dy) @ (q(W^T) * s_W^T)^T         dy (M, N), W^T (K, N): both along N
    dW = dy^T @ x (bf16, fp32 accumulation),  db = sum of dy over rows

`convert_to_fp8(modules)` swaps the class of the nn.Linear modules inside (same parameters, same state
dict), so checkpoints move freely between bf16 and FP8 runs.
"""
import torch
import torch.nn as nn

from fae_fast.kernels.fp8 import quantize_rows, quantize_rows_ref

COMPUTE_DTYPE = torch.bfloat16


def _quantizer(x: torch.Tensor):
    """The Triton kernel on CUDA, its PyTorch reference elsewhere (bit for bit the same: tests/test_fp8.py)."""
    return quantize_rows if x.is_cuda else quantize_rows_ref


def fp8_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T in FP8: both quantised rowwise along K, one scaled GEMM, bf16 out. b may be a
    transposed view (a weight read as W^T): it is made contiguous first, so that the quantising pass reads
    whole rows rather than strided columns (a weight is small to copy; the two ways have not been timed
    against each other). Off CUDA the GEMM is emulated: the dequantised operands multiplied in fp32 (the
    same products; CPU `torch._scaled_mm` differs by version)."""
    quantize = _quantizer(a)
    aq, a_scale = quantize(a)
    bq, b_scale = quantize(b.contiguous())
    bias = None if bias is None else bias.to(COMPUTE_DTYPE)
    if not a.is_cuda:
        out = (aq.float() * a_scale) @ (bq.float() * b_scale).t()
        return (out if bias is None else out + bias.float()).to(COMPUTE_DTYPE)
    return torch._scaled_mm(aq, bq.t(), scale_a=a_scale, scale_b=b_scale.t(), bias=bias, out_dtype=COMPUTE_DTYPE)


class _Float8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1]).to(COMPUTE_DTYPE)
        y = fp8_matmul(x2, weight, bias)
        ctx.save_for_backward(x2, weight)
        ctx.has_bias, ctx.x_shape, ctx.x_dtype = bias is not None, x.shape, x.dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).to(COMPUTE_DTYPE)
        dx = fp8_matmul(dy2, weight.t()).view(ctx.x_shape).to(ctx.x_dtype)
        dweight = (dy2.t() @ x2).to(weight.dtype)
        dbias = dy2.sum(0, dtype=torch.float32).to(weight.dtype) if ctx.has_bias else None
        return dx, dweight, dbias


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with the forward and input-gradient GEMMs in FP8 (rowwise scales); bf16 output."""
    return _Float8Linear.apply(x, weight, bias)


class Float8Linear(nn.Linear):
    """nn.Linear whose training forward is `fp8_linear`; made by `convert_to_fp8` (class swap, no new
    parameters). In eval mode it is the plain linear, so sampling and evaluation read the same weights
    without the FP8 rounding."""

    def forward(self, x):
        if self.training:
            return fp8_linear(x, self.weight, self.bias)
        return super().forward(x)


def fits_fp8(linear: nn.Linear) -> bool:
    """torch._scaled_mm needs both weight dims divisible by 16."""
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def convert_to_fp8(*modules: nn.Module) -> list[nn.Linear]:
    """Make every nn.Linear inside `modules` (a generator's attention and MLP modules: `fp8_modules`) a
    Float8Linear in place; returns those converted. Linears whose dims are not multiples of 16 stay bf16; if
    none fit, raise."""
    converted, skipped = [], []
    for module in (m for mod in modules for m in mod.modules()):
        if type(module) is not nn.Linear:
            continue
        if fits_fp8(module):
            module.__class__ = Float8Linear
            converted.append(module)
        else:
            skipped.append(module)
    if not converted and skipped:
        raise ValueError(f"run.precision=fp8: no linear has both dims divisible by 16 (torch._scaled_mm needs "
                         f"it), e.g. {skipped[0]}; use a width and MLP ratio that are, or run.precision=bf16")
    return converted


def check_fp8_device(device: torch.device) -> None:
    """Raise unless the device runs FP8 GEMMs: CUDA compute capability 8.9 or newer (Ada, Hopper,
    Blackwell), or the CPU (slow; for tests)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(f"run.precision=fp8 needs FP8 tensor cores (compute capability 8.9 or newer: Ada, "
                             f"Hopper, Blackwell); {torch.cuda.get_device_name(device)} has {major}.{minor}. "
                             f"Use run.precision=bf16")


def use_fp8(model: nn.Module, device: torch.device) -> list[nn.Linear]:
    """Convert the linears of `model.fp8_modules()` to Float8Linear (before compile and sharding)."""
    check_fp8_device(device)
    return convert_to_fp8(*model.fp8_modules())
