"""Captioned data: the WebDataset shard reader (fae_fast/data/caption_shards.py) and the caption cache
(fae_fast/data/caption_cache.py, read by fae_fast/data/latent_cache.py).

The shards are written here with tarfile in img2dataset's layout: three shards of small JPEGs, captions and
.json files, with a key without a caption, a corrupt JPEG and an empty caption among them; damaged tars are
cut or replaced copies. The cache is written from the pairs those shards yield, random latents (a fixed table
per pair index) and the caption embeddings of a tiny random SigLIP 2 text tower (the one tests/test_text.py
uses). Everything stored is float16, so a read-back is compared with the float16 rounding of what was
given, bit for bit; the stats are float64 reductions in another order (1e-12 relative).
"""
import io
import json
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file


from fae_fast.config import (DataConfig, TextGeneratorConfig, TransportConfig, encoder_config, fae_config,
                             generator_config, recipe)
from fae_fast.data import latent_cache as lc
from fae_fast.data.backends import decode_reference
from fae_fast.data.caption_cache import TextBatch, TextCacheWriter, caption_lengths, write_text_cache
from fae_fast.data.caption_shards import CaptionShards, SkippedPairWarning, expand_braces, list_shards
from fae_fast.data.latents import make_source
from fae_fast.data.synthetic import jpeg_bytes, photo
from fae_fast.encoders import FrozenEncoder
from fae_fast.fae import FeatureAutoencoder
from fae_fast.families import family_of
from training import extract_latents
from conftest import program_env  # noqa: E402 (tests/ is on sys.path)
from test_extract_latents import check_stored_latents  # noqa: E402

CAPTIONS = ["a red circle", "the square is blue", "green square", "a yellow circle", "circle coloured purple",
            "the circle is white", "a black square", "orange circle", "the square is red", "  ", "a blue circle"]
ROOT = Path(__file__).resolve().parents[1]
SIZE, T, C, L, D = 32, 16, 4, 8, 32  # crops of 32 px; latents 4x4 tokens x 4 channels; captions 8 x 32
# shard -> keys in member order (shard 1 out of key order: member order is what counts)
LAYOUT = {"00000.tar": [0, 1, 2, 3], "00001.tar": [7, 4, 5, 6], "00002.tar": [8, 9, 10]}
NO_CAPTION, CORRUPT, EMPTY_CAPTION, NO_IMAGE = 2, 5, 9, 10  # keys
PAIR_KEYS = [0, 1, 3, 7, 4, 5, 6, 8, 9]  # the pairs in order: key 2 has no caption, key 10 no image
TINY = TextGeneratorConfig(depth=2, width=32, heads=2, in_channels=C, grid=4, num_classes=4, text_dim=D,
                           text_length=L, norm="rms", mlp="swiglu", rope=True, qk_norm=True)


