"""Training health: the loss-spike guard (judging, rollback, skipped batches, the stop after too many) and the
run that replays the skipped batches' absence exactly."""
import json
import random

import pytest
import torch
from conftest import PooledPixels, write_random_fae
from safetensors.torch import load_file

from fae_fast.data.latents import ToySource
from training import train_gen
from fae_fast.train.runtime import SpikeGuard, data_index, merge_ranges


pytestmark = pytest.mark.usefixtures("in_process_group")


def test_data_index_skips_inclusive_ranges_in_order():
    skip = merge_ranges([(10, 12), (11, 14), (3, 3)])
    assert skip == [[3, 3], [10, 14]]
    assert [data_index(s, skip) for s in (0, 2, 3, 8, 9, 10)] == [0, 2, 4, 9, 15, 16]


def judged(guard: SpikeGuard, losses: list[float], start: int = 0):
    for i, loss in enumerate(losses):
        guard.observe(start + i, torch.tensor(loss))
    return guard.check()


def test_spike_guard_ignores_noise_and_short_blips_and_finds_a_run():
    rng = random.Random(0)
    noisy = [1.0 / (1 + 0.01 * i) * (1 + 0.3 * rng.uniform(-1, 1)) for i in range(300)]  # +-30% on a falling curve
    guard = SpikeGuard(2.0, 200, 3)
    assert judged(guard, noisy) is None
    assert judged(guard, [5.0, 5.0, 0.3, 0.3], start=300) is None  # two high steps: noise
    spike = judged(guard, [0.3, 4.0, 6.0, 8.0, 0.3], start=304)
    assert (spike.first_step, spike.last_step, spike.losses) == (305, 307, [4.0, 6.0, 8.0])
    assert 0.2 < spike.median < 0.5
    assert judged(SpikeGuard(2.0, 200, 3), [9.0] * 10) is None  # under 50 clean steps nothing is judged
    assert judged(guard, [float("nan")] * 3, start=400) is None  # NaN is the NaN guard's: it stops the run


def test_spike_guard_judges_a_negative_loss_by_its_excess_over_the_floor():
    """An NLL per dimension near or below 0 (the flow family's): 0.02 is not 'twice' a median of 0.01, but
    with the floor at -1.5 a run at 2.0 is a spike."""
    rng = random.Random(1)
    calm = [0.01 + 0.05 * rng.uniform(-1, 1) for _ in range(100)]
    guard = SpikeGuard(2.0, 200, 3, floor=-1.5)
    assert judged(guard, calm) is None
    spike = judged(guard, [2.0, 2.1, 2.2], start=100)
    assert spike is not None and spike.first_step == 100
    assert judged(SpikeGuard(2.0, 200, 3), calm) is not None  # judged against 0, the noise alone looks like spikes


TINY = ["--model.depth=2", "--model.width=32", "--model.heads=2", "--data.global_batch=16", "--run.eval_samples=0",
        "--run.log_every=10", "--run.compile=false", "--run.precision=fp32", "--run.ckpt_every=20",
        "--run.steps=100", "--run.sample_every=0", "--optim.lr=1e-3"]


def poison(monkeypatch, indices: set[int]):
    """ToySource batches of these data indices come with latents x 30: a bad shard."""
    plain = ToySource.batch

    def batch(self, index):
        x, y = plain(self, index)
        return (x * 30 if index in indices else x), y

    monkeypatch.setattr(ToySource, "batch", batch)


def test_a_spike_rolls_back_skips_its_batches_and_matches_a_run_without_them(tmp_path, monkeypatch, capsys):
    poisoned = tmp_path / "poisoned"
    with monkeypatch.context() as m:
        poison(m, {70, 71, 72})
        a = train_gen.main([*TINY, f"--run.out_dir={poisoned}"])
    printed = capsys.readouterr().out
    assert "loss spike at steps 70-72" in printed and "rolled back to" in printed and "step_00000060" in printed
    assert "skipping data batches 67-72" in printed
    saved = json.loads((poisoned / "checkpoints" / "step_00000100" / "config.json").read_text())
    assert saved["data"]["skip"] == [[67, 72]]

    clean = tmp_path / "clean"
    b = train_gen.main([*TINY, f"--run.out_dir={clean}", "--data.skip=[(67, 72)]"])
    assert [s for s, _ in a["history"]] == [s for s, _ in b["history"]] == list(range(10, 101, 10))
    for (step, ta), (_, tb) in zip(a["history"], b["history"]):
        assert ta["loss"] == pytest.approx(tb["loss"], rel=1e-6), step
    ema_a, ema_b = load_file(str(poisoned / "ema.safetensors")), load_file(str(clean / "ema.safetensors"))
    exact = not torch.cuda.is_available()  # CPU: bit for bit; CUDA attention backward may sum in another order
    for k in ema_a:
        torch.testing.assert_close(ema_a[k], ema_b[k], rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)


def test_too_many_rollbacks_stop_the_run_naming_steps_and_checkpoint(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        poison(m, set(range(70, 400)))  # every batch from 70 on is bad: each rollback meets the next spike
        with pytest.raises(FloatingPointError, match=r"loss spike at steps .*: rollback 2 within 200 steps, more than "
                                                     r"run.spike_max_rollbacks=1 .*"
                                                     r"step_00000060 is the newest checkpoint before them"):
            train_gen.main([*TINY, f"--run.out_dir={tmp_path / 'run'}", "--run.spike_max_rollbacks=1"])


def test_toy_frechet_is_logged_during_training_and_kept_on_resume(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, f"--run.out_dir={out}", "--run.eval_every=20", "--run.eval_samples=256"]
    first = train_gen.main([*args, "--run.steps=40"])
    evals = {s: t["frechet"] for s, t in first["history"] if "frechet" in t}
    assert sorted(evals) == [20, 40] and all(v > 0 for v in evals.values())
    again = train_gen.main([*args, "--run.steps=60"])  # resumes at 40
    evals_again = {s: t["frechet"] for s, t in again["history"] if "frechet" in t}
    assert sorted(evals_again) == [20, 40, 60] and evals_again[40] == evals[40]
    assert (out / "loss.png").stat().st_size > 10_000


def test_fid_of_decoded_samples_is_logged_during_training(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from fae_fast.data import latent_cache as lc
    from fae_fast.eval import fid

    rng = np.random.default_rng(0)
    lc.write_cache(tmp_path / "cache", rng.normal(size=(40, 2, 16, 4)).astype(np.float16), rng.integers(0, 10, 40),
                   shard_size=16)
    write_random_fae(tmp_path)
    (tmp_path / "ref").mkdir()
    for i in range(60):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ref" / f"{i}.png")
    monkeypatch.setattr(fid, "InceptionExtractor", PooledPixels)
    result = train_gen.main([
        *TINY, "--model.grid=4", "--model.in_channels=4", "--model.num_classes=10", "--data.source=cache",
        f"--data.path={tmp_path / 'cache'}", f"--fae_decoder={tmp_path / 'fae.safetensors'}", "--run.steps=20",
        "--run.eval_every=10", "--run.eval_samples=48", f"--run.eval_ref={tmp_path / 'ref'}",
        f"--run.out_dir={tmp_path / 'run'}"])
    fids = {s: t["fid"] for s, t in result["history"] if "fid" in t}
    assert sorted(fids) == [10, 20] and all(v > 0 for v in fids.values())
