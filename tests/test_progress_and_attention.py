"""The progress line (images/s over all ranks and per GPU, MFU per GPU), the loss history that survives a
resume, and the attention backend chooser: its CPU path, its notes for backends that cannot run, and its
check of each backend's gradients (a backend whose backward misreads the gradient's layout, as cuDNN's did on
an H200, is made right by `output_layout_gradient` or skipped)."""
import json
import logging

import pytest
import torch
import torch.nn.functional as F

from fae_fast import attention
from fae_fast.train.runtime import Progress


def test_progress_line_gives_per_rank_rate_and_mfu(monkeypatch):
    clock = iter([0.0, 10.0])
    monkeypatch.setattr("fae_fast.train.runtime.time.perf_counter", lambda: next(clock))
    progress = Progress(total_steps=100, start_step=0, global_batch=512, flops_per_image=1e9, peak_flops=1e12,
                        device=torch.device("cpu"), world=4)
    line = progress.line(10, {"loss": 0.5})
    # 10 steps x 512 images in 10 s = 512 img/s over 4 ranks = 128 per rank; MFU = 128 * 1e9 / 1e12
    assert "512 img/s (128 per rank)" in line  # on CUDA: "per GPU"
    assert "MFU 0.13" in line
    assert "step 10/100" in line and "loss 0.5000" in line and "ETA 0:01:30" in line


def test_history_of_earlier_runs_is_read_back_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "history.json"
    path.write_text(json.dumps([[10, {"loss": 3.0}], [20, {"loss": 2.0}], [30, {"loss": 1.5}]]))
    # killed after step 30 was logged but before the checkpoint at 30: resumed from 20, steps 21.. run again
    progress = Progress(total_steps=40, start_step=20, global_batch=8, flops_per_image=0, peak_flops=0,
                        device=torch.device("cpu"), history_path=str(path))
    assert progress.history == [(10, {"loss": 3.0}), (20, {"loss": 2.0})]
    progress.line(30, {"loss": 1.4})
    progress.save()
    assert json.loads(path.read_text()) == [[10, {"loss": 3.0}], [20, {"loss": 2.0}], [30, {"loss": 1.4}]]


def test_fresh_run_ignores_a_stale_history(tmp_path):
    path = tmp_path / "history.json"
    path.write_text(json.dumps([[10, {"loss": 3.0}]]))
    progress = Progress(total_steps=40, start_step=0, global_batch=8, flops_per_image=0, peak_flops=0,
                        device=torch.device("cpu"), history_path=str(path))
    assert progress.history == []


def test_choose_backend_on_cpu_is_plain_sdpa_and_attention_matches_the_formula():
    assert attention.choose_backend(2, 3, 5, 8, torch.float32, "cpu") == "sdpa"
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    want = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v
    torch.testing.assert_close(attention.attention(q, k, v), want, rtol=1e-5, atol=1e-5)


def test_a_backend_that_fails_is_skipped_with_one_note(caplog):
    def broken(q, k, v, causal=False):
        raise RuntimeError("no kernel image is available for execution on the device\nmore detail")

    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="fae_fast.attention"):
        for _ in range(2):
            assert attention._time_fwd_bwd("broken_pkg", broken, q, q, q) == float("inf")
    notes = [r.getMessage() for r in caplog.records if "broken_pkg" in r.getMessage()]
    assert len(notes) == 1, notes  # once, on one line
    assert "RuntimeError: no kernel image is available" in notes[0] and "\n" not in notes[0]


