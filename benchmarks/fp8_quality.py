"""The FP8 quality guard: the same generator trained from the same seed in bf16 and in FP8 (`run.precision`) on
the embedded toy mixture with structure (class-conditional Gaussians with low-rank covariances, whose true
moments are known), then both loss curves on one plot and the Frechet distance of each run's samples to the
true mixture. FP8 passes when its final loss (the mean of the last tenth of the logged losses, one step's
loss being noisy) is within 1% of bf16's and its Frechet distance within 5%, and only if the bf16 reference
trained (its final loss at most half its first logged loss).

    python -m benchmarks.fp8_quality --out_dir runs/fp8-quality      (from the repository root, on a GPU)

Defaults: LightningDiT-B/1's shape (width 768, 12 layers, 12 heads) on 16x16x32 latents, 8 classes, batch 256,
2,000 steps, lr 2e-4, 8,192 evaluation samples. Each run is `training/train_gen.py --recipe demo` with those
overrides and the step captured as a CUDA graph (`run.cuda_graph=auto`: the FP8 step waits on the host
without it; the captured step trains what the eager one does), so the guard measures the program users
train with. Writes <out_dir>/{bf16,fp8}/ (the runs),
<out_dir>/fp8_quality.png (both loss curves) and <out_dir>/fp8_quality.json (the verdict and its numbers).
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks import ROOT, child_env
from fae_fast.train.runtime import plot_curves

LOSS_TOLERANCE, FRECHET_TOLERANCE = 0.01, 0.05
"""FP8 against bf16: final loss within 1%, Frechet distance within 5% (relative)."""
REFERENCE_LOSS_DROP = 0.5
"""The bf16 run counts as a reference only if its final loss is at most this fraction of its first logged
loss: a reference that did not train (as when cuDNN attention's wrong gradients stalled both runs near their
starting loss on an H200) makes any comparison meaningless."""


def run_overrides(args, precision: str) -> list[str]:
    return [f"--model.width={args.width}", f"--model.depth={args.depth}", f"--model.heads={args.heads}",
            f"--model.grid={args.grid}", f"--model.in_channels={args.channels}", f"--run.precision={precision}",
            f"--run.compile={str(args.compile).lower()}", f"--run.steps={args.steps}",
            f"--run.log_every={args.log_every}", f"--run.eval_samples={args.eval_samples}", "--run.eval_every=0",
            "--run.ckpt_every=0", "--run.cuda_graph=auto", f"--run.seed={args.seed}",
            f"--data.global_batch={args.batch}", f"--optim.lr={args.lr}",
            f"--run.out_dir={Path(args.out_dir) / precision}",
            *(["--run.fp8_weight_gradient=true"] if precision == "fp8" and args.fp8_weight_gradient else [])]


def train(args, precision: str) -> Path:
    out = Path(args.out_dir) / precision
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               str(ROOT / "training" / "train_gen.py"), "--recipe", "demo", *run_overrides(args, precision)]
    print(f"== {precision}: {' '.join(command[5:])}", flush=True)
    done = subprocess.run(command, cwd=ROOT, env=child_env())
    if done.returncode != 0:
        raise SystemExit(f"the {precision} run failed (exit {done.returncode}); its output is above")
    return out


def final_loss(history: list) -> float:
    """Mean of the last tenth (at least one) of the logged losses."""
    losses = [terms["loss"] for _, terms in history if "loss" in terms]
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


def compare(runs: dict[str, Path]) -> dict:
    """The verdict from the two runs' history.json and frechet.json."""
    history = {p: json.loads((out / "history.json").read_text()) for p, out in runs.items()}
    frechet = {p: json.loads((out / "frechet.json").read_text())["after"]["overall"] for p, out in runs.items()}
    loss = {p: final_loss(h) for p, h in history.items()}
    loss_gap = loss["fp8"] / loss["bf16"] - 1
    frechet_gap = frechet["fp8"] / frechet["bf16"] - 1
    first_bf16 = next(terms["loss"] for _, terms in history["bf16"] if "loss" in terms)
    verdict = {"final_loss": loss, "frechet_overall": frechet, "loss_gap": loss_gap, "frechet_gap": frechet_gap,
               "bf16_first_loss": first_bf16, "bf16_learned": loss["bf16"] <= REFERENCE_LOSS_DROP * first_bf16,
               "loss_within_1_percent": abs(loss_gap) <= LOSS_TOLERANCE,
               "frechet_within_5_percent": frechet_gap <= FRECHET_TOLERANCE}
    verdict["passed"] = verdict["bf16_learned"] and verdict["loss_within_1_percent"] and \
        verdict["frechet_within_5_percent"]
    return verdict


def plot(runs: dict[str, Path], path: Path) -> None:
    """Both runs' loss curves on one plot (the same steps are logged in both)."""
    merged: dict[int, dict[str, float]] = {}
    for precision, out in runs.items():
        for step, terms in json.loads((out / "history.json").read_text()):
            if "loss" in terms:
                merged.setdefault(step, {})[f"loss, {precision}"] = terms["loss"]
    plot_curves(sorted(merged.items()), str(path), "bf16 and FP8 from one seed (toy mixture)")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out_dir", default="runs/fp8-quality")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--log_every", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--eval_samples", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    parser.add_argument("--fp8_weight_gradient", action="store_true",
                        help="the FP8 run's weight-gradient GEMMs in FP8 too (run.fp8_weight_gradient)")
    args = parser.parse_args(argv)
    runs = {precision: train(args, precision) for precision in ("bf16", "fp8")}
    verdict = compare(runs)
    plot(runs, Path(args.out_dir) / "fp8_quality.png")
    (Path(args.out_dir) / "fp8_quality.json").write_text(json.dumps({**verdict, "settings": vars(args)}, indent=1))
    print(f"final loss: bf16 {verdict['final_loss']['bf16']:.4f}, fp8 {verdict['final_loss']['fp8']:.4f} "
          f"({verdict['loss_gap']:+.2%}; within 1%: {verdict['loss_within_1_percent']}); Frechet distance: bf16 "
          f"{verdict['frechet_overall']['bf16']:.3f}, fp8 {verdict['frechet_overall']['fp8']:.3f} "
          f"({verdict['frechet_gap']:+.2%}; within 5%: {verdict['frechet_within_5_percent']})")
    if not verdict["bf16_learned"]:
        print(f"no verdict: the bf16 reference did not train (final loss {verdict['final_loss']['bf16']:.4f} against "
              f"{verdict['bf16_first_loss']:.4f} at its first log; it must fall to {REFERENCE_LOSS_DROP:.0%} or below)")
    print(f"FP8 quality: {'passed' if verdict['passed'] else 'failed'}")
    return verdict


if __name__ == "__main__":
    main()
