"""A training step captured as one CUDA graph (fae_fast/train/cuda_graph.py) trains exactly as the same step run
eagerly: the fused generator, compiled per block, on a sequence of batches loaded into static inputs."""

import pytest
import torch

from fae_fast.config import generator_config
from fae_fast.generators import Generator
from fae_fast.train.cuda_graph import GraphedStep, StaticInputs, check_capturable
from fae_fast.train.parallelize import parallelize
from fae_fast.transport import flow_matching_loss


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
    # the graphed run's first call trains warmup + 1 steps on its first batch; the eager run does the same
    eager_losses = [train_step(eager, eager_opt, batches[0]).item() for _ in range(2)]
    graphed_losses = []
    for b in batches:
        eager_losses.append(train_step(eager, eager_opt, b).item())
        static.load(**b)
        graphed_losses.append(step().item())
    assert step.eager_steps == 2
    torch.testing.assert_close(torch.tensor(graphed_losses), torch.tensor(eager_losses[2:]), rtol=1e-5, atol=1e-6)
    assert eager_losses[-1] != eager_losses[2], "the batches differ, so the losses must"
    for (name, p), q in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
