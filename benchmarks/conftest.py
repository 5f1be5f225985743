"""pytest-benchmark setup for the GPU suites: GPU name, git revision and the copy-bandwidth ceiling
measured once per session on the same GPU, so that every result is a fraction of a ceiling measured
in the same run; the regression guard (benchmarks/guard.py): by default only its cases run, `--bench-full`
runs every benchmark. Without CUDA every benchmark is skipped with one clear reason."""
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import ROOT
from benchmarks.guard import BASELINES, MARGIN, baseline_file, judge, load_baseline, save_baseline, table

HERE = Path(__file__).parent
GUARD_FILE = HERE / "test_guard.py"


def pytest_addoption(parser):
    group = parser.getgroup("fae_fast benchmarks")
    group.addoption("--bench-full", action="store_true",
                    help="run every benchmark (sweeps, every size and provider), not only the guarded cases")
    group.addoption("--bench-record", action="store_true",
                    help="write this run's ratios as the baseline of this GPU kind (benchmarks/baselines/)")
    group.addoption("--bench-baselines", default=str(BASELINES),
                    help="folder of the per-GPU baseline files (default benchmarks/baselines)")
    group.addoption("--bench-margin", type=float, default=MARGIN,
                    help=f"relative fall of a ratio below its baseline that fails a case (default {MARGIN})")


def pytest_collection_modifyitems(config, items):
    ours = [item for item in items if HERE in Path(item.fspath).parents]
    if not config.getoption("--bench-full", default=False):
        unguarded = [item for item in ours if Path(item.fspath) != GUARD_FILE]
        if unguarded:
            config.hook.pytest_deselected(items=unguarded)
            dropped = set(unguarded)
            items[:] = [item for item in items if item not in dropped]
            config._bench_deselected = len(unguarded)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU; run `pytest benchmarks/` on a GPU machine")
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(skip)


class Guard:
    """Judges each guarded Result against this GPU kind's stored ratios as it comes (a case fails when a
    ratio fell more than the margin), and keeps the rows for the closing table and the baseline file."""

    def __init__(self, config, gpu_name: str, revision: str, folder: Path = BASELINES):
        self.gpu, self.revision = gpu_name, revision
        self.path = baseline_file(gpu_name, folder)
        self.stored = load_baseline(self.path)
        self.recording = config.getoption("--bench-record") or self.stored is None
        self.margin = config.getoption("--bench-margin")
        self.rows = []

    def check(self, result):
        stored = (self.stored or {}).get(result.case)
        verdict, why = judge(result, stored, self.margin)
        self.rows.append((result, stored, "recorded" if self.recording else verdict))
        if verdict == "slower" and not self.recording:
            pytest.fail(f"{result.case} on {self.gpu} regressed: {why}. If the change is meant, run "
                        f"`pytest benchmarks/ --bench-record` and commit {self.path.name}", pytrace=False)


@pytest.fixture(scope="session")
def guard(request, gpu_ceilings):
    g = Guard(request.config, gpu_ceilings["gpu"], gpu_ceilings["git"],
              Path(request.config.getoption("--bench-baselines")))
    request.config._bench_guard = g
    return g


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    deselected = getattr(config, "_bench_deselected", 0)
    if deselected:
        terminalreporter.write_line(f"benchmarks: {deselected} unguarded benchmarks not run (--bench-full runs them)")
    g = getattr(config, "_bench_guard", None)
    if g is None or not g.rows:
        return
    terminalreporter.section(f"benchmark guard, {g.gpu} (margin {g.margin:.0%})")
    terminalreporter.write_line(table(g.rows))
    if g.recording:
        if g.stored is None:
            terminalreporter.write_line(f"no stored baseline for {g.gpu}: recorded this run's ratios")
        save_baseline(g.path, g.gpu, g.revision, [r for r, _, _ in g.rows])
        terminalreporter.write_line(f"wrote {g.path} (commit it to guard this GPU kind)")
        return
    new = [r for r, _, verdict in g.rows if verdict == "new"]
    if new:
        save_baseline(g.path, g.gpu, g.revision, new)
        terminalreporter.write_line(f"{len(new)} cases had no stored baseline on {g.gpu}: added them to {g.path} "
                                    f"(commit it)")


def _git_revision() -> str:
    """The commit measured: git's HEAD where this tree is a git checkout, else (a `git archive` copy, which
    may sit inside some other repository) the commit named in the tree's REVISION file."""
    try:
        top, head = subprocess.check_output(["git", "rev-parse", "--show-toplevel", "--short", "HEAD"], cwd=ROOT,
                                            text=True, stderr=subprocess.DEVNULL).split()
        if Path(top).resolve() == ROOT:
            return head
    except (OSError, subprocess.CalledProcessError, ValueError):
        pass
    stamp = ROOT / "REVISION"
    return stamp.read_text().strip() if stamp.is_file() else "unknown"


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


def profiled(fn, warmup: int = 3, iters: int = 10):
    """The profiler's record (CUDA activity) of `iters` calls of fn, after `warmup` calls outside it (compile
    and autotuning happen there)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return prof


def _kernel_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    """GPU time of one call of fn in ms: the summed durations of the kernels (and copies) the profiler saw
    it launch, over `iters` calls. Host time and launch gaps are left out, so a single small op measures
    its kernels, not the Python that launches them (CUDA events around one call measure the latter)."""
    from torch.autograd import DeviceType

    prof = profiled(fn, warmup, iters)
    on_gpu = [e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA]
    if not on_gpu:
        raise RuntimeError("the profiler saw no GPU kernels; is CUPTI available to this process?")
    return sum(on_gpu) / iters / 1e3


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
