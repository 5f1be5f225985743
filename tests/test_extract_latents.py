"""training/extract_latents.py end to end on CPU: a generated image folder (30 small JPEGs in 3 class
folders), a tiny timm ViT with random weights saved to a file as the frozen encoder, FAE-tiny.

Checked: count and shapes; every stored latent (and its flipped twin) against the latent computed
directly from the decoded image; the stats against a float64 computation over the stored latents;
resume after a simulated crash; 2 processes (torchrun, gloo) writing the same bytes as 1.

Tolerances: the stored latents are float16, so a stored value is the directly computed float32 value
rounded to float16 (half a float16 step, 2^-11 relative) plus float32 differences between a batch of 8
rows and a batch of 1 (about 1e-6): rtol 2^-10, atol 1e-5. The stats are float64 reductions of the
same float16 values in another order: 1e-12 relative.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from PIL import Image
from safetensors.torch import save_file

from fae_fast.config import encoder_config, fae_config
from fae_fast.data.backends import decode_reference
from fae_fast.data.latent_cache import LatentCache
from fae_fast.data.synthetic import jpeg_bytes, photo
from fae_fast.encoders import FrozenEncoder
from training import extract_latents
from fae_fast.fae import FeatureAutoencoder
from conftest import program_env  # noqa: E402 (tests/ is on sys.path)
from fae_fast.cli import UsageError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(72, 96), (96, 80), (64, 64), (90, 120), (80, 70)]  # (h, w): all cropped to FAE-tiny's 64 px
CLASSES, PER_CLASS = 3, 10


pytestmark = pytest.mark.usefixtures("in_process_group")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Images, weights files, the models they hold, and one complete extraction."""
    tmp = tmp_path_factory.mktemp("extract")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        folder = tmp / "images" / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            h, w = SIZES[(c + i) % len(SIZES)]
            (folder / f"img_{i:02d}.JPEG").write_bytes(jpeg_bytes(Image.fromarray(photo(h, w, rng))))
    torch.manual_seed(1)
    encoder = FrozenEncoder(encoder_config("tiny"))
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, str(tmp / "encoder.safetensors"))
    pair = FeatureAutoencoder(fae_config("FAE-tiny"), "torch")  # what train_fae.py's feature stage exports
    with torch.no_grad():  # latents of a larger scale than the init's, as a trained FAE may have
        pair.encoder.to_moments.weight.mul_(4)
    save_file(pair.state_dict(), str(tmp / "fae.safetensors"))
    args = ["--images", str(tmp / "images" / "train"), "--encoder", "tiny",
            f"--encoder.weights_path={tmp / 'encoder.safetensors'}", "--fae", str(tmp / "fae.safetensors"),
            "--batch", "4", "--shard-size", "8", "--workers", "0", "--backend", "pil"]  # PIL: direct_latents' decode
    assert extract_latents.main([*args, "--out", str(tmp / "cache")])
    return {"tmp": tmp, "args": args, "encoder": encoder, "fae": pair.encoder.eval(), "pair": pair,
            "cache": tmp / "cache"}


def files(folder: Path) -> list[Path]:
    return sorted(folder.glob("train/*/*.JPEG"))