def key(k: int) -> str:
    return f"{k:09d}"


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def pair_members(k: int, rng) -> list[tuple[str, bytes]]:
    image = jpeg_bytes(Image.fromarray(photo(40 + 4 * k, 48, rng)))
    members = [] if k == NO_IMAGE else [(f"{key(k)}.jpg", image[:len(image) // 2] if k == CORRUPT else image)]
    if k != NO_CAPTION:
        members.append((f"{key(k)}.txt", CAPTIONS[k].encode()))
    return members + [(f"{key(k)}.json", json.dumps({"key": key(k)}).encode())]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cc") / "shards"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in reversed(LAYOUT):  # written last-first: the reading order must not be the directory's
        write_tar(folder / name, [m for k in LAYOUT[name] for m in pair_members(k, rng)])
    return folder


@pytest.fixture(scope="module")
def pairs(shards) -> CaptionShards:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedPairWarning)
        return CaptionShards(str(shards), workers=2)


def member_bytes(shards: Path, shard: str, name: str) -> bytes:
    with tarfile.open(shards / shard) as tar:
        return tar.extractfile(name).read()


def shard_name(k: int) -> str:
    return next(name for name, keys in LAYOUT.items() if k in keys)


# ----------------------------------------------------------------------------------------------------
# The shard reader
# ----------------------------------------------------------------------------------------------------
def test_pairs_are_numbered_in_shard_then_member_order_and_a_key_without_caption_is_reported(shards):
    with pytest.warns(SkippedPairWarning) as record:
        reader = CaptionShards(str(shards), workers=2)
    assert [str(w.message) for w in record] == [
        f"skipped pair {key(NO_CAPTION)} of {shards / '00000.tar'}: no caption (.txt) (1 skipped so far)",
        f"skipped pair {key(NO_IMAGE)} of {shards / '00002.tar'}: no image (jpg/jpeg/png/webp) (2 skipped so far)"]
    assert [reader.key(i) for i in range(len(reader))] == [key(k) for k in PAIR_KEYS]
    assert [reader.shard(i).name for i in range(len(reader))] == [shard_name(k) for k in PAIR_KEYS]
    assert reader.skipped == {f"{shards / '00000.tar'}:{key(NO_CAPTION)}": "no caption (.txt)",
                              f"{shards / '00002.tar'}:{key(NO_IMAGE)}": "no image (jpg/jpeg/png/webp)"}
    for i, k in enumerate(PAIR_KEYS):  # the indexed spans hold the members' bytes
        image, caption = reader.read(i)
        assert image == member_bytes(shards, shard_name(k), f"{key(k)}.jpg")
        assert caption == CAPTIONS[k].encode()
    for spec in (f"{shards}/*.tar", f"{shards}/{{00000..00002}}.tar", f"{shards}/{{00000,00001,00002}}.tar"):
        with pytest.warns(SkippedPairWarning):
            again = CaptionShards(spec, workers=1)
        assert np.array_equal(again.keys, reader.keys) and np.array_equal(again.image_spans, reader.image_spans)


def test_ranks_take_whole_shards_disjoint_and_in_order(pairs):
    for world in (1, 2, 3, 4):
        parts = [pairs.for_rank(r, world) for r in range(world)]
        assert sorted(np.concatenate(parts).tolist()) == list(range(len(pairs)))
        for rank, part in enumerate(parts):
            assert (np.diff(part) > 0).all()
            assert {int(pairs.shard_of[i]) % world for i in part} <= {rank}
    assert pairs.for_rank(1, 2).tolist() == [3, 4, 5, 6]  # shard 1 alone: keys 7, 4, 5, 6


def test_batches_decode_with_the_reference_decoder_and_skip_unusable_pairs_reporting_each_once(shards):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedPairWarning)
        reader = CaptionShards(str(shards), workers=2)
    order = np.arange(len(reader))
    with pytest.warns(SkippedPairWarning) as record:
        batches = list(reader.batches(order, batch_size=4, image_size=SIZE, workers=2, ahead=1))
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert messages[0].startswith(f"skipped pair {key(CORRUPT)} of {shards / '00001.tar'}: the image does not decode")
    assert messages[1].startswith(f"skipped pair {key(EMPTY_CAPTION)} of {shards / '00002.tar'}: empty caption")
    assert [len(b.indices) + len(b.skipped) for b in batches] == [4, 4, 1]
    kept = np.concatenate([b.indices for b in batches])
    skipped = [PAIR_KEYS[i] for b in batches for i in b.skipped]
    assert skipped == [CORRUPT, EMPTY_CAPTION] and len(kept) == len(reader) - 2
    pixels = torch.cat([b.pixels for b in batches])
    assert pixels.shape == (len(kept), 3, SIZE, SIZE) and pixels.dtype == torch.uint8
    for row in (0, len(kept) - 1):  # the first and the last pair (a ViT forward each costs on CPU)
        k = PAIR_KEYS[kept[row]]
        expected = decode_reference(member_bytes(shards, shard_name(k), f"{key(k)}.jpg"), SIZE)
        assert torch.equal(pixels[row], torch.from_numpy(expected).permute(2, 0, 1))
    assert [c for b in batches for c in b.captions] == [CAPTIONS[PAIR_KEYS[i]] for i in kept]
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedPairWarning)  # a second epoch reports nothing again
        again = list(reader.batches(order, batch_size=4, image_size=SIZE, workers=1))
    assert np.array_equal(np.concatenate([b.indices for b in again]), kept) and len(reader.skipped) == 4


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("/d/{00008..00011}.tar") == [f"/d/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("/d/{8..10}.tar") == ["/d/8.tar", "/d/9.tar", "/d/10.tar"]
    with pytest.raises(ValueError, match="not a numeric range"):
        expand_braces("/d/{a..c}.tar")


def test_missing_shards_name_the_path_and_the_fix(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"caption shard folder {tmp_path / 'nowhere'} does not exist; pass "
                                                f"the output folder of img2dataset"):
        list_shards(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no .tar shards in {tmp_path / 'empty'}; pass the folder img2dataset "
                                                f"wrote with output_format=webdataset"):
        list_shards(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"2 of the 5 shards .* names do not exist \(first: .*00003.tar\); "
                                                r"fix the range"):
        list_shards(f"{shards}/{{00000..00004}}.tar")
    with pytest.raises(FileNotFoundError, match="no file matches"):
        list_shards(f"{tmp_path}/*.tar")
    with pytest.raises(ValueError, match="no caption shards given"):
        list_shards("")
    assert list_shards(str(shards / "00001.tar")) == [shards / "00001.tar"]


@pytest.mark.parametrize("damage", ["cut_in_a_header", "cut_in_an_image", "overwritten_header", "not_a_tar"])
def test_a_damaged_tar_is_named_with_the_fix(shards, tmp_path, damage):
    data = (shards / "00000.tar").read_bytes()
    with tarfile.open(shards / "00000.tar") as tar:
        second = tar.getmembers()[3]  # the header of key 1's image
    damaged = {"cut_in_a_header": data[:second.offset + 100],
               "cut_in_an_image": data[:second.offset_data + 50],
               "overwritten_header": data[:second.offset] + bytes([7] * 512) + data[second.offset + 512:],
               "not_a_tar": b"<html>503 Service Unavailable</html>"}[damage]
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "00000.tar").write_bytes(damaged)
    (folder / "00001.tar").write_bytes((shards / "00001.tar").read_bytes())
    with pytest.raises(ValueError, match=f"caption shard {folder / '00000.tar'} is damaged or not an uncompressed "
                                         f"tar .*; fetch it again, or leave it out of the shard list"):
        CaptionShards(str(folder), workers=1)