class _BackwardReadingTheOutputLayout(torch.autograd.Function):
    """Attention whose backward reads the output gradient's memory as if it had the (contiguous) output's
    strides: the failure cuDNN attention's backward showed on an H200 (torch 2.11), emulated in PyTorch."""

    @staticmethod
    def forward(ctx, q, k, v):
        p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        ctx.save_for_backward(q, k, v, p)
        return p @ v  # contiguous (a `.contiguous()` here made torch 2.11's compiler return zero gradients)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, p = ctx.saved_tensors
        dout = dout.as_strided(dout.shape, q.contiguous().stride())
        dp = dout @ v.transpose(-1, -2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * q.shape[-1] ** -0.5
        return ds @ k, ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ dout


def _layout_bug(q, k, v, causal=False):
    return _BackwardReadingTheOutputLayout.apply(q, k, v)


def _layout_bug_handed_its_layout(q, k, v, causal=False):
    return attention.output_layout_gradient(_BackwardReadingTheOutputLayout.apply(q, k, v))


def test_a_backward_that_misreads_the_gradient_layout_is_caught_and_made_right():
    shape = (2, 3, 16, 8)
    assert attention.attention_error(_layout_bug, shape, torch.float32, "cpu") > 0.5  # the check sees it
    assert attention.attention_error(_layout_bug_handed_its_layout, shape, torch.float32, "cpu") < 1e-5
    compiled = torch.compile(_layout_bug_handed_its_layout, fullgraph=True, dynamic=False)
    assert attention.attention_error(compiled, shape, torch.float32, "cpu") < 1e-5


class _TokenMajorBackwardReadingTheOutputLayout(_BackwardReadingTheOutputLayout):
    """The same misreading backward, for an output laid out (B, T, H, Dh), as cuDNN's is for the rope kernel's
    token-major q: the backward reads the gradient's memory as if it had that layout."""

    @staticmethod
    def forward(ctx, q, k, v):
        p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        ctx.save_for_backward(q, k, v, p)
        return (p @ v).transpose(1, 2).contiguous().transpose(1, 2)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, p = ctx.saved_tensors
        dout = dout.as_strided(dout.shape, q.transpose(1, 2).contiguous().transpose(1, 2).stride())
        dp = dout @ v.transpose(-1, -2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * q.shape[-1] ** -0.5
        return ds @ k, ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ dout


def _as_heads(tokens, heads):
    B, T, width = tokens.shape
    return tokens.view(B, T, heads, width // heads).transpose(1, 2)


@pytest.mark.parametrize("bug", [_BackwardReadingTheOutputLayout, _TokenMajorBackwardReadingTheOutputLayout])
def test_the_token_hand_over_gives_the_gradient_the_outputs_layout(bug):
    """`output_layout_tokens` (what the models' attention returns to their projection): the misreading
    backward gets right gradients whichever layout its output has, eagerly, and compiled for the contiguous
    output. (Compiled, an emulation built as an autograd.Function is always handed a contiguous gradient, so
    the token-major case cannot be emulated there; the next test checks the real SDPA backward's input in
    the compiled graph, and the GPU chooser checks every backend through this path compiled.)"""
    shape = (2, 3, 16, 8)
    assert attention.attention_error(lambda q, k, v, causal=False: bug.apply(q, k, v), shape, torch.float32,
                                     "cpu") > 0.5  # the emulated fault bites without the hand-over

    def handed_over(q, k, v, causal=False):
        return _as_heads(attention.output_layout_tokens(bug.apply(q, k, v)), q.shape[1])

    assert attention.attention_error(handed_over, shape, torch.float32, "cpu") < 1e-5
    if bug is _BackwardReadingTheOutputLayout:
        compiled = torch.compile(handed_over, fullgraph=True, dynamic=False)
        assert attention.attention_error(compiled, shape, torch.float32, "cpu") < 1e-5


def test_the_models_compiled_attention_hands_its_gradient_over_without_a_copy():
    """The blocks' attention compiled: in the backward graph the SDPA backward gets the projection's gradient
    as a view, in the output's strides, with no copy between (the earlier hand-over on the (B, H, T, Dh)
    output cost two: the gradient made contiguous, then copied back to the output's layout)."""
    from torch._dynamo.backends.common import aot_autograd

    from fae_fast.layers import Attention, Ops

    backward_graphs = []

    def keep_backward(gm, _inputs):
        backward_graphs.append(gm)
        return gm

    torch.manual_seed(0)
    layer = Attention(64, 4, qk_norm=True, rope_grid=4, ops=Ops("torch"))
    x = torch.randn(2, 16, 64, requires_grad=True)
    compiled = torch.compile(layer, backend=aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=keep_backward),
                             fullgraph=True, dynamic=False)
    compiled(x).square().sum().backward()
    eager_grad, x.grad = x.grad, None
    layer(x).square().sum().backward()
    torch.testing.assert_close(eager_grad, x.grad, rtol=1e-5, atol=1e-5)

    (graph,) = backward_graphs
    nodes = list(graph.graph.nodes)
    assert not any("copy_to_strides" in str(n.target) for n in nodes)
    sdpa_backward = next(n for n in nodes if "scaled_dot_product" in str(n.target) and "backward" in str(n.target))
    grad_out, out = sdpa_backward.args[0], sdpa_backward.args[4]
    assert grad_out.meta["val"].stride() == out.meta["val"].stride()
    producer = grad_out
    while producer.op == "call_function" and producer.target in (torch.ops.aten.view.default,
                                                                   torch.ops.aten.permute.default,
                                                                   torch.ops.aten.transpose.int,
                                                                   torch.ops.aten._unsafe_view.default):
        producer = producer.args[0]
    assert producer.target not in (torch.ops.aten.clone.default, torch.ops.aten.copy.default), producer.format_node()


def _right_eagerly_only(q, k, v, causal=False):
    """Attention that is right eagerly and wrong (its output halved) in a compiled graph."""
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out * 0.5 if torch.compiler.is_compiling() else out


def _rejected_by_the_compiler(q, k, v, causal=False):
    if torch.compiler.is_compiling():
        raise RuntimeError("no kernel for this layout")
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def test_the_check_runs_each_backend_eagerly_and_compiled(monkeypatch, caplog):
    monkeypatch.setattr(attention, "candidates", lambda: {"right_eagerly_only": _right_eagerly_only,
                                                          "rejected_by_the_compiler": _rejected_by_the_compiler})
    monkeypatch.setattr(attention, "_NOTES_SHOWN", set())
    shape = (2, 3, 16, 8)
    assert attention.checked_error("sdpa", shape, torch.float32, "cpu") < 1e-5
    assert attention.checked_error("right_eagerly_only", shape, torch.float32, "cpu") > 0.4
    with caplog.at_level(logging.WARNING, logger="fae_fast.attention"):
        assert attention.checked_error("rejected_by_the_compiler", shape, torch.float32, "cpu") == float("inf")
    notes = [r.getMessage() for r in caplog.records if "rejected_by_the_compiler" in r.getMessage()]
    assert len(notes) == 1 and "it failed compiled: " in notes[0] and "\n" not in notes[0], notes


def test_the_check_holds_for_more_shapes_than_dynamos_recompile_limit():
    """Every check compiles the same function anew (two layouts a shape): a process that checks many shapes
    (the FAE's, a test suite) must not run into dynamo's limit of 8 graphs a function, which made every later
    compiled check fail."""
    for tokens in range(8, 20):
        assert attention.checked_error("sdpa", (1, 2, tokens, 8), torch.float32, "cpu") < 1e-5, tokens


def test_the_hand_over_gives_the_gradient_the_outputs_layout_eagerly_and_compiled():
    def token_major():  # (B, H, T, Dh) laid out (B, T, H, Dh), as the attention output is
        return torch.randn(2, 5, 3, 4).transpose(1, 2)

    out = token_major().requires_grad_()
    seen = []
    out.register_hook(seen.append)
    attention.output_layout_gradient(out).backward(torch.randn(out.shape))  # a contiguous gradient: copied
    assert seen[-1].stride() == out.stride()
    in_its_layout = token_major()
    attention.output_layout_gradient(out).backward(in_its_layout)  # already in the output's layout: no copy
    assert seen[-1].data_ptr() == in_its_layout.data_ptr()

    def double_then_hand_over(x):
        return attention.output_layout_gradient(x * 2)

    x, weights = token_major().requires_grad_(), torch.randn(2, 3, 5, 4)
    (torch.compile(double_then_hand_over, fullgraph=True, dynamic=False)(x) * weights).sum().backward()
    torch.testing.assert_close(x.grad, 2 * weights)
    torch.library.opcheck(torch.ops.fae_fast.copy_to_strides.default, (torch.randn(2, 3, 5, 4), [60, 4, 12, 1]))


def test_bf16_rounding_passes_the_gradient_check():
    error = attention.attention_error(lambda q, k, v, causal: attention._attend("sdpa", q, k, v, causal),
                                      (2, 3, 64, 16), torch.bfloat16, "cpu")
    assert 1e-4 < error < attention.ERROR_TOLERANCE / 4


def test_the_fastest_backend_with_wrong_gradients_is_skipped_with_a_note(caplog):
    errors = {"fast_but_wrong": 1.4, "right": 4e-3, "unsupported": 0.0}
    timings = {"fast_but_wrong": 0.8, "right": 1.1, "unsupported": float("inf")}
    with caplog.at_level(logging.WARNING, logger="fae_fast.attention"):
        assert attention.fastest_correct(timings, errors.get) == "right"
        assert attention.fastest_correct({"fast_but_wrong": 0.8}, errors.get) == "sdpa"  # none right: PyTorch's own
    notes = [r.getMessage() for r in caplog.records if "fast_but_wrong" in r.getMessage()]
    assert len(notes) == 1 and "1.4" in notes[0], notes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's attention backends")
@pytest.mark.parametrize("shape", [(4, 12, 256, 64), (4, 16, 256, 72)])  # LightningDiT-B and -XL heads
def test_every_gpu_backend_gives_fp32_attention_gradients_eager_and_compiled(shape):
    """cuDNN's backward fed a gradient of another layout than its output's gave relative error 1.4 on an H200
    and a B-size generator diverged; through `_attend` and the models' token path every backend must match
    fp32 attention."""
    for name in attention.candidates():
        torch._dynamo.reset()  # one lambda's code for every backend: dynamo stops compiling it after 8 graphs
        for path, way in (("", attention._attend), (" as tokens", attention._attend_tokens_as_heads)):
            attend = lambda q, k, v, causal, name=name, way=way: way(name, q, k, v, causal)  # noqa: E731
            for mode, fn in (("eager", attend), ("compiled", torch.compile(attend, fullgraph=True, dynamic=False)),
                             ("compiled, dynamic shapes", torch.compile(attend, fullgraph=True, dynamic=True))):
                error = attention.attention_error(fn, shape, torch.bfloat16, "cuda")
                assert error < attention.ERROR_TOLERANCE, (name, mode + path, error)


def test_run_attention_names_a_known_backend_and_a_new_one_forgets_earlier_choices(monkeypatch):
    monkeypatch.setattr(attention, "_CHOICE", {("some", "shape"): "sdpa_cudnn"})
    monkeypatch.setattr(attention, "_ONLY", [None])
    with pytest.raises(ValueError, match="'sdpa_flsh' is not one of sdpa_cudnn, sdpa_flash, sdpa_efficient"):
        attention.only_backend("sdpa_flsh")
    attention.only_backend("sdpa_flash")
    assert attention._CHOICE == {} and attention._ONLY == ["sdpa_flash"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's attention backends")
def test_a_backend_run_attention_insists_on_is_taken_or_refused_by_name(monkeypatch):
    monkeypatch.setattr(attention, "_CHOICE", {})
    monkeypatch.setattr(attention, "_ONLY", [None])
    attention.only_backend("sdpa_flash")
    assert attention.choose_backend(8, 12, 256, 64, torch.bfloat16, "cuda") == "sdpa_flash"
    missing = next((n for n in attention.BACKENDS if n not in attention.candidates()), None)
    if missing is not None:  # flash-attn or xformers, not installed on the machine
        attention.only_backend(missing)
        with pytest.raises(ValueError, match=f"run.attention={missing}: that backend cannot run here"):
            attention.choose_backend(8, 12, 256, 64, torch.bfloat16, "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's attention backends")
def test_the_gpu_chooser_logs_its_check_and_takes_a_backend_that_passes_it(caplog, monkeypatch):
    monkeypatch.setattr(attention, "_CHOICE", {})
    with caplog.at_level(logging.INFO, logger="fae_fast.attention"):
        name = attention.choose_backend(16, 12, 256, 64, torch.bfloat16, "cuda")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(f"attention {name} for B=16"))
    assert "error against fp32: " in line
    attend = lambda q, k, v, causal: attention._attend(name, q, k, v, causal)  # noqa: E731
    assert attention.attention_error(attend, (4, 12, 256, 64), torch.bfloat16, "cuda") < attention.ERROR_TOLERANCE


def test_the_conservative_peak_is_never_below_the_gpu_kinds_best():
    """An H200 that measured 666 TFLOP/s (2026-12-02) is judged against the 790 another H200 measured; a run
    measuring above the best known keeps its own; an unknown GPU keeps its own."""
    from fae_fast.train.runtime import conservative_bf16_peak

    assert conservative_bf16_peak(666e12, "NVIDIA H200") == 790e12
    assert conservative_bf16_peak(800e12, "NVIDIA H200") == 800e12
    assert conservative_bf16_peak(500e12, "NVIDIA A100-SXM4-80GB") == 500e12


def test_training_progress_judges_mfu_against_the_conservative_peak(monkeypatch):
    """A GPU shared with other work measures its peak low; the progress line's MFU denominator is then the GPU
    kind's best known rate, not the low measurement. On CPU there is no MFU."""
    from fae_fast.train import runtime

    assert runtime.training_mfu_peak(torch.device("cpu")) == 0.0
    monkeypatch.setattr(runtime, "measured_bf16_peak", lambda device: 350e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert runtime.training_mfu_peak(torch.device("cuda", 0)) == 790e12
