import pytest
import torch

from fae_fast.config import generator_config
from fae_fast.generators import Generator, forward_flops_per_sample


def _count(cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Generator(cfg, impl="torch").parameters())


@pytest.mark.parametrize("size", ["SiT-XL/1", "LightningDiT-XL/1"])
def test_xl_has_the_papers_675M_parameters(size):
    n = _count(generator_config(size))
    assert abs(n - 675e6) / 675e6 < 0.01, n


def test_flops_match_the_baseline_formula():
    # BASELINES.md: 2 x 256 x 28 x 12 x 1152^2 + 28 x 4 x 256^2 x 1152 = 237 GFLOP per image forward
    assert forward_flops_per_sample(generator_config("SiT-XL/1")) == pytest.approx(237e9, rel=0.01)


@pytest.mark.parametrize("size", ["SiT-tiny/1", "LightningDiT-tiny/1"])
def test_shapes_and_adaln_zero_start(size):
    cfg = generator_config(size, in_channels=4, grid=4, num_classes=10)
    model = Generator(cfg, impl="torch")
    x = torch.randn(3, 16, 4)
    v = model(x, torch.rand(3), torch.tensor([0, 5, 10]))  # 10 = null label
    assert v.shape == (3, 16, 4)
    assert torch.all(v == 0), "adaLN-Zero: the output layer starts at zero"


def test_blocks_learn_after_the_zero_start():
    torch.manual_seed(0)  # 30 steps left a random draw at 0.63-0.80 of the first loss; 60 reach 0.02-0.19
    cfg = generator_config("LightningDiT-tiny/1", in_channels=4, grid=4, num_classes=10)
    model = Generator(cfg, impl="torch")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, t, y = torch.randn(8, 16, 4), torch.rand(8), torch.randint(0, 10, (8,))
    target = torch.randn(8, 16, 4)
    losses = []
    for _ in range(60):
        loss = (model(x, t, y) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(b.adaLN[-1].weight.abs().sum() > 0 for b in model.blocks)


def test_label_dropout_uses_the_null_label():
    model = Generator(generator_config("SiT-tiny/1", num_classes=10, class_dropout=0.5), impl="torch")
    y = torch.randint(0, 10, (4000,))
    dropped = model.conditioning.drop(y, torch.Generator().manual_seed(0))
    frac = (dropped == 10).float().mean().item()
    assert 0.45 < frac < 0.55
    assert torch.equal(dropped[dropped != 10], y[dropped != 10])


@pytest.mark.parametrize("size", ["SiT-tiny/1", "LightningDiT-tiny/1"])
def test_fused_impl_matches_torch_impl(size, device):
    """The same weights through the Triton kernels (interpreter on CPU) and the PyTorch references."""
    cfg = generator_config(size, in_channels=4, grid=4, num_classes=10)
    torch.manual_seed(0)
    ref = Generator(cfg, impl="torch").to(device)
    fused = Generator(cfg, impl="triton").to(device)
    for p in ref.parameters():  # leave adaLN-Zero so the blocks do something
        torch.nn.init.normal_(p, std=0.05)
    fused.load_state_dict(ref.state_dict())
    x, t, y = torch.randn(2, 16, 4, device=device), torch.rand(2, device=device), torch.tensor([1, 10], device=device)
    out_ref, out_fused = ref(x, t, y), fused(x, t, y)
    torch.testing.assert_close(out_fused, out_ref, rtol=1e-4, atol=1e-5)
    out_ref.square().sum().backward()
    out_fused.square().sum().backward()
    for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_latents_of_another_shape_name_the_fix():
    model = Generator(generator_config("SiT-tiny/1", in_channels=4, grid=4, num_classes=10), impl="torch")
    with pytest.raises(ValueError, match=r"expects latents \(B, 16, 4\).*got \(2, 16, 8\).*model.in_channels"):
        model(torch.randn(2, 16, 8), torch.rand(2), torch.tensor([0, 1]))


def test_triton_ops_on_a_cpu_without_the_interpreter_say_what_to_do():
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    res = subprocess.run([sys.executable, "-c", "from fae_fast.layers import Ops; Ops('triton')"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "impl='triton' needs a CUDA GPU" in res.stderr and "TRITON_INTERPRET=1 set before" in res.stderr


def test_every_fused_op_has_a_reference_with_its_signature():
    """Ops dispatch by name (layers.FUSED_OPS): each reference takes the fused functional's arguments (and may add
    keyword ones with defaults, such as upcast for the tests)."""
    import inspect

    from fae_fast.layers import FUSED_OPS, Ops, op_table

    fused, ref = op_table("triton"), op_table("torch")
    assert set(fused) == set(ref) == set(FUSED_OPS)
    for name in FUSED_OPS:
        theirs, ours = inspect.signature(fused[name]).parameters, inspect.signature(ref[name]).parameters
        assert list(ours)[:len(theirs)] == list(theirs), name
        assert all(p.default is not inspect.Parameter.empty for p in list(ours.values())[len(theirs):]), name
        assert getattr(Ops("torch"), name) is ref[name] and getattr(Ops("triton"), name) is fused[name]