# ----------------------------------------------------------------------------------------------------
# The caption cache
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_encoder():
    pytest.importorskip("transformers")
    from fae_fast.data.toy_captions import toy_text_encoder

    return toy_text_encoder(D, L, seed=0)


def latent_table(num_pairs: int) -> np.ndarray:
    """(pairs, 2, T, C) float32 latents per pair index, channels of different scales and offsets."""
    rng = np.random.default_rng(1)
    return (rng.normal(size=(num_pairs, 2, T, C)) * [0.5, 1.0, 2.0, 3.0] + [1.0, -2.0, 0.0, 5.0]).astype(np.float32)


def text_batches(pairs: CaptionShards, text_encoder, indices, latents: np.ndarray, batch_size: int = 2):
    """What an extraction makes of the pairs: random latents, the captions' embeddings and lengths."""
    for b in pairs.batches(indices, batch_size=batch_size, image_size=SIZE, workers=1):
        text = text_encoder(b.captions).numpy() if b.captions else np.zeros((0, L, D), np.float32)
        yield TextBatch(b.indices, latents[b.indices], text, caption_lengths(text_encoder, b.captions), b.skipped)


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory, pairs, text_encoder):
    folder = tmp_path_factory.mktemp("text_cache")
    latents = latent_table(len(pairs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedPairWarning)
        write_text_cache(folder, text_batches(pairs, text_encoder, np.arange(len(pairs)), latents),
                         num_pairs=len(pairs), shard_size=4, tokens=T, channels=C, text_length=L, text_dim=D,
                         captions=pairs.spec)
    return folder


def test_caption_cache_round_trip_and_stats(text_cache, pairs, text_encoder):
    kept = [i for i, k in enumerate(PAIR_KEYS) if k not in (CORRUPT, EMPTY_CAPTION)]
    cache = lc.LatentCache(text_cache)
    assert cache.index["format"] == 2 and cache.index["condition"] == "text" and cache.num_images == len(kept)
    # planned for pairs 0-3, 4-7 and 8: key 5 (pair 5) does not decode, key 9 (pair 8) has an empty caption
    assert [(s["start"], s["count"]) for s in cache.index["shards"]] == [(0, 4), (4, 3), (7, 0)]
    assert cache.scalars["pairs"].tolist() == kept
    latents = latent_table(len(pairs))[kept].astype(np.float16)
    everything = np.arange(len(kept))
    assert np.array_equal(cache.gather(everything, np.zeros(len(kept), bool)), latents[:, 0])
    assert np.array_equal(cache.gather(everything[::-1], np.ones(len(kept), bool)), latents[::-1, 1])
    captions = [CAPTIONS[PAIR_KEYS[i]] for i in kept]
    assert np.array_equal(cache.text(everything), text_encoder(captions).numpy().astype(np.float16))
    assert cache.scalars["text_length"].tolist() == [len(c.split()) for c in captions]
    stats = json.loads((text_cache / "stats.json").read_text())
    flat = latents.astype(np.float64).reshape(-1, C)  # flips included
    np.testing.assert_allclose(stats["mean"], flat.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats["std"], flat.std(0), rtol=1e-12)
    assert stats["count"] == 2 * len(kept) * T and not list(text_cache.glob("*.tmp"))
    with pytest.raises(ValueError, match="holds caption embeddings, not class labels"):
        cache.labels


def test_a_resumed_caption_cache_redoes_only_the_removed_shard(text_cache, pairs, text_encoder, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for f in text_cache.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    before = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in folder.glob("shard_*")}
    index = (folder / "index.json").read_text()
    (folder / "shard_00001.npy").unlink()
    (folder / "index.json").unlink()
    settings = dict(num_pairs=len(pairs), shard_size=4, tokens=T, channels=C, text_length=L, text_dim=D,
                    captions=pairs.spec)
    assert [s.k for s in TextCacheWriter(folder, **settings).todo()] == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedPairWarning)
        write_text_cache(folder, text_batches(pairs, text_encoder, np.arange(len(pairs)), latent_table(len(pairs))),
                         **settings)
    after = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in folder.glob("shard_*")}
    assert after.keys() == before.keys() and (folder / "index.json").read_text() == index
    rewritten = {name for name in after if after[name][1] != before[name][1]}
    assert rewritten == {f"shard_00001.{part}npy" for part in ("", "text.", "text_length.", "pairs.")}
    assert all(after[name][0] == before[name][0] for name in after)
    with pytest.raises(ValueError, match="extracted with shard_size=4, this run has 3"):
        write_text_cache(folder, [], **{**settings, "shard_size": 3})


