"""One whole XL generator block (LightningDiT-XL/1 and SiT-XL/1 shapes: 256 tokens, width 1152, 16 heads),
forward and forward + backward under bf16 autocast with fp32 weights (as train_gen.py runs it on one GPU),
batch 128: providers torch (reference ops, eager), torch.compile (reference ops, the block compiled) and
fae_fast (fused kernels, the block compiled), measured in the same run. Reports ms and TFLOP/s (matmul +
attention FLOPs of the block) as a fraction of the bf16 peak measured in the run (benchmarks/conftest.py).

    pytest benchmarks/test_bench_block.py --benchmark-json=block.json
"""
import pytest
import torch

from fae_fast.config import generator_config
from fae_fast.generators import Block, choose_attention_backend, forward_flops_per_sample
from fae_fast.layers import Ops

B = 128
LAUNCHES_PER_CALL = 5


def make_block(size: str, provider: str):
    cfg = generator_config(size)
    torch.manual_seed(0)
    block = Block(cfg, Ops("triton" if provider == "fae_fast" else "torch")).cuda()
    for p in block.parameters():  # not adaLN-Zero: the modulations and gates carry values
        p.data.normal_(0.0, 0.02)
    if provider != "torch":
        torch._dynamo.reset()
        block.compile()
    return cfg, block


def block_step(cfg, block, backward: bool = True):
    """One forward (and backward) of `block` on random bf16 x (B, T, D), c (B, D) under bf16 autocast, with
    the attention backend measured for the shape first."""
    T, D = cfg.grid ** 2, cfg.width
    choose_attention_backend(cfg, B, torch.bfloat16, "cuda")
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    c = torch.randn(B, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = block(x, c)
        if backward:
            out.backward(dout)

    return step


@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("provider", ["torch", "torch.compile", "fae_fast"])
@pytest.mark.parametrize("size", ["LightningDiT-XL/1", "SiT-XL/1"])
def test_block(benchmark, report, size, provider, mode):
    cfg, block = make_block(size, provider)
    step = block_step(cfg, block, backward=mode == "full")

    def timed():
        for _ in range(LAUNCHES_PER_CALL):
            step()
        torch.cuda.synchronize()

    timed()  # compile outside the timing
    benchmark.group = f"{size} block {mode}"
    benchmark.pedantic(timed, rounds=10, iterations=1, warmup_rounds=2)
    flops = B * forward_flops_per_sample(cfg) / cfg.depth * (3 if mode == "full" else 1)
    report(flops=flops, launches_per_call=LAUNCHES_PER_CALL, size=size, provider=provider, mode=mode)