def direct_latents(encoder, fae, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """mu of the image and of its flip, computed without the program: PIL crop -> encoder -> FAE mean."""
    crop = torch.from_numpy(decode_reference(path.read_bytes(), 64)).permute(2, 0, 1).float()[None] / 255
    with torch.no_grad():
        return tuple(fae.encode(encoder(x), sample=False)[1][0] for x in (crop, crop.flip(-1)))


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard_*.npy"))}


# ----------------------------------------------------------------------------------------------------
# Round trip
# ----------------------------------------------------------------------------------------------------
def test_count_shapes_labels_and_files(setup):
    cache = LatentCache(setup["cache"])
    n = CLASSES * PER_CLASS
    assert cache.num_images == n and (cache.tokens, cache.channels) == (16, 4) and cache.flips
    assert [s["count"] for s in cache.index["shards"]] == [8, 8, 8, 6]
    assert [x.shape for x in cache.shards] == [(8, 2, 16, 4)] * 3 + [(6, 2, 16, 4)]
    np.testing.assert_array_equal(cache.labels, np.repeat(np.arange(CLASSES), PER_CLASS))
    listed = [line.split()[0] for line in (setup["cache"] / "images.txt").read_text().splitlines()]
    assert listed == [str(p.relative_to(setup["tmp"] / "images")) for p in files(setup["tmp"] / "images")]
    assert cache.index["fae"] == str(setup["tmp"] / "fae.safetensors") and cache.index["encoder"] == "vit_tiny_patch16_224"
    assert not list(setup["cache"].glob("*.tmp"))


def direct_latents_as_on_cuda(encoder, fae, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """direct_latents with the program's CUDA numerics: the encoder in bf16, the FAE under bf16 autocast."""
    import copy

    encoder, fae = copy.deepcopy(encoder).cuda(), copy.deepcopy(fae).cuda()
    encoder.model.to(torch.bfloat16)
    crop = torch.from_numpy(decode_reference(path.read_bytes(), 64)).permute(2, 0, 1).float()[None].cuda() / 255
    with torch.no_grad():
        features = [encoder(x) for x in (crop, crop.flip(-1))]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return tuple(fae.encode(f, sample=False)[1][0].float().cpu() for f in features)


def check_stored_latents(stored: torch.Tensor, encoder, fae, path: Path, what: str) -> None:
    """`stored` (2, T, C): the program's latents of the image at `path` and of its flip, against the direct
    computation. fp32 on CPU: equal up to float16 storage. On CUDA the program runs bf16: its error against
    the fp32 direct computation is at most 2x that of the same computation in bf16, plus float16 storage."""
    plain, flipped = direct_latents(encoder, fae, path)
    if not torch.cuda.is_available():
        torch.testing.assert_close(stored[0], plain, rtol=2**-10, atol=1e-5)
        torch.testing.assert_close(stored[1], flipped, rtol=2**-10, atol=1e-5)
        return
    for got, want, bf16 in zip(stored, (plain, flipped), direct_latents_as_on_cuda(encoder, fae, path)):
        err, err_bf16 = (got - want).norm(), (bf16 - want).norm()
        assert err <= 2 * err_bf16 + 2**-10 * want.norm(), f"{what}: error {err:.3g} > 2 x bf16's {err_bf16:.3g}"


def test_latents_and_flips_equal_a_direct_computation(setup):
    cache = LatentCache(setup["cache"])
    stored = torch.from_numpy(np.concatenate([np.asarray(x) for x in cache.shards])).float()  # (N, 2, T, C)
    for i, path in enumerate(files(setup["tmp"] / "images")):
        check_stored_latents(stored[i], setup["encoder"], setup["fae"], path, f"image {i}")
    # the comparisons above can fail: twins differ, images differ
    assert (stored[:, 0] - stored[:, 1]).abs().amax() > 0.1
    assert (stored[0, 0] - stored[1, 0]).abs().amax() > 0.1


def test_stats_match_a_direct_computation(setup):
    cache = LatentCache(setup["cache"])
    flat = np.concatenate([np.asarray(x, dtype=np.float64) for x in cache.shards]).reshape(-1, 4)
    stats = json.loads((setup["cache"] / "stats.json").read_text())
    np.testing.assert_allclose(stats["mean"], flat.mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(stats["std"], flat.std(0), rtol=1e-12)
    assert stats["count"] == flat.shape[0] == 2 * 30 * 16


# ----------------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------------
def test_resume_after_a_crash_skips_finished_shards_and_redoes_the_half_written_one(setup, tmp_path):
    out = tmp_path / "cache"
    assert not extract_latents.main([*setup["args"], "--out", str(out), "--max-shards", "2"])
    assert sorted(p.name for p in out.glob("shard_?????.npy")) == ["shard_00000.npy", "shard_00001.npy"]
    with pytest.raises(ValueError, match="not a complete latent cache"):
        LatentCache(out)
    # a crash inside shard 2: its latents half written under the temporary name, its labels already renamed
    (out / "shard_00002.npy.tmp").write_bytes(b"\x93NUMPY half a shard")
    np.save(out / "shard_00002.labels.npy", np.full(8, 99, dtype=np.int64))
    finished = {p: os.stat(out / p).st_mtime_ns for p in
                ("shard_00000.npy", "shard_00000.labels.npy", "shard_00001.npy", "shard_00001.labels.npy")}
    assert extract_latents.main([*setup["args"], "--out", str(out)])
    assert {p: os.stat(out / p).st_mtime_ns for p in finished} == finished
    assert not list(out.glob("*.tmp"))
    assert shard_bytes(out) == shard_bytes(setup["cache"])  # the redone shard is the uninterrupted run's
    assert (out / "stats.json").read_text() == (setup["cache"] / "stats.json").read_text()
    assert extract_latents.main([*setup["args"], "--out", str(out)])  # a complete cache: nothing to do


def test_resume_with_other_settings_names_the_setting(setup, tmp_path):
    out = tmp_path / "cache"
    assert not extract_latents.main([*setup["args"], "--out", str(out), "--max-shards", "1"])
    with pytest.raises(ValueError, match=r"extracted with shard_size=8, this run has 12; pass a new --out"):
        extract_latents.main([*setup["args"], "--out", str(out), "--shard-size", "12"])


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
def test_random_weights_must_be_asked_for(setup, tmp_path):
    args = ["--images", str(setup["tmp"] / "images" / "train"), "--encoder", "tiny", "--out", str(tmp_path)]
    with pytest.raises(UsageError, match="no FAE weights given.*--random_weights"):
        extract_latents.main(args)
    assert extract_latents.main([*args, "--random-weights", "--batch", "8", "--shard-size", "16", "--workers", "0"])
    assert json.loads((tmp_path / "index.json").read_text())["fae"] == "random (seed 0)"


def test_fae_weights_of_another_size_name_the_key(setup, tmp_path):
    args = [*setup["args"], "--out", str(tmp_path / "c"), "--fae_model.latent_dim=8"]
    with pytest.raises(ValueError, match=r"encoder.to_moments.weight is \(8, 192\) there but \(16, 192\) here"):
        extract_latents.main(args)


def test_fae_weights_from_a_checkpoint_folder(setup, tmp_path):
    # a DCP step folder of train_fae.py holds the EMA under "ema", keyed by parameter name
    folder = tmp_path / "step_00000100"
    dcp.save({"ema": {k: v.detach().clone() for k, v in setup["pair"].named_parameters()}}, checkpoint_id=str(folder))
    args = [a if a != str(setup["tmp"] / "fae.safetensors") else str(folder) for a in setup["args"]]
    assert not extract_latents.main([*args, "--out", str(tmp_path / "c"), "--max-shards", "1"])
    assert (tmp_path / "c" / "shard_00000.npy").read_bytes() == (setup["cache"] / "shard_00000.npy").read_bytes()


def test_an_undecodable_image_stops_extraction_naming_it(setup, tmp_path):
    images = tmp_path / "images" / "train" / "n00000000"
    images.mkdir(parents=True)
    for p in files(setup["tmp"] / "images")[:5]:
        (images / p.name).write_bytes(p.read_bytes())
    bad = images / "img_99.JPEG"
    bad.write_bytes(files(setup["tmp"] / "images")[0].read_bytes()[:300])
    args = [a if a != str(setup["tmp"] / "images" / "train") else str(images.parent) for a in setup["args"]]
    with pytest.raises(Exception, match="img_99.JPEG cannot be decoded"):
        extract_latents.main([*args, "--out", str(tmp_path / "c")])
    assert not (tmp_path / "c" / "index.json").exists()


def test_shard_size_must_be_a_multiple_of_the_batch(setup, tmp_path):
    with pytest.raises(UsageError, match="--shard_size=10 is not a multiple of --batch=4"):
        extract_latents.main([*setup["args"], "--out", str(tmp_path), "--shard-size", "10"])


# ----------------------------------------------------------------------------------------------------
# Several processes
# ----------------------------------------------------------------------------------------------------
def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "training" / "extract_latents.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=program_env(2), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_write_the_same_cache_as_one(setup, tmp_path):
    # random weights: every rank must draw the same ones from --seed, or rank 1's shards would differ
    args = ["--images", str(setup["tmp"] / "images" / "train"), "--encoder", "tiny", "--random-weights",
            "--seed", "3", "--batch", "4", "--shard-size", "8", "--workers", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    for nproc, out in ((1, one), (2, two)):
        res = torchrun(nproc, *args, "--out", str(out))
        assert res.returncode == 0, res.stderr[-3000:]
        assert "latent cache complete: 30 images present exactly once" in res.stdout
    assert len(shard_bytes(one)) == 8 and shard_bytes(one) == shard_bytes(two)
    for name in ("stats.json", "index.json", "images.txt"):
        assert (one / name).read_text() == (two / name).read_text()
