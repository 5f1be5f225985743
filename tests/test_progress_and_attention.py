"""The progress line (images/s over all ranks and per GPU, MFU per GPU), the loss history that survives a
resume, and the attention backend chooser's CPU path and its notes for backends that cannot run."""
import json
import logging

import torch

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


def test_the_conservative_peak_is_never_below_the_gpu_kinds_best():
    """An H200 that measured 666 TFLOP/s (2026-12-02) is judged against the 790 another H200 measured; a run
    measuring above the best known keeps its own; an unknown GPU keeps its own."""
    from fae_fast.train.runtime import conservative_bf16_peak

    assert conservative_bf16_peak(666e12, "NVIDIA H200") == 790e12
    assert conservative_bf16_peak(800e12, "NVIDIA H200") == 800e12
    assert conservative_bf16_peak(500e12, "NVIDIA A100-SXM4-80GB") == 500e12
