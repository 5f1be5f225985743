"""The latent cache format and LatentCacheSource (fae_fast.data.latent_cache): shapes, normalisation,
exact determinism by step, rank-disjoint batches, epoch coverage, and the errors people see.

Caches here are written from random arrays with write_cache (the extraction itself is tested in
test_extract_latents.py). Normalised latents are compared bit for bit with the same float32 formula;
the only tolerance is for the stats, which are float64 reductions in another order (1e-12 relative).
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fae_fast.config import DataConfig, generator_config
from fae_fast.data import latent_cache as lc
from fae_fast.data.latents import make_source
from conftest import program_env, write_random_fae  # noqa: E402 (tests/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
N, T, C = 60, 16, 4  # 60 images of 4x4 tokens x 4 channels, shards of 16 (the last holds 12)


def model_config(**kw):
    return generator_config("SiT-tiny/1", grid=4, in_channels=C, **kw)


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    latents = (rng.normal(size=(N, 2, T, C)) * [0.5, 1.0, 2.0, 3.0] + [1.0, -2.0, 0.0, 5.0]).astype(np.float16)
    labels = rng.integers(0, 10, N)
    return latents, labels


@pytest.fixture(scope="module")
def cache(tmp_path_factory, arrays):
    folder = tmp_path_factory.mktemp("cache")
    lc.write_cache(folder, *arrays, shard_size=16)
    return folder


def source(folder, *, rank=0, world=1, batch=12, **kw):
    data = DataConfig(source="cache", path=str(folder), global_batch=batch, **kw)
    return make_source(data, model_config(), rank=rank, world=world, device="cpu")


# ----------------------------------------------------------------------------------------------------
# The files
# ----------------------------------------------------------------------------------------------------
def test_files_index_and_stats(cache, arrays):
    latents, labels = arrays
    index = json.loads((cache / "index.json").read_text())
    assert index["complete"] is True and index["format"] == 1 and index["num_images"] == N
    assert (index["tokens"], index["channels"], index["dtype"], index["flips"]) == (T, C, "float16", True)
    assert [(s["start"], s["count"]) for s in index["shards"]] == [(0, 16), (16, 16), (32, 16), (48, 12)]
    for s in index["shards"]:
        x = np.load(cache / s["file"], mmap_mode="r")
        assert isinstance(x, np.memmap) and x.dtype == np.float16
        np.testing.assert_array_equal(x, latents[s["start"]:s["start"] + s["count"]])
        np.testing.assert_array_equal(np.load(cache / s["labels"]), labels[s["start"]:s["start"] + s["count"]])
    assert not list(cache.glob("*.tmp"))
    stats = json.loads((cache / "stats.json").read_text())
    flat = latents.astype(np.float64).reshape(-1, C)  # flips included
    np.testing.assert_allclose(stats["mean"], flat.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats["std"], flat.std(0), rtol=1e-12)
    assert stats["count"] == 2 * N * T


def test_coverage_check_names_missing_and_duplicated_images():
    lc.check_coverage(10, [(0, 4), (4, 6)])
    with pytest.raises(ValueError, match=r"3 images missing \(4-6\).*2 images present more than once \(8-9\)"):
        lc.check_coverage(10, [(0, 4), (7, 3), (8, 2)])


def test_shard_writer_refuses_a_shard_with_a_missing_image(tmp_path):
    writer = lc.ShardWriter(tmp_path, lc.Shard(0, 0, 4), T, C)
    writer.write(np.array([0, 1, 3]), np.zeros((3, 2, T, C), np.float16), np.zeros(3, np.int64))
    with pytest.raises(RuntimeError, match="no latent for images 2"):
        writer.finish()
    assert not (tmp_path / "shard_00000.npy").exists()


# ----------------------------------------------------------------------------------------------------
# The source
# ----------------------------------------------------------------------------------------------------
def test_batch_shapes_and_normalisation(cache, arrays):
    latents, labels = arrays
    src = source(cache, rank=1, world=2)
    stats = json.loads((cache / "stats.json").read_text())
    mean, std = torch.tensor(stats["mean"], dtype=torch.float32), torch.tensor(stats["std"], dtype=torch.float32)
    for step in (0, 3, 11):
        x, y = src.batch(step)
        assert x.shape == (6, T, C) and x.dtype == torch.float32 and y.shape == (6,) and y.dtype == torch.int64
        images, flips = src.indices(step)
        raw = torch.from_numpy(latents[images, flips.astype(int)]).float()
        torch.testing.assert_close(x, (raw - mean) / std, rtol=0, atol=0)
        assert torch.equal(y, torch.from_numpy(labels[images]))


def test_normalised_cache_has_zero_mean_and_unit_std(cache, arrays):
    latents, _ = arrays
    stats = json.loads((cache / "stats.json").read_text())
    z = (latents.astype(np.float64).reshape(-1, C) - stats["mean"]) / stats["std"]
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(0), 1, rtol=1e-12)


def test_batches_are_a_pure_function_of_the_step(cache):
    a, b = source(cache), source(cache)
    for step in range(8):  # a reads ahead step by step; b jumps straight to step 7 below
        xa, ya = a.batch(step)
    xb, yb = b.batch(7)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.state_dict() == {"epoch": 1, "position": 36, "num_images": N, "seed": 0}  # 5 steps per epoch
    assert not torch.equal(a.batch(6)[0], xa)
    other_seed = source(cache, seed=1)
    assert not np.array_equal(other_seed.indices(7)[0], b.indices(7)[0])


def test_ranks_take_disjoint_contiguous_parts_of_each_global_batch(cache):
    world = 3
    sources = [source(cache, rank=r, world=world) for r in range(world)]
    single = source(cache)
    for step in (0, 4, 9):
        parts = [s.indices(step)[0] for s in sources]
        assert len(set(np.concatenate(parts).tolist())) == 12
        np.testing.assert_array_equal(np.concatenate(parts), single.indices(step)[0])


def test_an_epoch_visits_every_image_once_and_the_next_reorders(cache):
    world, batch = 2, 12  # 60 / 12 = 5 steps per epoch, nothing dropped
    sources = [source(cache, rank=r, world=world, batch=batch) for r in range(world)]
    epoch0 = np.concatenate([s.indices(step)[0] for step in range(5) for s in sources])
    epoch1 = np.concatenate([s.indices(step)[0] for step in range(5, 10) for s in sources])
    assert sorted(epoch0.tolist()) == list(range(N)) == sorted(epoch1.tolist())
    assert not np.array_equal(epoch0, epoch1)
    # with a batch that does not divide N, the 60 % 16 = 12 left over are dropped, other ones each epoch
    s = source(cache, batch=16)
    e0 = np.concatenate([s.indices(step)[0] for step in range(3)])
    e1 = np.concatenate([s.indices(step)[0] for step in range(3, 6)])
    assert len(set(e0.tolist())) == 48 and len(set(e1.tolist())) == 48 and set(e0.tolist()) != set(e1.tolist())


def test_flip_coins(cache):
    s = source(cache, batch=60)
    flips = np.concatenate([s.indices(step)[1] for step in range(40)])
    assert 0.45 < flips.mean() < 0.55  # 2400 fair coins: 5 standard deviations is 0.051
    no_flip = source(cache, batch=60, random_flip=False)
    assert not np.concatenate([no_flip.indices(step)[1] for step in range(5)]).any()


def test_resume_state_round_trip(cache):
    a = source(cache)
    for step in range(7):
        a.batch(step)
    b = source(cache)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    with pytest.raises(ValueError, match="resume on the same cache and seed"):
        source(cache, seed=3).load_state_dict(a.state_dict())


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------
def test_shape_mismatch_names_both_shapes_and_the_fix(cache):
    data = DataConfig(source="cache", path=str(cache), global_batch=12)
    with pytest.raises(ValueError, match=r"holds 16 tokens x 4 channels .* expects 16x16=256 tokens x 32 channels; "
                                         r"set --model.grid=4 --model.in_channels=4"):
        make_source(data, generator_config("SiT-tiny/1"), rank=0, world=1, device="cpu")


def _copy(cache, tmp_path) -> Path:
    folder = tmp_path / "copy"
    folder.mkdir(parents=True)
    for f in cache.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def test_incomplete_cache_is_refused(cache, tmp_path):
    folder = _copy(cache, tmp_path)
    (folder / "index.json").unlink()
    with pytest.raises(ValueError, match="is not a complete latent cache"):
        source(folder)
    lc.write_json(folder / "index.json", {**json.loads((cache / "index.json").read_text()), "complete": False})
    with pytest.raises(ValueError, match="is not a complete latent cache"):
        source(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        source(tmp_path / "nowhere")


def test_missing_stats_unknown_dtype_and_wrong_shard_are_refused(cache, tmp_path):
    folder = _copy(cache, tmp_path)
    (folder / "stats.json").unlink()
    with pytest.raises(FileNotFoundError, match="stats.json is missing"):
        source(folder)
    lc.write_json(folder / "index.json", {**json.loads((cache / "index.json").read_text()), "dtype": "int8"})
    with pytest.raises(ValueError, match="dtype 'int8'"):
        source(folder)
    folder2 = _copy(cache, tmp_path / "b")
    np.save(folder2 / "shard_00001.npy", np.zeros((15, 2, T, C), np.float16))
    with pytest.raises(ValueError, match="shard_00001.npy holds float16"):
        source(folder2)


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "mmap length is greater than file size"),
    ("zero_header", "cannot be read"),
    ("truncate_labels", "cannot be read"),
])
def test_a_damaged_shard_file_is_named_with_the_fix(cache, tmp_path, damage, reason):
    folder = _copy(cache, tmp_path)
    name = "shard_00001.labels.npy" if damage == "truncate_labels" else "shard_00001.npy"
    data = (folder / name).read_bytes()
    data = bytes(128) + data[128:] if damage == "zero_header" else data[:len(data) // 2]
    (folder / name).write_bytes(data)
    with pytest.raises(ValueError) as err:
        lc.LatentCache(folder)
    message = str(err.value)
    assert f"latent cache file {folder / name} cannot be read" in message and reason in message
    assert f"delete {folder / name} and {folder / 'index.json'}, then run training/extract_latents.py" in message


def test_nan_latents_are_named_as_a_data_problem_with_their_shard(cache, tmp_path):
    folder = _copy(cache, tmp_path)
    shard = np.load(folder / "shard_00002.npy")
    shard[3, 0, 5, 1] = np.nan  # image 32 + 3, plain latent
    np.save(folder / "shard_00002.npy", shard)
    src = source(folder, batch=60, random_flip=False)
    with pytest.raises(ValueError, match=r"the latents of image 35 \(step 0\) in .*shard_00002.npy are NaN or inf: "
                                         r"the latent cache is damaged, not the training; delete"):
        src.batch(0)


def test_labels_beyond_the_generators_classes_name_the_fix(cache):
    with pytest.raises(ValueError, match=r"labels 0-9 but the generator has 4 classes; set --model.num_classes=10"):
        make_source(DataConfig(source="cache", path=str(cache), global_batch=12),
                    generator_config("SiT-tiny/1", grid=4, in_channels=C, num_classes=4), rank=0, world=1, device="cpu")


def test_batch_larger_than_the_cache(cache):
    with pytest.raises(ValueError, match="larger than the 60 images"):
        source(cache, batch=64)


@pytest.mark.slow
def test_train_gen_refuses_an_incomplete_cache_in_one_sentence(cache, tmp_path):
    folder = _copy(cache, tmp_path)
    (folder / "index.json").unlink()
    env = program_env()
    res = subprocess.run([sys.executable, str(ROOT / "training" / "train_gen.py"), "--data.source=cache",
                          f"--data.path={folder}", "--model.grid=4", "--model.in_channels=4", "--run.compile=false",
                          "--data.global_batch=12", f"--run.out_dir={tmp_path / 'run'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert "is not a complete latent cache" in last and "extract_latents.py" in last, res.stderr[-2000:]


@pytest.mark.gpu
def test_cuda_batches_come_through_pinned_memory(cache, arrays):
    data = DataConfig(source="cache", path=str(cache), global_batch=12)
    src = make_source(data, model_config(), rank=0, world=1, device="cuda")
    cpu = source(cache)
    x, y = src.batch(5)
    assert x.is_cuda and y.is_cuda
    torch.testing.assert_close(x.cpu(), cpu.batch(5)[0], rtol=0, atol=0)
    host, _ = src._host_batch(6)
    assert host.is_pinned()


@pytest.mark.slow
def test_train_gen_decodes_its_sample_grids_with_the_fae(cache, tmp_path):
    """--fae_decoder: the grid holds 64-px images decoded by the FAE (random FAE-tiny weights written as
    train_fae.py writes them), not 8-px-per-token latent pictures; without a cache it is refused."""
    torch.manual_seed(0)
    write_random_fae(tmp_path)
    env = program_env()
    common = [sys.executable, str(ROOT / "training" / "train_gen.py"), "--model.grid=4", "--model.in_channels=4",
              "--model.num_classes=10",
              "--run.compile=false", "--data.global_batch=12", "--run.steps=4", "--run.ckpt_every=0",
              "--sampler.steps=4", f"--fae_decoder={tmp_path / 'fae.safetensors'}"]
    res = subprocess.run([*common, "--data.source=cache", f"--data.path={cache}", f"--run.out_dir={tmp_path / 'run'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    grid = Image.open(tmp_path / "run" / "samples_final.png")
    assert grid.size == (8 * (64 + 2) + 2, 8 * (64 + 2) + 2)  # 8 x 8 images of 64 px, 2 px apart
    assert np.asarray(grid).std() > 0
    res = subprocess.run([*common, f"--run.out_dir={tmp_path / 'toy'}"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode != 0 and "only latents of a latent cache" in res.stderr.strip().splitlines()[-1]


def test_a_cache_source_without_a_path_names_the_option_and_the_program():
    with pytest.raises(ValueError, match="data.source=cache needs data.path: the --out folder of "
                                         "training/extract_latents.py"):
        make_source(DataConfig(source="cache", global_batch=4), generator_config("SiT-tiny/1"), rank=0, world=1,
                    device="cpu")
