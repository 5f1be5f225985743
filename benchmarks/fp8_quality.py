"""The FP8 quality guard: the same generator trained from the same seed in bf16 and in FP8 (`run.precision`) on
the embedded toy mixture with structure (class-conditional Gaussians with low-rank covariances, whose true
moments are known), then the loss curves on one plot and the Frechet distance of each run's samples to the
true mixture. An FP8 run passes when its final loss (the mean of the last tenth of the logged losses, one
step's loss being noisy) is within 1% of bf16's and its Frechet distance within 5%, and only if the bf16
reference trained (its final loss at most half its first logged loss). Beside each verdict it reports both
runs' held-out loss: their final EMA weights on fixed batches through the same plain forward
(`held_out_loss`), which tells a worse FP8-trained model from the FP8 forward's noise in the training loss;
it is reported, not judged (the verdict stays the training loss's). `--variants` judges several FP8
runs against the one bf16 run: `fp8` (rowwise, the weight gradient in bf16), `fp8w` (the weight
gradient in FP8 too, `run.fp8_weight_gradient`) and `fp8w_ends` (fp8w with the first and last block in bf16,
`run.fp8_bf16_end_blocks=1`).

    python -m benchmarks.fp8_quality --out_dir runs/fp8-quality --variants fp8,fp8w   (repository root, a GPU)

Defaults: LightningDiT-B/1's shape (width 768, 12 layers, 12 heads) on 16x16x32 latents, 8 classes, batch 256,
2,000 steps, lr 2e-4, 8,192 evaluation samples. Each run is `training/train_gen.py --recipe demo` with those
overrides and the step captured as a CUDA graph (`run.cuda_graph=auto`: the FP8 step waits on the host
without it; the captured step trains what the eager one does), so the guard measures the program users
train with. Writes <out_dir>/bf16/ and one folder per variant (the runs), <out_dir>/fp8_quality.png (the loss
curves) and <out_dir>/fp8_quality.json (each variant's verdict and its numbers, written as each run ends).
A run already finished in <out_dir> with the same settings is taken as it is (`FINISHED`): the variants can
be judged in separate calls against one bf16 run.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/fp8_quality.py` works too

import torch  # noqa: E402

from benchmarks import ROOT, child_env  # noqa: E402
from fae_fast.config import TransportConfig  # noqa: E402
from fae_fast.data.toy import ToyLatents  # noqa: E402
from fae_fast.families import family_of  # noqa: E402
from fae_fast.inference import generator_config_path, load_generator  # noqa: E402
from fae_fast.train.runtime import plot_curves  # noqa: E402

LOSS_TOLERANCE, FRECHET_TOLERANCE = 0.01, 0.05
"""FP8 against bf16: final loss within 1%, Frechet distance within 5% (relative)."""
REFERENCE_LOSS_DROP = 0.5
"""The bf16 run counts as a reference only if its final loss is at most this fraction of its first logged
loss: a reference that did not train (as when cuDNN attention's wrong gradients stalled both runs near their
starting loss on an H200) makes any comparison meaningless."""


VARIANTS = {"fp8": [], "fp8w": ["--run.fp8_weight_gradient=true"],
            "fp8w_ends": ["--run.fp8_weight_gradient=true", "--run.fp8_bf16_end_blocks=1"]}
"""The FP8 runs the guard can judge, by name: their overrides on top of --run.precision=fp8."""


def run_overrides(args, run: str) -> list[str]:
    """train_gen.py's overrides for the run `run`: "bf16" or a name in VARIANTS."""
    precision = "bf16" if run == "bf16" else "fp8"
    return [f"--model.width={args.width}", f"--model.depth={args.depth}", f"--model.heads={args.heads}",
            f"--model.grid={args.grid}", f"--model.in_channels={args.channels}", f"--run.precision={precision}",
            f"--run.compile={str(args.compile).lower()}", f"--run.steps={args.steps}",
            f"--run.log_every={args.log_every}", f"--run.eval_samples={args.eval_samples}", "--run.eval_every=0",
            "--run.ckpt_every=0", "--run.cuda_graph=auto", f"--run.seed={args.seed}",
            f"--data.global_batch={args.batch}", f"--optim.lr={args.lr}",
            f"--run.out_dir={Path(args.out_dir) / run}", *([] if run == "bf16" else VARIANTS[run])]


