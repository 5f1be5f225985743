"""FSDP2 all-gathers of the FP8 linears' weights in FP8 (`run.precision=fp8` on several ranks, `run.fp8_all_gather`).

Under FSDP2 each rank holds a shard of rows of every weight and all-gathers the whole weight before a block's
forward and backward, in bf16 (the mixed-precision policy): 2 bytes a value on the wire. The FP8 linear's
forward quantises that weight rowwise along K anyway (fae_fast/fp8.py), and a row lies whole in one shard, so
each rank can quantise its own rows before the all-gather: 1 byte a value and one fp32 scale a row go over
the wire, and after it the weight is rebuilt in bf16 as q * s. The scales are powers of two, so q * s is exact
in bf16, and quantising with a power-of-two scale is rounding to e4m3's 4 significant bits (in its normal
range): the forward's own rowwise quantisation of q * s gives back the same values, and so does the input
gradient's quantisation along N, except for values in e4m3's subnormal range under their column's scale
(rounded twice). **The training numbers are those of the bf16 all-gather** (tests/test_fp8.py: two CPU ranks,
equal losses and gradients). Master weights, their gradients (reduce-scattered in fp32) and the optimizer are
untouched.

FSDP2 finds the hooks (`fsdp_pre_all_gather`, `fsdp_post_all_gather`) on the sharded parameter's local
tensor, so the weights go through FSDP2 wrapped in `Float8AllGatherWeight`, a thin tensor subclass: every op
on it runs on the plain tensor inside and returns plain tensors, except the few FSDP2 uses to shard it
(views, slices, splits, copies into a new padded tensor), which keep the wrapper. `wrap_for_fp8_all_gather`
applies it before `fully_shard`; `plain_state_dict_hook` hands checkpoints the plain tensors, so checkpoints
are the same as with the bf16 all-gather.

A weight whose rows do not split evenly over the ranks keeps the bf16 all-gather (FSDP2 pads such shards,
and the scales' all-gather input would not have the padded shape). In eval mode (the samples and scores a run
makes as it trains) the FP8 linears compute in bf16 from the gathered weight, which is then q * s, the weight's
FP8 rounding; exported weights and checkpoints hold the weights themselves.
"""
import torch
import torch.nn as nn
from torch.utils._pytree import tree_map_only

from fae_fast.fp8 import COMPUTE_DTYPE, Float8Linear, _quantizer

aten = torch.ops.aten

_KEEP_WRAPPER = {aten.view.default, aten.as_strided.default, aten.slice.Tensor, aten.split.Tensor,
                 aten.split_with_sizes.default, aten.chunk.default, aten.narrow.default, aten.new_zeros.default,
                 aten.empty_like.default, aten.copy_.default, aten.detach.default, aten.alias.default}
"""The ops FSDP2 applies to a parameter while sharding it; their results stay wrapped (a CPU test fails if the
sharded local tensor comes out plain)."""


class Float8AllGatherWeight(torch.Tensor):
    """A weight (N, K) whose FSDP2 all-gather carries it in FP8: see the module docstring."""

    @staticmethod
    def __new__(cls, tensor: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, tensor.shape, strides=tensor.stride(),
                                                   storage_offset=tensor.storage_offset(), dtype=tensor.dtype,
                                                   device=tensor.device, requires_grad=tensor.requires_grad)

    def __init__(self, tensor: torch.Tensor):
        self._tensor = tensor

    def __repr__(self):
        return f"Float8AllGatherWeight({self._tensor!r})"

    def __tensor_flatten__(self):
        return ["_tensor"], None

    @staticmethod
    def __tensor_unflatten__(inner, _meta, _outer_size, _outer_stride):
        return Float8AllGatherWeight(inner["_tensor"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrapped = tree_map_only(Float8AllGatherWeight, lambda t: t._tensor, (args, kwargs or {}))
        out = func(*unwrapped[0], **unwrapped[1])
        if func not in _KEEP_WRAPPER:
            return out
        return tree_map_only(torch.Tensor, Float8AllGatherWeight, out)

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """This rank's rows quantised as the FP8 linear's forward quantises them (from the bf16 weight): the
        1-byte values and their fp32 scales, both (rows, ...) so FSDP2 stacks the ranks' rows in order."""
        rows = self._tensor.to(COMPUTE_DTYPE)
        q, scale = _quantizer(rows)(rows.contiguous())
        return (q.view(torch.uint8), scale), None  # bytes: gloo has no float8 all-gather

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        """The whole weight as q * s in `param_dtype` (exact: s is a power of two), into `out` after the
        first all-gather."""
        q, scale = outputs[0].view(torch.float8_e4m3fn), outputs[1]
        if out is not None:
            # the backward's all-gather refills the forward's weight with the same values: keep its version,
            # which the FP8 linears' saved-tensor check reads (FSDP2's own refill does the same)
            with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(out):
                torch.mul(q.to(out.dtype), scale.to(out.dtype), out=out)
            return None
        weight = q.to(param_dtype) * scale.to(param_dtype)
        return weight, (weight,)


def wrap_for_fp8_all_gather(model: nn.Module, world_size: int) -> list[str]:
    """Wrap the weights of the model's Float8Linears (made by fae_fast.fp8.use_fp8) whose rows split evenly
    over `world_size` ranks in Float8AllGatherWeight, before fully_shard; returns their names. Installs
    `plain_state_dict_hook` on the model."""
    wrapped = []
    for name, module in model.named_modules():
        if type(module) is not Float8Linear or module.weight.shape[0] % world_size:
            continue
        module.weight = nn.Parameter(Float8AllGatherWeight(module.weight.data),
                                     requires_grad=module.weight.requires_grad)
        wrapped.append(f"{name}.weight")
    if wrapped:
        model._register_state_dict_hook(plain_state_dict_hook)
    return wrapped


def plain(t: torch.Tensor) -> torch.Tensor:
    """t with a Float8AllGatherWeight (itself, or a DTensor's local shard) replaced by the plain tensor inside,
    sharing its storage; anything else as it is."""
    local = getattr(t, "_local_tensor", None)
    if isinstance(local, Float8AllGatherWeight):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local._tensor, t.device_mesh, t.placements, run_check=False, shape=t.shape,
                                  stride=t.stride())
    return t._tensor if isinstance(t, Float8AllGatherWeight) else t


def plain_state_dict_hook(module, state_dict, prefix, local_metadata):
    """A state-dict hook: the wrapped weights as plain tensors (DTensors under FSDP2) sharing their storage,
    so that saving writes them as any weight and loading in place fills the parameters."""
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            state_dict[key] = plain(value)
    return state_dict
