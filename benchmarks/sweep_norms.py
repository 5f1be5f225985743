"""Launch-configuration sweep of the norm kernels (modulated_norm, gated_residual, the fused pair) on one GPU.

    python benchmarks/sweep_norms.py [--quick] [--widths 1152 1536] [--no-compile] [--budget 230]

bf16, x (256, 256, D), per-sample modulation taken as chunks of one adaLN output (as in the blocks), norms
"layer" (LayerNorm, no weight) and "rms_w" (RMSNorm with weight). For each op it times the raw launchers
(forward; backward from one saved forward) under several RowLoop launch configurations (kernels/utils.py),
each checked first against the default configuration's outputs (bitwise, or within one bf16 rounding where
the order of a sum changes), then the torch.compile'd reference (forward; backward alone via autograd.grad;
full) and the public op's full step. Times are triton.testing.do_bench medians (L2 flushed before each run),
reported as ms, GB/s over the minimal bytes (each input read once, each output written once) and the
fraction of the bandwidth of a 2 GiB device-to-device copy measured here (bytes read + written).

Prints one line per timing as it goes, then a summary table and, per kernel kind, the configurations ranked
by their geometric-mean slowdown against the best one of each case (what to make the default); writes every
number to $OUT/sweep_norms.json when OUT is set. --budget (seconds) skips what is left once spent, so one run
fits a time limit; the summary still prints. Where the checkout has git history, the kernels of
BASELINE_COMMIT (before the launch rework) are timed beside the current ones, and checked against them.
"""
import argparse
import functools
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: fae_fast.kernels -> kernels/

from fae_fast.kernels.gated_residual import (  # noqa: E402
    gated_residual, gated_residual_fwd, gated_residual_modulated_norm, gated_residual_modulated_norm_ref,
    gated_residual_ref,
)
from fae_fast.kernels.modulated_norm import (  # noqa: E402
    modulated_norm, modulated_norm_bwd, modulated_norm_fwd, modulated_norm_ref,
)
from fae_fast.kernels.norm_rows import norm_residual_bwd  # noqa: E402
from fae_fast.kernels.utils import RowLoop, norm_bwd_launch, norm_fwd_launch  # noqa: E402

B, T = 256, 256
DEVICE = "cuda"
BF16 = torch.bfloat16
EPS = 1e-6
NORMS = {"layer": ("layer", False), "rms_w": ("rms", True)}
# Forward: (rows, num_warps, rows_per_program, num_stages); rows_per_program == rows is one tile per program
# (the old one-shot grid; (2, 8, 2, 1) has the old default's tile), larger walks that many tokens of a sample
# with the next num_stages - 1 tiles' loads in flight.
FWD = [(1, 4, 1, 1), (1, 8, 1, 1), (2, 8, 2, 1), (4, 8, 4, 1),
       (1, 8, 16, 4), (2, 8, 16, 4), (2, 8, 32, 3), (2, 8, 32, 4), (2, 8, 32, 6), (2, 8, 64, 4), (2, 4, 32, 4),
       (4, 8, 32, 3)]
# Backward: (rows, num_warps, chunks per sample, num_stages); each program sums its chunk of a sample's
# tokens into one fp32 partial row. 5 chunks is what reduction_grid picks on 132 SMs at B = 256.
BWD = [(1, 8, 5, 1), (1, 8, 5, 3), (1, 8, 5, 4), (1, 8, 5, 6), (1, 16, 5, 4), (1, 16, 5, 6), (2, 8, 5, 3),
       (1, 4, 5, 3), (1, 8, 2, 4), (1, 8, 8, 4), (1, 8, 16, 4), (1, 8, 8, 6)]
# The kernels before this sweep's changes (commit "Modulated norm and gated residual kernels"), timed beside
# the current ones when the checkout has its history.
BASELINE_COMMIT = "3b1e5df"
QUICK_FWD = [(2, 8, 2, 1), (2, 8, 32, 3), (2, 8, 32, 6), (4, 8, 32, 3)]
QUICK_BWD = [(1, 8, 5, 1), (1, 8, 5, 6), (1, 16, 5, 6), (1, 8, 8, 4)]