def test_batches_that_leave_pairs_out_are_refused(tmp_path):
    writer = lc.ShardWriter(tmp_path, lc.Shard(0, 0, 4), T, C, lc.text_condition(L, D))
    rows = np.array([0, 1])
    writer.write(rows, np.zeros((2, 2, T, C), np.float16), text=np.zeros((2, L, D), np.float16),
                 text_length=np.ones(2, np.int32), pairs=rows)
    writer.skip(np.array([3]))
    with pytest.raises(RuntimeError, match="shard 0 got no latent for pairs 2 "):
        writer.finish()
    with pytest.raises(ValueError, match="a labels cache holds every image"):
        lc.ShardWriter(tmp_path, lc.Shard(1, 4, 4), T, C).skip(np.array([5]))
    with pytest.raises(ValueError, match=r"the batches never reached shard 1 \(pairs 4-7\)"):
        write_text_cache(tmp_path / "short", [TextBatch(np.arange(4), np.zeros((4, 2, T, C)), np.zeros((4, L, D)),
                                                        np.ones(4))], num_pairs=8, shard_size=4, tokens=T,
                         channels=C, text_length=L, text_dim=D)


def test_a_class_cache_keeps_format_1(tmp_path):
    rng = np.random.default_rng(0)
    lc.write_cache(tmp_path, rng.normal(size=(6, 2, T, C)).astype(np.float16), rng.integers(0, 4, 6), shard_size=4)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["format"] == 1 and "condition" not in index
    assert [list(s) for s in index["shards"]] == [["file", "labels", "start", "count"]] * 2
    with pytest.raises(ValueError, match="holds class labels, not caption embeddings"):
        lc.LatentCache(tmp_path).text(np.arange(2))
    with pytest.raises(ValueError, match="holds class labels, but the generator is conditioned on captions"):
        make_source(DataConfig(source="cache", path=str(tmp_path), global_batch=2), TINY, rank=0, world=1, device="cpu")
    lc.write_json(tmp_path / "index.json", {**index, "format": 2})
    with pytest.raises(ValueError, match=r"has cache format 2 for condition 'labels', this code reads formats "
                                         r"1 \(labels\), 2 \(text\)"):
        lc.LatentCache(tmp_path)