FINISHED = "guard_run.json"
"""Written into a run's folder once it has finished: the overrides it ran with (its folder aside). A later guard given the same
--out_dir and settings takes that run as it is instead of training it again, so the runs can be spread over
several sessions (three B-size runs with their evaluations take about 10 minutes on an H200)."""


HELD_OUT_BATCHES, HELD_OUT_SEED = 16, 20261202
"""The held-out loss: this many batches of the run's batch size, their latents, labels, t and noise drawn
from this seed, the same for every run."""
HELD_OUT = "held_out.json"
"""Written into a run's folder with its held-out loss (computed once, then read)."""


def held_out_loss(run: Path, batch: int) -> float:
    """The flow-matching loss of a finished run's EMA weights on HELD_OUT_BATCHES fixed batches of its toy
    mixture (the same latents, labels, t and noise for every run; no label dropout), through the plain
    forward every run samples with, bf16 autocast on a GPU (an FP8 run's linears take no FP8 path in eval
    mode). The training loss of an FP8 run goes through the FP8 forward, whose quantisation error adds to
    every prediction; this loss compares the trained models alone, as the Frechet distance does."""
    saved = run / HELD_OUT
    if saved.is_file():
        return json.loads(saved.read_text())["loss"]
    config = json.loads(generator_config_path(run / "ema.safetensors").read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_generator(run / "ema.safetensors", device, torch.float32)
    model_cfg = model.cfg
    family, transport = family_of(model_cfg), TransportConfig(**config["transport"])
    toy = ToyLatents(model_cfg.num_classes, model_cfg.grid ** 2, model_cfg.in_channels, seed=config["data"]["seed"])
    data_generator = torch.Generator().manual_seed(HELD_OUT_SEED)
    draw_generator = torch.Generator(device=device).manual_seed(HELD_OUT_SEED)
    total = 0.0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for _ in range(HELD_OUT_BATCHES):
            latents, labels = (t.to(device) for t in toy.batch(batch, data_generator))
            draws = family.draw(model, latents, labels, transport, draw_generator)
            draws.pop("dropped", None)  # every sample keeps its label
            total += float(family.loss_of_draws(model, latents, labels, draws, transport).mean())
    loss = total / HELD_OUT_BATCHES
    saved.write_text(json.dumps({"loss": loss, "batches": HELD_OUT_BATCHES, "batch": batch, "seed": HELD_OUT_SEED}))
    return loss


def train(args, run: str) -> Path:
    out = Path(args.out_dir) / run
    overrides = run_overrides(args, run)
    settings = [o for o in overrides if not o.startswith("--run.out_dir=")]  # the folder may have moved since
    finished = out / FINISHED
    if finished.is_file() and json.loads(finished.read_text()) == settings and \
            (out / "history.json").is_file() and (out / "frechet.json").is_file():
        print(f"== {run}: {out} finished earlier with these settings; taken as it is", flush=True)
        held_out_loss(out, args.batch)
        return out
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               str(ROOT / "training" / "train_gen.py"), "--recipe", "demo", *overrides]
    print(f"== {run}: {' '.join(command[5:])}", flush=True)
    done = subprocess.run(command, cwd=ROOT, env=child_env())
    if done.returncode != 0:
        raise SystemExit(f"the {run} run failed (exit {done.returncode}); its output is above")
    finished.write_text(json.dumps(settings))
    held_out_loss(out, args.batch)
    return out


def final_loss(history: list) -> float:
    """Mean of the last tenth (at least one) of the logged losses."""
    losses = [terms["loss"] for _, terms in history if "loss" in terms]
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


def first_loss(history: list) -> float:
    return next(terms["loss"] for _, terms in history if "loss" in terms)


def reference_trained(history: list) -> bool:
    """The bf16 run trained: its final loss is at most REFERENCE_LOSS_DROP of its first logged loss."""
    return final_loss(history) <= REFERENCE_LOSS_DROP * first_loss(history)