def fwd_launch(rows, warps, rows_per_program, stages) -> RowLoop:
    return RowLoop(rows=rows, num_warps=warps, rows_per_program=rows_per_program, num_stages=stages)


def bwd_launch(rows, warps, chunks, stages) -> RowLoop:
    per_chunk = triton.cdiv(triton.cdiv(T, chunks), rows) * rows
    return RowLoop(rows=rows, num_warps=warps, rows_per_program=per_chunk, num_stages=stages)


def label(launch) -> str:
    if launch is None:
        return "default"
    return f"r{launch.rows}w{launch.num_warps}p{launch.rows_per_program}s{launch.num_stages}"


def randn(*shape, grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=BF16, requires_grad=grad)


def norm_weight(D, with_weight):
    """A norm weight (D,) around 1, or None."""
    return (torch.rand(D, device=DEVICE, dtype=BF16) + 0.5).requires_grad_() if with_weight else None


def load_baseline():
    """(modulated_norm, gated_residual) modules of BASELINE_COMMIT without their torch.library registrations
    (they would clash with the current ones), importing the current utils; (None, None) without git or that
    commit."""
    sources = {}
    for name in ("modulated_norm", "gated_residual"):
        try:
            sources[name] = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:kernels/{name}.py"], cwd=ROOT,
                                           check=True, capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None, None
    folder, modules = tempfile.mkdtemp(), []
    for name, src in sources.items():
        head, rest = src.split("# --- torch.library registration", 1)
        src = (head + rest[rest.index("# --- public functional"):]).replace(
            "from .modulated_norm import", "from ._baseline_modulated_norm import")
        path = Path(folder) / f"_baseline_{name}.py"  # a file: @triton.jit reads its functions' source
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(f"fae_fast.kernels._baseline_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules.append(module)
    return tuple(modules)


BASE_MN, BASE_GR = None, None


# --- cases: launchers to sweep, reference and public op to compare, minimal bytes ---------------------------


def modulated_norm_case(D, norm, with_weight):
    """fwd reads x, scale, shift, weight, writes y; bwd reads dy, x, scale, weight, writes dx, dscale, dshift,
    dweight (saved row statistics not counted)."""
    x = randn(B, T, D, grad=True)
    shift, scale = randn(B, 2 * D, grad=True).chunk(2, dim=-1)
    weight = norm_weight(D, with_weight)
    dy = randn(B, T, D)
    xd, sd, hd, wd = (None if t is None else t.detach() for t in (x, scale, shift, weight))
    fwd = lambda launch: modulated_norm_fwd(xd, sd, hd, wd, norm, EPS, launch=launch)  # noqa: E731
    _, mean, rstd = fwd(None)
    bwd = lambda launch: modulated_norm_bwd(dy, xd, sd, wd, mean, rstd, norm, BF16, launch=launch)  # noqa: E731
    base = BASE_MN and dict(fwd=lambda: BASE_MN.modulated_norm_fwd(xd, sd, hd, wd, norm, EPS),
                            bwd=lambda: BASE_MN.modulated_norm_bwd(dy, xd, sd, wd, mean, rstd, norm, BF16))
    n, m, w = B * T * D * 2, B * D * 2, (D * 2 if with_weight else 0)
    return dict(fwd=fwd, bwd=bwd, base=base, ref=functools.partial(modulated_norm_ref, norm=norm),
                op=functools.partial(modulated_norm, norm=norm), args=(x, scale, shift, weight),
                leaves=tuple(t for t in (x, scale, shift, weight) if t is not None), grads=(dy,),
                bytes={"fwd": 2 * n + 2 * m + w, "bwd": 3 * n + 3 * m + 2 * w})


def gated_residual_case(D, norm=None, with_weight=False):
    """fwd reads x, gate, y, writes h; bwd reads dh, y, gate, writes dy, dgate (dx is dh itself)."""
    x, y, dh = randn(B, T, D, grad=True), randn(B, T, D, grad=True), randn(B, T, D)
    gate = randn(B, 3 * D, grad=True)[:, :D]
    xd, gd, yd = x.detach(), gate.detach(), y.detach()
    fwd = lambda launch: gated_residual_fwd(xd, gd, yd, launch=launch)[:1]  # noqa: E731
    bwd = lambda launch: norm_residual_bwd(None, None, None, None, None, None, "layer", BF16, dh, gd, yd,  # noqa: E731
                                           launch=launch)
    base = BASE_GR and dict(
        fwd=lambda: BASE_GR.gated_residual_fwd(xd, gd, yd)[:1],
        bwd=lambda: BASE_MN.norm_residual_bwd(None, None, None, None, None, None, "layer", BF16, dh, gd, yd))
    n, m = B * T * D * 2, B * D * 2
    return dict(fwd=fwd, bwd=bwd, base=base, ref=gated_residual_ref, op=gated_residual, args=(x, gate, y),
                leaves=(x, gate, y), grads=(dh,), bytes={"fwd": 3 * n + m, "bwd": 3 * n + 2 * m})


def fused_case(D, norm, with_weight):
    """h = x + gate * y, n = modulated_norm(h). fwd reads x, y, gate, scale, shift, weight, writes h, n; bwd
    reads dh, dn, h, y, gate, scale, weight, writes dx, dy, dgate, dscale, dshift, dweight."""
    x, y = randn(B, T, D, grad=True), randn(B, T, D, grad=True)
    gate, scale, shift = randn(B, 3 * D, grad=True).chunk(3, dim=-1)
    weight = norm_weight(D, with_weight)
    dh, dn = randn(B, T, D), randn(B, T, D)
    xd, gd, yd, sd, hd, wd = (None if t is None else t.detach() for t in (x, gate, y, scale, shift, weight))
    fwd = lambda launch: gated_residual_fwd(xd, gd, yd, sd, hd, wd, norm, EPS, launch=launch)  # noqa: E731
    h, _, mean, rstd = fwd(None)
    bwd = lambda launch: norm_residual_bwd(dn, h, sd, wd, mean, rstd, norm, BF16, dh, gd, yd,  # noqa: E731
                                           launch=launch)
    base = BASE_GR and dict(
        fwd=lambda: BASE_GR.gated_residual_fwd(xd, gd, yd, sd, hd, wd, norm, EPS),
        bwd=lambda: BASE_MN.norm_residual_bwd(dn, h, sd, wd, mean, rstd, norm, BF16, dh, gd, yd))
    n, m, w = B * T * D * 2, B * D * 2, (D * 2 if with_weight else 0)
    return dict(fwd=fwd, bwd=bwd, base=base, ref=functools.partial(gated_residual_modulated_norm_ref, norm=norm),
                op=functools.partial(gated_residual_modulated_norm, norm=norm),
                args=(x, gate, y, scale, shift, weight),
                leaves=tuple(t for t in (x, gate, y, scale, shift, weight) if t is not None), grads=(dh, dn),
                bytes={"fwd": 4 * n + 3 * m + w, "bwd": 6 * n + 5 * m + 2 * w})


OPS = {"modulated_norm": (modulated_norm_case, list(NORMS)),
       "gated_residual_modulated_norm": (fused_case, list(NORMS)),
       "gated_residual": (gated_residual_case, ["-"])}


# --- checks and timing -------------------------------------------------------------------------------------


def outputs(result) -> list:
    return [t for t in result if isinstance(t, torch.Tensor) and t.numel() > 0]


def poison_cache(like: list) -> None:
    """Fill freed allocator blocks of the outputs' sizes with NaN, so that an output a variant leaves unwritten
    shows up (best effort: the caching allocator hands recently freed blocks of a size back first)."""
    blocks = [torch.full_like(t, float("nan")) for t in like]
    del blocks


def agreement(got: list, want: list) -> str:
    """'bitwise', or 'bf16' when every element is within one bf16 rounding of the default's (sums in another
    order); raises on anything else."""
    if len(got) != len(want):
        raise AssertionError(f"{len(got)} outputs, default has {len(want)}")
    kind = "bitwise"
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape or g.dtype != w.dtype:
            raise AssertionError(f"output {i}: {tuple(g.shape)} {g.dtype}, default {tuple(w.shape)} {w.dtype}")
        if torch.equal(g, w):
            continue
        g, w = g.float(), w.float()
        scale = w.abs().mean().item()
        bad = ~((g - w).abs() <= 2**-7 * (w.abs() + scale))  # NaN (unwritten, poisoned) counts as bad
        if bad.any():
            raise AssertionError(f"output {i}: {int(bad.sum())} elements differ from the default, max "
                                 f"|diff| {(g - w).abs().nan_to_num(float('inf')).max().item():.3g}")
        kind = "bf16"
    return kind


def copy_ms(args) -> float:
    """Median time of a 2 GiB bf16 device-to-device copy."""
    src = torch.randn(1 << 30, device=DEVICE, dtype=BF16)
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src), args)