# ----------------------------------------------------------------------------------------------------
# Training on it
# ----------------------------------------------------------------------------------------------------
def test_the_cache_source_gives_caption_embeddings_a_text_generator_trains_on(text_cache):
    data = DataConfig(source="cache", path=str(text_cache), global_batch=4)
    source = make_source(data, TINY, rank=1, world=2, device="cpu")
    x, text = source.batch(3)
    images, flips = source.indices(3)
    cache = source.cache
    assert x.shape == (2, T, C) and x.dtype == torch.float32
    assert text.shape == (2, L, D) and text.dtype == torch.float32
    assert torch.equal(text, torch.from_numpy(cache.text(images)).float())
    raw = torch.from_numpy(cache.gather(images, flips)).float()
    torch.testing.assert_close(x, (raw - source.mean) / source.std, rtol=0, atol=0)
    family = family_of(TINY)
    torch.manual_seed(0)
    model = family.build(TINY, impl="torch")
    out = model(x, torch.rand(2), text)
    assert out.shape == x.shape and torch.isfinite(out).all()
    loss = family.loss(model, x, text, TransportConfig(), torch.Generator().manual_seed(0))
    assert loss.shape == (2,) and torch.isfinite(loss).all()


def test_training_on_a_caption_cache_draws_its_sample_grids_from_the_cached_captions(text_cache, tmp_path):
    """train_gen.py with a text model on a caption cache: the grids' conditions are the cache's first pairs'
    embeddings, in order, and a short run writes its sample grids (the toy caption set is not needed)."""
    from training import train_gen

    cfg = recipe("t2i-demo")
    cfg.data.source, cfg.data.path = "cache", str(text_cache)
    cache = lc.LatentCache(text_cache)
    got = train_gen.conditions_of(cfg, torch.zeros(cache.num_images + 2, dtype=torch.long),
                                  torch.arange(cache.num_images + 2))
    want = torch.from_numpy(cache.text(np.arange(cache.num_images)).astype(np.float32))
    assert torch.equal(got[:cache.num_images], want) and torch.equal(got[cache.num_images:], want[:2])
    run = subprocess.run([sys.executable, str(ROOT / "training" / "train_gen.py"), "--recipe", "t2i-demo",
                          "--data.source=cache", f"--data.path={text_cache}", "--data.global_batch=4",
                          "--run.steps=4", "--run.sample_every=2", "--run.log_every=2", f"--run.out_dir={tmp_path}"],
                         capture_output=True, text=True, env=program_env(), timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert {p.name for p in tmp_path.glob("samples_*.png")} == {"samples_00000002.png", "samples_00000004.png",
                                                                 "samples_final.png"}


def test_a_resumed_text_run_on_a_caption_cache_matches_an_uninterrupted_one(text_cache, tmp_path):
    """A text model trained 8 steps straight, and 4 steps then resumed from the step-4 checkpoint to 8:
    the same losses at every logged step (the condition dropout and noise are drawn per step)."""
    def train(out: Path, steps: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "training" / "train_gen.py"), "--recipe", "t2i-demo",
                               "--data.source=cache", f"--data.path={text_cache}", "--data.global_batch=4",
                               f"--run.steps={steps}", "--run.ckpt_every=4", "--run.log_every=2",
                               "--run.sample_every=0", "--run.eval_every=0", "--run.eval_samples=0",
                               f"--run.out_dir={out}"], capture_output=True, text=True, env=program_env(),
                              timeout=600)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for out, steps in ((straight, 8), (resumed, 4), (resumed, 8)):
        run = train(out, steps)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "resumed from" in run.stdout
    a, b = ({step: entry["loss"] for step, entry in json.loads((out / "history.json").read_text())}
            for out in (straight, resumed))
    assert set(a) == set(b) == {2, 4, 6, 8}
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6), (step, a[step], b[step])
    assert len(set(a.values())) == 4  # the losses move, so equal ones mean something


