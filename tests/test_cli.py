"""First contact with the programs: --help everywhere, one-line usage errors (exit 2) with the fix, input
errors as one line (exit 1), inputs checked before anything big is built."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import program_env

from fae_fast.cli import UsageError, apply_overrides, parse_command_line, run_program
from fae_fast.config import GenTrainConfig

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ["train_gen.py", "train_fae.py", "sample.py", "evaluate.py", "evaluate_fae.py", "extract_latents.py"]


def run(program: str, *args: str, launcher=(sys.executable,)) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, str(ROOT / "training" / program), *args], cwd=ROOT, env=program_env(2),
                          capture_output=True, text=True, timeout=300)


BENCHMARK_SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")
                           if not p.name.startswith("test_") and "__main__" in p.read_text())


@pytest.mark.parametrize("script", BENCHMARK_SCRIPTS)
def test_every_benchmark_script_answers_help_from_any_folder(script, tmp_path):
    """`python benchmarks/<script> --help` as a new user types it, here without a GPU and outside the
    checkout: a usage text, not an import error or a CUDA error."""
    env = program_env(1)
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")  # the checkout only as the script puts it there
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.startswith("usage: "), (res.stdout[-500:], res.stderr[-2000:])


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_lists_choices_and_every_field(program):
    res = run(program, "--help")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith(f"usage: {program}") and "options (values shown are the current ones):" in res.stdout
    expected = {"train_gen.py": ["lightningdit-xl-80ep", "--optim.lr=", "Peak learning rate"],
                "train_fae.py": ["dinov2-g", "pixel-finetune", "--loss.perceptual_required="],
                "sample.py": ["paper-no-cfg", "--sampler.guide_channels=0", "--published="],
                "evaluate.py": ["--samples=", "--ref="], "evaluate_fae.py": ["--max_images=0", "--data.root="],
                "extract_latents.py": ["DINOv2-g/14", "--shard_size=10240", "--encoder.weights_path="]}[program]
    for text in expected:
        assert text in res.stdout, f"{program} --help lacks {text!r}"


def test_help_shows_the_chosen_recipes_values():
    res = run("train_gen.py", "--recipe", "lightningdit-xl-80ep", "-h")
    assert res.returncode == 0 and "--run.steps=200000" in res.stdout and "--model.depth=28" in res.stdout


@pytest.mark.parametrize("args, needle", [
    (["--recipe", "nope"], "--recipe 'nope' is unknown; choose one of: demo,"),
    (["--recipe", "lightningdit-xl-8ep"], "did you mean 'lightningdit-xl-80ep'?"),
    (["--optim.lrr=1"], "--optim.lrr: OptimConfig has no field 'lrr'; did you mean 'lr'?"),
    (["--run.steps=abc"], "--run.steps=abc: expected an int, got 'abc'"),
    (["--data.path=/data/latents"], "--data.path is read only with --data.source=cache"),
    (["steps=5"], "'steps=5' is not an option"),
    (["--run.attention=sdpa_flsh"], "--run.attention='sdpa_flsh' is not one of auto, sdpa_cudnn, sdpa_flash,"),
])
def test_usage_errors_are_one_line_and_exit_2(args, needle):
    res = run("train_gen.py", *args)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [f"error: {res.stderr.strip()[7:]}"]  # one line, no traceback
    assert needle in res.stderr


def test_a_missing_cache_is_named_before_the_model_is_built():
    res = run("train_gen.py", "--recipe", "lightningdit-xl-80ep", "--data.path=/missing/latents")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("error: --data.path='/missing/latents' is no folder")
    assert "parameters" not in res.stdout  # the 675M model was never built


def test_under_torchrun_the_error_is_printed_once():
    """Once, by rank 0, first; torchrun's own failure summary follows it (the launcher's, not ours)."""
    res = run("train_gen.py", "--optim.lrr=1", launcher=(sys.executable, "-m", "torch.distributed.run",
                                                          "--standalone", "--nproc_per_node=2"))
    assert res.returncode != 0
    assert res.stderr.count("error: --optim.lrr") == 1 and res.stderr.startswith("error: --optim.lrr")
    assert "UsageError" not in res.stderr and "train_gen.py\", line" not in res.stderr  # no traceback of ours


def test_debug_shows_the_traceback():
    res = run("train_gen.py", "--optim.lrr=1", "--debug")
    assert res.returncode != 0 and "Traceback" in res.stderr and "UsageError" in res.stderr


def test_overrides_take_space_separated_values_bare_bools_and_kebab_case():
    cfg = apply_overrides(GenTrainConfig(), ["--run.steps", "7", "--run.compile", "false", "--model.qk_norm",
                                             "--run.out-dir=/tmp/x"])
    assert (cfg.run.steps, cfg.run.compile, cfg.model.qk_norm, cfg.run.out_dir) == (7, False, True, "/tmp/x")
    with pytest.raises(UsageError, match="--run.steps needs a value"):
        apply_overrides(GenTrainConfig(), ["--run.steps"])


def test_run_program_exit_codes(capsys):
    def main(argv):
        parse_command_line(argv, prog="p", summary="", choices={}, build=lambda picked: GenTrainConfig())
        raise FileNotFoundError("weights file 'x' does not exist; pass --fae")

    with pytest.raises(SystemExit) as usage:
        run_program(main, ["--optim.lr=fast"])
    with pytest.raises(SystemExit) as missing:
        run_program(main, [])
    err = capsys.readouterr().err.splitlines()
    assert (usage.value.code, missing.value.code) == (2, 1)
    assert err == ["error: --optim.lr=fast: expected a number, got 'fast'",
                   "error: weights file 'x' does not exist; pass --fae [--debug shows the traceback]"]
