"""One LightningDiT-XL/1 / SiT-XL/1 training step at batch 128 on one GPU: fae_fast (fused kernels +
per-block compile; in FP8; with FSDP2 on the one GPU) against the plain PyTorch reference of the same model, eager,
compiled per block, compiled whole, and with torchao's float8 training, in the same run. Reports images/s, MFU (fraction of the bf16 peak measured in this run), peak memory
and the first (compiling) step's time."""
import pytest
import torch

from benchmarks.train_step import prepare
from fae_fast.generators import forward_flops_per_sample
from fae_fast.train.runtime import init_distributed

BATCH = 128


@pytest.mark.parametrize("size", ["LightningDiT-XL/1", "SiT-XL/1"])
@pytest.mark.parametrize("provider", ["torch", "torch.compile", "torch.compile.whole", "torchao.float8",
                                      "torchao.float8.blocks", "fae_fast", "fae_fast.fp8", "fae_fast.fsdp"])
def test_train_step(benchmark, report, provider, size):
    if provider.startswith("torchao.float8"):
        pytest.importorskip("torchao", reason="the torchao.float8 provider needs torchao (pip install torchao)")
    d = init_distributed()
    torch.cuda.empty_cache()
    cfg, step, first_step_s = prepare(provider, size, BATCH, d.device)

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=15, warmup_rounds=3)
    report(flops=BATCH * 3 * forward_flops_per_sample(cfg), provider=provider, size=size)
    benchmark.extra_info.update(images_per_s=BATCH / benchmark.stats.stats.median,
                                peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30, first_step_s=first_step_s)