def test_a_cache_that_does_not_fit_the_model_names_the_fix(text_cache):
    data = DataConfig(source="cache", path=str(text_cache), global_batch=4)
    with pytest.raises(ValueError, match="holds caption embeddings, which only a text-conditioned generator takes"):
        make_source(data, generator_config("SiT-tiny/1", grid=4, in_channels=C), rank=0, world=1, device="cpu")
    wide = TextGeneratorConfig(**{**TINY.__dict__, "text_dim": 64})
    with pytest.raises(ValueError, match=r"captions of 8 tokens x 32 channels but the generator expects 8 x 64; set "
                                         r"--model.text_length=8 --model.text_dim=32"):
        make_source(data, wide, rank=0, world=1, device="cpu")


# ----------------------------------------------------------------------------------------------------
# The extraction program
# ----------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("in_process_group")
def test_extract_latents_writes_a_caption_cache_from_the_shards(shards, text_encoder, tmp_path):
    """--captions: FAE-tiny latents (64 px crops) of every usable pair equal to a direct computation (up to
    float16 storage: rtol 2^-10, atol 1e-5 as in test_extract_latents.py), the captions' embeddings equal
    the text tower's, the skipped pairs left out; a second run finds the cache complete."""
    text_encoder.tokenizer.save_pretrained(tmp_path / "text")
    text_encoder.tower.save_pretrained(tmp_path / "text")
    torch.manual_seed(0)
    encoder, pair = FrozenEncoder(encoder_config("tiny")), FeatureAutoencoder(fae_config("FAE-tiny"), "torch")
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, str(tmp_path / "encoder.safetensors"))
    save_file(pair.state_dict(), str(tmp_path / "fae.safetensors"))
    args = ["--captions", str(shards), "--text_tower", str(tmp_path / "text"), "--text_length", str(L),
            "--encoder", "tiny", f"--encoder.weights_path={tmp_path / 'encoder.safetensors'}",
            "--fae", str(tmp_path / "fae.safetensors"), "--batch", "4", "--shard-size", "4", "--workers", "1",
            "--out", str(tmp_path / "cache")]
    with pytest.warns(SkippedPairWarning):
        assert extract_latents.main(args)
    cache = lc.LatentCache(tmp_path / "cache")
    kept = [i for i, k in enumerate(PAIR_KEYS) if k not in (CORRUPT, EMPTY_CAPTION)]
    assert cache.scalars["pairs"].tolist() == kept and cache.index["text_tower"] == str(tmp_path / "text")
    for row in (0, len(kept) - 1):  # the first and the last pair (a ViT forward each costs on CPU)
        k = PAIR_KEYS[kept[row]]
        image = tmp_path / f"{key(k)}.jpg"
        image.write_bytes(member_bytes(shards, shard_name(k), f"{key(k)}.jpg"))
        stored = torch.from_numpy(cache.gather(np.array([row, row]), np.array([False, True]))).float()
        check_stored_latents(stored, encoder, pair.encoder.eval(), image, f"pair {k}")
    captions = [CAPTIONS[PAIR_KEYS[i]] for i in kept]
    want = text_encoder(captions).numpy().astype(np.float16)
    if torch.cuda.is_available():  # the tower ran on the GPU: fp32 there and here agree to float16 storage
        np.testing.assert_allclose(cache.text(np.arange(len(kept))), want, rtol=2**-10, atol=1e-5)
    else:
        assert np.array_equal(cache.text(np.arange(len(kept))), want)
    with pytest.warns(SkippedPairWarning):  # the listing reports again; nothing is extracted
        assert extract_latents.main(args)
