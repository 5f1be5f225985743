"""A training step captured as one CUDA graph (fae_fast/train/cuda_graph.py) trains exactly as the same step run
eagerly: the fused generator, compiled per block, on a sequence of batches loaded into static inputs; and
train_gen.py with run.cuda_graph=on trains, checkpoints and resumes as its eager run does."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from fae_fast.config import OptimConfig, generator_config
from fae_fast.generators import Generator
from fae_fast.train.checkpoint import ModelAndOptimizer
from fae_fast.train.cuda_graph import GraphedStep, StaticInputs, check_capturable, make_capturable
from fae_fast.train.parallelize import parallelize
from fae_fast.train.runtime import set_lr
from fae_fast.transport import flow_matching_loss
from conftest import program_env  # noqa: E402 (tests/ is on sys.path)
from test_train_gen import history  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_static_inputs_copy_in_place_and_name_a_wrong_shape():
    inputs = StaticInputs(x=torch.zeros(2, 3))
    held = inputs.x
    inputs.load(x=torch.ones(2, 3))
    assert inputs.x is held and torch.equal(held, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"x is \(2, 3\); got \(4, 3\).*batch size fixed"):
        inputs.load(x=torch.ones(4, 3))
    with pytest.raises(ValueError, match="needs exactly x"):
        inputs.load(y=torch.ones(2, 3))


def test_an_optimizer_that_cannot_be_captured_is_named():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="AdamW must be built with capturable=True"):
        check_capturable(opt)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_capture_without_cuda_says_so():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], capturable=True)
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        GraphedStep(lambda: torch.zeros(()), opt)


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    cfg = generator_config("LightningDiT-tiny/1", in_channels=4, grid=4, num_classes=10)
    model = Generator(cfg, impl="triton").cuda()
    parallelize(model, model.blocks, precision="fp32", compile=True, shard=False)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)


@pytest.mark.gpu
def test_replayed_steps_match_eager_steps():
    batches = []
    for k in range(5):
        g = torch.Generator().manual_seed(k)
        batches.append({"x1": torch.randn(8, 16, 4, generator=g), "noise": torch.randn(8, 16, 4, generator=g),
                        "t": torch.rand(8, generator=g), "y": torch.randint(0, 10, (8,), generator=g)})
    batches = [{name: value.cuda() for name, value in b.items()} for b in batches]

    def train_step(model, opt, b):
        loss = flow_matching_loss(lambda xt, tt: model(xt, tt, b["y"]), b["x1"], b["t"], noise=b["noise"]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    eager, eager_opt = _model_and_optimizer(0)
    graphed, graphed_opt = _model_and_optimizer(0)
    static = StaticInputs(**batches[0])
    step = GraphedStep(lambda: train_step(graphed, graphed_opt, static.tensors), graphed_opt, warmup=2)
    eager_losses, graphed_losses = [], []
    for b in batches:  # every call is one step: 2 eager, then the capture and its replays
        eager_losses.append(train_step(eager, eager_opt, b).item())
        static.load(**b)
        graphed_losses.append(step().item())
    assert step.eager_steps == 2 and step.graph is not None
    torch.testing.assert_close(torch.tensor(graphed_losses), torch.tensor(eager_losses), rtol=1e-5, atol=1e-6)
    assert eager_losses[-1] != eager_losses[2], "the batches differ, so the losses must"
    for (name, p), q in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


TRAIN_GEN = ["--model.depth=2", "--model.width=64", "--model.heads=2", "--data.global_batch=32",
             "--run.eval_samples=0", "--run.log_every=1", "--run.sample_every=0", "--run.precision=fp32",
             "--run.compile=false", "--optim.warmup_steps=8", "--optim.lr=2e-3"]


def train_gen(out, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(ROOT / "training" / "train_gen.py"), *TRAIN_GEN, f"--run.out_dir={out}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=program_env(1), capture_output=True, text=True, timeout=600)


def test_cuda_graph_on_without_cuda_names_the_fix(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the message on a machine without CUDA")
    res = train_gen(tmp_path / "run", "--run.steps=2", "--run.cuda_graph=on")
    assert res.returncode != 0
    assert "run.cuda_graph=on captures a one-GPU step, and this run has no CUDA device" in res.stderr + res.stdout


@pytest.mark.gpu
@pytest.mark.slow
def test_train_gen_with_a_captured_step_trains_what_eager_trains_and_resumes(tmp_path):
    """train_gen.py, 12 steps under a learning-rate warm-up (the rate changes every step, and the captured
    AdamW must read each new one): run.cuda_graph=on gives the eager run's losses and EMA weights, and a
    graphed run stopped at step 6 and resumed (its checkpoint holding the device-side rate and step count)
    gives the straight run's."""
    runs = {"eager": ["--run.cuda_graph=off", "--run.steps=12"], "graphed": ["--run.cuda_graph=on", "--run.steps=12"]}
    for name, args in runs.items():
        res = train_gen(tmp_path / name, *args)
        assert res.returncode == 0, res.stderr[-3000:]
    res = train_gen(tmp_path / "resumed", "--run.cuda_graph=on", "--run.steps=6", "--run.ckpt_every=6")
    assert res.returncode == 0, res.stderr[-3000:]
    res = train_gen(tmp_path / "resumed", "--run.cuda_graph=on", "--run.steps=12", "--run.ckpt_every=6")
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-3000:]
    losses = {name: history(tmp_path / name) for name in ("eager", "graphed", "resumed")}
    assert sorted(losses["graphed"]) == list(range(1, 13)) and losses["eager"][12] < losses["eager"][1]
    for name in ("graphed", "resumed"):
        for step in range(1, 13):
            assert losses[name][step] == pytest.approx(losses["eager"][step], rel=1e-5), (name, step)
        weights = load_file(tmp_path / name / "ema.safetensors")
        want = load_file(tmp_path / "eager" / "ema.safetensors")
        for key in want:
            torch.testing.assert_close(weights[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_device_learning_rate_is_saved_as_the_float_every_run_loads(tmp_path):
    """A captured step's AdamW holds its rate in a tensor (make_capturable); checkpoints save it as a float,
    so a checkpoint moves between runs with and without run.cuda_graph both ways, and the tensor the
    optimizer holds is the one it held before the save (a captured graph reads that one)."""

    def trained(lr_on_device: bool):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, foreach=False)
        model(torch.randn(2, 4)).square().sum().backward()
        opt.step()
        if lr_on_device:  # (capturable itself needs a CUDA device to step)
            opt.param_groups[0]["lr"] = torch.tensor(0.01)
        return model, opt

    optim = OptimConfig(lr=0.02, warmup_steps=10)
    for saved_on_device, loaded_on_device in ((True, False), (False, True)):
        model, opt = trained(saved_on_device)
        rate = opt.param_groups[0]["lr"]
        folder = tmp_path / f"{saved_on_device}-{loaded_on_device}"
        dcp.save({"train": ModelAndOptimizer(model, opt)}, checkpoint_id=folder)
        assert opt.param_groups[0]["lr"] is rate
        fresh, fresh_opt = trained(loaded_on_device)
        with torch.no_grad():
            fresh.weight.zero_()
        dcp.load({"train": ModelAndOptimizer(fresh, fresh_opt)}, checkpoint_id=folder)
        assert torch.equal(fresh.weight, model.weight)
        assert float(fresh_opt.state[fresh.weight]["step"]) == 1
        set_lr(fresh_opt, optim, step=4, total=100)
        assert float(fresh_opt.param_groups[0]["lr"]) == pytest.approx(0.02 * 5 / 10)


def test_make_capturable_restores_what_a_load_of_an_eager_checkpoint_takes_away():
    """Optimizer.load_state_dict takes every hyperparameter from the saved groups: a graphed run resuming an
    eager run's checkpoint gets capturable=False and a float rate back; make_capturable sets both again and
    says so (the run then captures anew), and changes nothing the second time."""
    params = [torch.nn.Parameter(torch.zeros(3))]
    eager = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=0.01)
    graphed = torch.optim.AdamW(params, lr=0.01, capturable=True)
    assert make_capturable(graphed, torch.device("cpu"))
    held = graphed.param_groups[0]["lr"]
    assert not make_capturable(graphed, torch.device("cpu")) and graphed.param_groups[0]["lr"] is held
    graphed.load_state_dict(eager.state_dict())
    group = graphed.param_groups[0]
    assert group["capturable"] is False and not isinstance(group["lr"], torch.Tensor)
    assert make_capturable(graphed, torch.device("cpu"))
    assert group["capturable"] is True and isinstance(group["lr"], torch.Tensor)
    assert float(group["lr"]) == pytest.approx(0.01)  # the same rate, in fp32
    check_capturable(graphed)


def test_fae_training_refuses_a_captured_step():
    from fae_fast.fae_config import fae_recipe, validate

    cfg = fae_recipe("tiny", "feature")
    cfg.run.cuda_graph = "auto"
    with pytest.raises(ValueError, match="train_fae.py runs its step eagerly.*leave run.cuda_graph at 'off'"):
        validate(cfg)
