"""pytest-benchmark setup for the GPU suites: GPU name, git revision and the copy-bandwidth ceiling
measured once per session on the same GPU, so that every result is a fraction of a ceiling measured
in the same run. Without CUDA every benchmark is skipped with one clear reason."""
import subprocess
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU; run `pytest benchmarks/` on a GPU machine")
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(skip)


def _git_revision() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _time_ms(fn, warmup: int = 5, iters: int = 20) -> float:
    """Median time of fn in ms, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@pytest.fixture(scope="session")
def gpu_ceilings():
    """Copy bandwidth (bytes read + written per second) and bf16 matmul rate of this GPU, measured now."""
    src = torch.randn(1 << 30, dtype=torch.bfloat16, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    copy_ms = _time_ms(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_ms = _time_ms(lambda: a @ b, iters=10)
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {
        "gpu": torch.cuda.get_device_name(),
        "git": _git_revision(),
        "copy_bytes_per_s": 2 * (1 << 30) * 2 / (copy_ms * 1e-3),
        "bf16_flops_per_s": 2 * 8192**3 / (mm_ms * 1e-3),
    }


@pytest.fixture
def report(benchmark, gpu_ceilings):
    """report(bytes_moved=..., flops=...) after a benchmark run: adds ms, GB/s or TFLOP/s and the fraction
    of the measured ceiling to the benchmark's extra_info (shown in pytest-benchmark's JSON output).
    launches_per_call: how many back-to-back launches one timed call made (the time is divided by it)."""

    def _report(*, bytes_moved: float = 0.0, flops: float = 0.0, launches_per_call: int = 1, **extra):
        seconds = benchmark.stats.stats.median / launches_per_call
        info = {"gpu": gpu_ceilings["gpu"], "git": gpu_ceilings["git"], "ms": seconds * 1e3, **extra}
        if bytes_moved:
            info["GB/s"] = bytes_moved / seconds / 1e9
            info["fraction_of_copy_bw"] = bytes_moved / seconds / gpu_ceilings["copy_bytes_per_s"]
        if flops:
            info["TFLOP/s"] = flops / seconds / 1e12
            info["fraction_of_bf16_peak"] = flops / seconds / gpu_ceilings["bf16_flops_per_s"]
        benchmark.extra_info.update(info)
        return info

    return _report