def compare(runs: dict[str, Path], variant: str = "fp8") -> dict:
    """The verdict on the FP8 run `variant` against runs["bf16"], from their history.json and frechet.json."""
    history = {p: json.loads((runs[p] / "history.json").read_text()) for p in ("bf16", variant)}
    frechet = {p: json.loads((runs[p] / "frechet.json").read_text())["after"]["overall"] for p in ("bf16", variant)}
    loss = {p: final_loss(h) for p, h in history.items()}
    loss_gap = loss[variant] / loss["bf16"] - 1
    frechet_gap = frechet[variant] / frechet["bf16"] - 1
    verdict = {"final_loss": loss, "frechet_overall": frechet, "loss_gap": loss_gap, "frechet_gap": frechet_gap,
               "bf16_first_loss": first_loss(history["bf16"]), "bf16_learned": reference_trained(history["bf16"]),
               "loss_within_1_percent": abs(loss_gap) <= LOSS_TOLERANCE,
               "frechet_within_5_percent": frechet_gap <= FRECHET_TOLERANCE}
    verdict["passed"] = verdict["bf16_learned"] and verdict["loss_within_1_percent"] and \
        verdict["frechet_within_5_percent"]
    if all((runs[p] / HELD_OUT).is_file() for p in ("bf16", variant)):  # reported beside the verdict, not in it
        held_out = {p: json.loads((runs[p] / HELD_OUT).read_text())["loss"] for p in ("bf16", variant)}
        verdict["held_out_loss"] = held_out
        verdict["held_out_gap"] = held_out[variant] / held_out["bf16"] - 1
        verdict["held_out_within_1_percent"] = abs(verdict["held_out_gap"]) <= LOSS_TOLERANCE
    return verdict


def plot(runs: dict[str, Path], path: Path) -> None:
    """The runs' loss curves on one plot (the same steps are logged in all)."""
    merged: dict[int, dict[str, float]] = {}
    for name, out in runs.items():
        for step, terms in json.loads((out / "history.json").read_text()):
            if "loss" in terms:
                merged.setdefault(step, {})[f"loss, {name}"] = terms["loss"]
    plot_curves(sorted(merged.items()), str(path), "bf16 and FP8 from one seed (toy mixture)")


def variant_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: name FP8 runs from {', '.join(VARIANTS)}, comma-separated")
    return names


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)  # a typo is an error
    parser.add_argument("--out_dir", default="runs/fp8-quality")
    parser.add_argument("--variants", type=variant_list, default=["fp8"],
                        help="FP8 runs to judge against the one bf16 run, comma-separated: fp8 (rowwise, bf16 "
                             "weight gradient), fp8w (the weight gradient in FP8 too), fp8w_ends (fp8w with the "
                             "first and last block in bf16). Default: fp8")
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
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"note: no CUDA GPU here; the runs go on the CPU (FP8 emulated), which at width {args.width} and "
              f"depth {args.depth} takes hours and tens of GiB: this guard is meant for a GPU (the tests run it "
              f"on the CPU at width 32, depth 2)", flush=True)
    runs = {"bf16": train(args, "bf16")}
    reference = json.loads((runs["bf16"] / "history.json").read_text())
    if not reference_trained(reference):  # nothing to compare against: spend no time on the FP8 runs
        raise SystemExit(f"no verdict: the bf16 reference did not train (final loss {final_loss(reference):.4f} "
                         f"against {first_loss(reference):.4f} at its first log; it must fall to "
                         f"{REFERENCE_LOSS_DROP:.0%} or below). Its curve: {runs['bf16'] / 'loss.png'}")
    verdicts = {}
    for name in args.variants:  # each verdict is written and shown as soon as its run ends
        runs[name] = train(args, name)
        verdicts[name] = v = compare(runs, name)
        plot(runs, Path(args.out_dir) / "fp8_quality.png")
        (Path(args.out_dir) / "fp8_quality.json").write_text(
            json.dumps({"verdicts": verdicts, "settings": vars(args)}, indent=1))
        print(f"{name}: final loss {v['final_loss'][name]:.4f} against bf16 {v['final_loss']['bf16']:.4f} "
              f"({v['loss_gap']:+.2%}; within 1%: {v['loss_within_1_percent']}); Frechet distance "
              f"{v['frechet_overall'][name]:.3f} against {v['frechet_overall']['bf16']:.3f} ({v['frechet_gap']:+.2%}; "
              f"within 5%: {v['frechet_within_5_percent']}) -> {'passed' if v['passed'] else 'failed'}; held-out "
              f"loss through the bf16 forward {v['held_out_loss'][name]:.4f} against {v['held_out_loss']['bf16']:.4f} "
              f"({v['held_out_gap']:+.2%})", flush=True)
    return verdicts


if __name__ == "__main__":
    main()