def bench(fn, args) -> float:
    fn()  # compile / autotune outside the timing
    return do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")


class Sweep:
    def __init__(self, args):
        self.args, self.results, self.start = args, [], time.time()
        self.copy_bps = None

    def out_of_time(self) -> bool:
        return time.time() - self.start > self.args.budget

    def record(self, case, op, norm, D, mode, provider, config, ms, check=""):
        moved = case["bytes"]["fwd"] + case["bytes"]["bwd"] if mode == "full" else case["bytes"][mode]
        gbps = moved / ms / 1e6
        row = dict(op=op, norm=norm, D=D, mode=mode, provider=provider, config=config, ms=ms, GBps=gbps,
                   frac_copy=gbps * 1e9 / self.copy_bps, check=check, bytes=moved)
        self.results.append(row)
        print(f"[{time.time() - self.start:5.0f}s] {op:29s} {norm:5s} {D:5d} {mode:4s} {provider:13s} {config:14s} "
              f"{ms:7.4f} ms {gbps:7.0f} GB/s {row['frac_copy']:5.2f} {check}", flush=True)

    def save(self):
        """Every number so far to $OUT/sweep_norms.json (after each case, so a run cut short keeps them)."""
        if not os.environ.get("OUT"):
            return
        meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    copy_bytes_per_s=self.copy_bps, B=B, T=T, args=vars(self.args))
        path = Path(os.environ["OUT"]) / "sweep_norms.json"
        path.write_text(json.dumps(dict(meta=meta, results=self.results), indent=1))

    def measure_copy(self):
        ms = copy_ms(self.args)
        self.copy_bps = 2 * (2 << 30) / (ms * 1e-3)
        print(f"copy ceiling: 2 GiB bf16 device-to-device in {ms:.3f} ms = {self.copy_bps / 1e12:.3f} TB/s "
              f"(read + written) on {torch.cuda.get_device_name()}", flush=True)
        torch.cuda.empty_cache()

    def sweep_mode(self, case, op, norm, D, mode, launches):
        """The default configuration first (timed again at the end: the spread of two timings of one version),
        the baseline kernels, then every variant; each checked against the default's outputs."""
        fn = case[mode]
        default = (norm_fwd_launch if mode == "fwd" else norm_bwd_launch)(D, B, T, torch.device(DEVICE))
        print(f"{op} {norm} {D} {mode}: default = {label(default)}", flush=True)
        want = [t.clone() for t in outputs(fn(None))]
        key = (case, op, norm, D, mode)
        self.record(*key, "fae_fast", "default", bench(lambda: fn(None), self.args))
        if case["base"]:
            self.variant(key, "baseline", BASELINE_COMMIT, case["base"][mode], want)
        for launch in launches:
            if self.out_of_time():
                print(f"budget spent: skipping the rest of {op} {norm} {D} {mode}", flush=True)
                break
            self.variant(key, "fae_fast", label(launch), functools.partial(fn, launch), want)
        self.record(*key, "fae_fast", "default#2", bench(lambda: fn(None), self.args))

    def variant(self, key, provider, config, call, want):
        """Check call()'s outputs against the default's (poisoned memory first), then time it; a variant that
        fails to compile or disagrees is reported, not timed."""
        poison_cache(want)
        try:
            check = agreement(outputs(call()), want)
        except Exception as e:
            print(f"  {provider} {config}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            _, op, norm, D, mode = key
            self.results.append(dict(op=op, norm=norm, D=D, mode=mode, provider=provider, config=config,
                                     error=f"{type(e).__name__}: {e}"[:500]))
            return
        self.record(*key, provider, config, bench(call, self.args), check)

    def compare_full(self, case, op, norm, D):
        """The public op (default configurations, through autograd) and the torch.compile'd reference."""
        args, leaves, grads = case["args"], case["leaves"], case["grads"]

        def step(fn, mode):
            if mode == "fwd":
                return lambda: fn(*args)
            if mode == "bwd":
                saved = fn(*args)
                return lambda: torch.autograd.grad(saved, leaves, grads, retain_graph=True)
            return lambda: torch.autograd.grad(fn(*args), leaves, grads)

        self.record(case, op, norm, D, "full", "fae_fast_op", "default", bench(step(case["op"], "full"), self.args))
        if self.args.no_compile or self.out_of_time():
            return
        torch._dynamo.reset()  # a fresh compile per case, never the recompile-limit fallback
        compiled = torch.compile(case["ref"], dynamic=False)
        for mode in ("fwd", "bwd", "full"):
            self.record(case, op, norm, D, mode, "torch.compile", "-", bench(step(compiled, mode), self.args))

    def run(self):
        self.measure_copy()
        fwd = [fwd_launch(*c) for c in (QUICK_FWD if self.args.quick else FWD)]
        bwd = [bwd_launch(*c) for c in (QUICK_BWD if self.args.quick else BWD)]
        for op in self.args.ops:
            make, norms = OPS[op]
            for norm_key in norms:
                for D in self.args.widths:
                    if self.out_of_time():
                        print(f"budget spent: skipping {op} {norm_key} {D}", flush=True)
                        continue
                    case = make(D, *NORMS.get(norm_key, (None, False)))
                    self.sweep_mode(case, op, norm_key, D, "fwd", fwd)
                    self.sweep_mode(case, op, norm_key, D, "bwd", bwd)
                    self.compare_full(case, op, norm_key, D)
                    del case
                    torch.cuda.empty_cache()
                    self.save()


# --- summary ----------------------------------------------------------------------------------------------


def summarize(results, copy_bps):
    """Per case and mode: baseline (before this change), default, best configuration, torch.compile; ms and
    fraction of the copy bandwidth; last, the default's speed-up over the baseline and over torch.compile.
    'full' rows time the public op (default launches, through autograd) against the compiled reference."""
    ok = [r for r in results if "ms" in r]
    print(f"\n=== summary: ms and fraction of the {copy_bps / 1e12:.2f} TB/s copy; 'again' is the default timed "
          "a second time ===")
    print(f"{'op':22s} {'norm':5s} {'D':>4s} {'mode':4s} | {'baseline':>13s} | {'default':>13s} {'again':>6s} | "
          f"{'best config':13s} {'ms':>6s} {'frac':>4s} | {'compile':>13s} | {'x base':>6s} {'x comp':>6s}")
    cell = lambda r: f"{r['ms']:7.4f} {r['frac_copy']:5.2f}" if r else f"{'-':>13s}"  # noqa: E731
    ratio = lambda a, b: f"{a['ms'] / b['ms']:6.2f}" if a and b else f"{'-':>6s}"  # noqa: E731
    for op, norm, D in sorted({(r["op"], r["norm"], r["D"]) for r in ok}, key=str):
        def get(mode, provider, config=None):
            found = [r for r in ok if (r["op"], r["norm"], r["D"], r["mode"], r["provider"]) == (op, norm, D, mode,
                     provider) and config in (None, r["config"])]
            return found[0] if found else None

        name = op.replace("gated_residual", "gr")
        for mode in ("fwd", "bwd"):
            mine = [r for r in ok if (r["op"], r["norm"], r["D"], r["mode"], r["provider"]) == (op, norm, D, mode,
                    "fae_fast") and r["config"] != "default#2"]
            if not mine:
                continue
            best = min(mine, key=lambda r: r["ms"])
            base, d, again = get(mode, "baseline"), get(mode, "fae_fast", "default"), get(mode, "fae_fast", "default#2")
            comp = get(mode, "torch.compile")
            again = f"{again['ms']:6.4f}" if again else f"{'-':>6s}"
            print(f"{name:22s} {norm:5s} {D:4d} {mode:4s} | {cell(base)} | {cell(d)} {again} | "
                  f"{best['config']:13s} {best['ms']:6.4f} {best['frac_copy']:4.2f} | {cell(comp)} | "
                  f"{ratio(base, d)} {ratio(comp, d)}")
        full, comp = get("full", "fae_fast_op"), get("full", "torch.compile")
        if full:
            print(f"{name:22s} {norm:5s} {D:4d} full | {'':13s} | {cell(full)} {'':6s} | {'(public op)':13s} "
                  f"{'':6s} {'':4s} | {cell(comp)} | {'':6s} {ratio(comp, full)}")
    for mode in ("fwd", "bwd"):
        rank_configs(ok, mode)


def rank_configs(ok, mode):
    """Rank configurations of one kernel kind by the geometric mean, over the cases that timed them all, of
    their time over the best time of that case."""
    rows = [r for r in ok if r["mode"] == mode and r["provider"] == "fae_fast" and r["config"] != "default#2"]
    by_case = {}
    for r in rows:
        by_case.setdefault((r["op"], r["norm"], r["D"]), {})[r["config"]] = r["ms"]
    if not by_case:
        return
    configs = set.intersection(*(set(v) for v in by_case.values()))
    score = {c: math.exp(sum(math.log(v[c] / min(v.values())) for v in by_case.values()) / len(by_case))
             for c in configs}
    ranked = sorted(score.items(), key=lambda kv: kv[1])
    print(f"\n{mode}: configurations by geometric-mean slowdown vs the best of each of {len(by_case)} cases "
          "(1.00 = best everywhere); per op:")
    for c, s in ranked[:6]:
        per_op = {}
        for (op, _, _), v in by_case.items():
            per_op.setdefault(op, []).append(v[c] / min(v.values()))
        ops = "  ".join(f"{op.replace('gated_residual', 'gr')}={math.exp(sum(map(math.log, xs)) / len(xs)):.3f}"
                        for op, xs in per_op.items())
        print(f"  {c:14s} {s:.3f}   {ops}")


def kernel_breakdown(launcher, calls=10):
    """Device time per call of each kernel that one call of launcher(None) (its default launch) runs, from
    torch.profiler: what besides the main kernel a step pays for (the partial sums' finish, casts)."""
    from torch.profiler import ProfilerActivity, profile
    launcher(None)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            launcher(None)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us > 0:
            rows.append((us / calls, e.count // calls, e.key))
    return sorted(rows, reverse=True)


def breakdowns(args):
    for name, make in (("modulated_norm rms_w bwd", modulated_norm_case), ("fused rms_w bwd", fused_case)):
        print(f"\nkernels of one {name} call (D={args.widths[0]}, default launch), us per call:")
        for us, count, key in kernel_breakdown(make(args.widths[0], "rms", True)["bwd"]):
            print(f"  {us:8.1f} x{count}  {key[:100]}")
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[1152, 1536])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--quick", action="store_true", help="four configurations per kernel kind")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd references")
    parser.add_argument("--budget", type=float, default=230, help="seconds; what is left after is skipped")
    parser.add_argument("--warmup", type=float, default=5, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=float, default=40, help="do_bench repetition time, ms")
    args = parser.parse_args()
    torch.manual_seed(0)
    global BASE_MN, BASE_GR
    BASE_MN, BASE_GR = load_baseline()
    print(f"baseline kernels ({BASELINE_COMMIT}): {'timed beside' if BASE_MN else 'not available (no git history)'}")
    sweep = Sweep(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # a time limit still gets the summary
    try:
        sweep.run()
        breakdowns(args)
    finally:
        summarize(sweep.results, sweep.copy_bps or float("nan"))
        sweep.save()
        print(f"total {time.time() - sweep.start:.0f} s")

if __name__ == "__main__":
    main()
