"""Whole models at the paper's sizes on the GPU: an XL generator block (LightningDiT and SiT) and the full-size
FAE encoder, with impl="triton" against impl="torch", both under bf16 autocast, each judged against an fp32
run of the reference ops on the same weights and inputs by the 2x rule: the fused path's relative error (output
and every gradient) is at most twice that of PyTorch's own bf16 computation, plus a small floor.

Skipped without CUDA (the CPU suite checks the same equivalence at tiny sizes through the interpreter).
"""
import pytest
import torch

from fae_fast.config import fae_config, generator_config
from fae_fast.fae import FAEEncoder
from fae_fast.generators import Block
from fae_fast.layers import Ops

pytestmark = pytest.mark.gpu

FLOOR = 2e-3  # relative error allowed on top of the 2x rule (bf16 epsilon is 7.8e-3)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def run(module, inputs, dout, autocast: bool):
    """Output and the gradients of every input and parameter, for one forward + backward."""
    module.zero_grad(set_to_none=True)
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = module(*leaves)
    out.backward(dout.to(out.dtype))
    grads = {f"d{i}": x.grad for i, x in enumerate(leaves)}
    grads |= {n: p.grad for n, p in module.named_parameters()}
    return out.detach(), grads


def away_from_the_zero_start(module):
    """Weights away from adaLN-Zero and unit norms, so that every path does work."""
    for name, p in module.named_parameters():
        if "norm" in name and not name.endswith("bias"):  # norm weights (and QK-norm) near 1
            p.data.normal_(1.0, 0.1)
        else:
            p.data.normal_(0.0, 0.02)
    return module


def check_2x(make, inputs, dout):
    """make(impl) -> module; the same weights for all three runs."""
    torch.manual_seed(0)
    ref = away_from_the_zero_start(make("torch").cuda())
    fused = make("triton").cuda()
    fused.load_state_dict(ref.state_dict())
    out64, grads64 = run(ref, inputs, dout, autocast=False)  # fp32 reference (tf32 off by default)
    out_t, grads_t = run(ref, inputs, dout, autocast=True)
    out_k, grads_k = run(fused, inputs, dout, autocast=True)
    failures = []
    for name, want, lowp, got in [("out", out64, out_t, out_k)] + [
            (n, grads64[n], grads_t[n], grads_k[n]) for n in grads64 if grads64[n] is not None]:
        assert got is not None, f"{name}: no gradient through the fused path"
        e_k, e_t = rel_err(got, want), rel_err(lowp, want)
        if not e_k <= 2 * e_t + FLOOR:
            failures.append(f"{name}: fused {e_k:.2e} vs torch bf16 {e_t:.2e}")
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("size", ["LightningDiT-XL/1", "SiT-XL/1"])
def test_xl_block_fused_matches_reference(size):
    cfg = generator_config(size)
    B, T, D = 32, cfg.grid ** 2, cfg.width
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(B, T, D, device="cuda", generator=g)
    c = torch.randn(B, D, device="cuda", generator=g)
    dout = torch.randn(B, T, D, device="cuda", generator=g)
    check_2x(lambda impl: Block(cfg, Ops(impl)), [x, c], dout)


UNRELATED = 0.1
"""Relative error above which a bf16 result is not rounding (bf16's epsilon is 7.8e-3): the cuDNN backward
that misread the output gradient's layout gave 1.4 on the attention gradients."""


@pytest.mark.parametrize("backend", ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient"])
@pytest.mark.parametrize("size", ["LightningDiT-XL/1", "SiT-XL/1"])
def test_xl_block_gradients_with_each_attention_backend(size, backend, monkeypatch):
    """The fused block (bf16 autocast) with each attention backend forced, against the fp32 reference block: the
    chooser may pick any of them, and the 2x rule alone cannot see a backend that is wrong in both paths."""
    from fae_fast import attention

    if backend not in attention.candidates():
        pytest.skip(f"{backend} is not available here")
    cfg = generator_config(size)
    B, T, D = 32, cfg.grid ** 2, cfg.width
    monkeypatch.setitem(attention._CHOICE, (B, cfg.heads, T, D // cfg.heads, torch.bfloat16, "cuda", False), backend)
    g = torch.Generator("cuda").manual_seed(1)
    x, c, dout = (torch.randn(*shape, device="cuda", generator=g) for shape in ((B, T, D), (B, D), (B, T, D)))
    torch.manual_seed(0)
    ref = away_from_the_zero_start(Block(cfg, Ops("torch")).cuda())
    fused = Block(cfg, Ops("triton")).cuda()
    fused.load_state_dict(ref.state_dict())
    out32, grads32 = run(ref, [x, c], dout, autocast=False)
    out, grads = run(fused, [x, c], dout, autocast=True)
    errors = {"out": rel_err(out, out32)}
    errors |= {n: rel_err(grads[n], want) for n, want in grads32.items() if want is not None}
    assert max(errors.values()) < UNRELATED, {n: f"{e:.2e}" for n, e in errors.items() if e >= UNRELATED}


def test_full_size_fae_encoder_fused_matches_reference():
    cfg = fae_config("FAE-DINOv2-g")
    g = torch.Generator("cuda").manual_seed(2)
    x = torch.randn(16, cfg.grid ** 2, cfg.feature_dim, device="cuda", generator=g)

    from fae_fast.kernels.reparameterize import reparameterize_noise, reparameterize_ref

    eps = reparameterize_noise((16, cfg.grid ** 2, cfg.latent_dim), 5, device="cuda")

    class Latents(torch.nn.Module):  # moments -> z and the KL: the fused kernel, or the reference on its noise
        def __init__(self, impl):
            super().__init__()
            self.enc = FAEEncoder(cfg, impl)

        def forward(self, feats):
            if self.enc.ops.impl == "triton":
                z, _, kl = self.enc.encode(feats, seed=5)
            else:
                z, kl = reparameterize_ref(self.enc(feats), eps)
            return torch.cat([z.float().flatten(1), kl.float()[:, None]], dim=1)

    dout = torch.randn(16, cfg.grid ** 2 * cfg.latent_dim + 1, device="cuda", generator=g)
    check_2x(Latents, [x], dout)
