"""The fused layers where training uses them: inside FSDP2-sharded blocks (bf16 parameters through a
MixedPrecisionPolicy, one rank in this process: gloo on CPU, NCCL on a GPU) and under bf16 autocast, against
the same model built with impl="torch". CPU: the Triton kernels run through the interpreter (conftest.py)."""
import os

import pytest
import torch
import torch.distributed as dist

from fae_fast.config import generator_config
from fae_fast.generators import Generator
from fae_fast.train.parallelize import parallelize
from fae_fast.train.runtime import init_distributed

from conftest import DIST_ENV, restore_env  # noqa: E402 (tests/ is on sys.path)
from kernel_testing import TOL  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:FSDP2-wrapped module .* returned a view tensor")]
CFG = dict(in_channels=4, grid=4, num_classes=10, width=72, heads=2, depth=2)  # head dim 36, odd widths


@pytest.fixture(scope="module", autouse=True)
def process_group():
    saved = {k: os.environ.get(k) for k in DIST_ENV}
    started_here = not dist.is_initialized()
    yield init_distributed()  # its device: cuda:0 on a GPU machine, else cpu
    if started_here and dist.is_initialized():
        dist.destroy_process_group()
    restore_env(saved)


def pair(size: str, device):
    """The same random weights (not adaLN-Zero, so every block works) as impl='torch' and impl='triton'."""
    cfg = generator_config(size, **CFG)
    torch.manual_seed(0)
    ref = Generator(cfg, impl="torch").to(device)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.1)
    fused = Generator(cfg, impl="triton").to(device)
    fused.load_state_dict(ref.state_dict())
    return cfg, ref, fused


def inputs(cfg, device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, cfg.grid ** 2, cfg.in_channels, generator=g)
    out = x, torch.rand(3, generator=g), torch.tensor([0, 4, cfg.num_classes]), torch.randn(x.shape, generator=g)
    return [a.to(device) for a in out]


def loss_and_grads(model, x, t, y, dout, autocast: bool):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(x, t, y)
    (out.float() * dout).sum().backward()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float()
             for n, p in model.named_parameters()}
    return out.detach().float(), grads


def assert_close_all(got, want):
    out_g, grads_g = got
    out_w, grads_w = want
    torch.testing.assert_close(out_g, out_w, **TOL[torch.bfloat16])
    for name in grads_w:
        scale = grads_w[name].abs().max().clamp_min(1e-3)  # gradients compared relative to their size
        torch.testing.assert_close(grads_g[name] / scale, grads_w[name] / scale, **TOL[torch.bfloat16], msg=name)


@pytest.mark.parametrize("size", ["LightningDiT-tiny/1", "SiT-tiny/1"])
def test_fused_blocks_inside_fsdp2_match_the_reference(size, process_group):
    cfg, ref, fused = pair(size, process_group.device)
    for model in (ref, fused):  # bf16 parameters and compute, fp32 gradient reduction, as train_gen on N GPUs
        parallelize(model, model.blocks, precision="bf16", compile=False, shard=True)
    x, t, y, dout = inputs(cfg, process_group.device)
    got, want = loss_and_grads(fused, x, t, y, dout, False), loss_and_grads(ref, x, t, y, dout, False)
    assert all(hasattr(p, "full_tensor") for p in fused.parameters()), "parameters should be FSDP2 DTensors"
    assert_close_all(got, want)


@pytest.mark.parametrize("size", ["LightningDiT-tiny/1", "SiT-tiny/1"])
def test_fused_blocks_under_bf16_autocast_match_the_reference(size, process_group):
    cfg, ref, fused = pair(size, process_group.device)
    x, t, y, dout = inputs(cfg, process_group.device)
    got, want = loss_and_grads(fused, x, t, y, dout, True), loss_and_grads(ref, x, t, y, dout, True)
    assert got[0].dtype == torch.float32 and fused.blocks[0].adaLN[1].weight.grad.dtype == torch.float32
    assert_close_all(got, want)
