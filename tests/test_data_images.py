"""Image loaders (fae_fast.data.images): ADM crops, odd files, the check tool, backends agreeing with PIL,
skip/stop, sharding, resuming and flips, on a generated ImageNet-layout folder.

Tolerances, in 8-bit levels of the 256 crop, against the PIL reference (ADM's center_crop_arr):
- torch resampling of the same decoded pixels (the torchvision path's crop): at most 1 level, from
  float rounding where PIL works in 22-bit fixed point; on the CPU torchvision decodes with
  libjpeg-turbo like PIL, so the whole path is held to that.
- DALI's CPU pipeline: its libjpeg-turbo decode equals PIL's, its resampling does not: it rounds once
  per resize where PIL rounds after each pass, and its cubic weights are not PIL's fixed-point ones.
  Mean below 1 level, no pixel more than 4 levels off (measured: mean 0.18-0.5, max 3 at an upscale).
- GPU decoders (nvJPEG) differ from libjpeg-turbo in IDCT and chroma upsampling, and neither DALI nor
  torchvision promises bit-exactness with libjpeg. So the GPU path is checked in two parts: our crop
  of the pixels nvJPEG decoded is held to the CPU bound against PIL's crop of those same pixels, and
  the decoder itself only to a gross-error guard against libjpeg (mean below 4 levels: a swapped
  channel, a wrong colour matrix or a misplaced image is tens of levels off). Seen on an H100: the
  small upscaled file (odd_small, 4:2:0 chroma at its strongest edges) ends 1.9 levels off on
  average; photo-sized files well under 1.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fae_fast.data import check
from fae_fast.data.backends import AcceleratedBackend, TorchvisionDecoder, decode_reference
from fae_fast.data.dali import unavailable as dali_unavailable
from fae_fast.data.decode import adm_crop_pil, adm_crop_torch, adm_plan, sniff
from fae_fast.data.images import (BadImageError, BadImageWarning, ImageDataConfig, ImageList, finish_batch,
                                  list_images, make_image_loader, pick_backend)
from fae_fast.data.synthetic import photo, write_imagenet_like, write_odd_files

LEVEL = 1 / 255
DALI_MISSING = dali_unavailable()
needs_dali = pytest.mark.skipif(DALI_MISSING is not None, reason=f"nvidia-dali does not import here: {DALI_MISSING}")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """root/train with 3 classes x 4 photos (500x375 and friends); class 1 also holds the odd files."""
    root = str(tmp_path_factory.mktemp("imagenet"))
    write_imagenet_like(root, classes=3, per_class=4)
    odd = write_odd_files(os.path.join(root, "train", "n00000001"))
    return root, odd


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _reference(path, size=256):
    """The expected crop of a file as (3, S, S) float in [0, 1]."""
    return torch.from_numpy(decode_reference(_read(path), size)).permute(2, 0, 1).float() / 255


def _run(root, **kw):
    """All batches of one epoch of a loader on the CPU, concatenated, plus the loader."""
    cfg = ImageDataConfig(root=root, **({"batch_size": 4, "workers": 0, "shuffle": False} | kw))
    loader = make_image_loader(cfg)
    batches = list(loader)
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}, loader


def _adm_center_crop_arr(pil_image, image_size):
    """ADM's center_crop_arr (guided-diffusion/image_datasets.py), verbatim but for the name."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


SHAPES = [(375, 500), (500, 333), (120, 180), (256, 256), (511, 700), (1100, 800), (1023, 1025)]


# ----------------------------------------------------------------------------------------------------
# The crop itself
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w", SHAPES)
def test_pil_crop_is_adms(h, w):
    image = Image.fromarray(np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8))
    np.testing.assert_array_equal(adm_crop_pil(image, 256), _adm_center_crop_arr(image, 256))


@pytest.mark.parametrize("h,w", SHAPES)
def test_torch_crop_matches_pil(h, w):
    """Uniform noise is the hardest input for resampling; still at most one level off, and rarely."""
    pixels = np.random.default_rng(h + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    ref = adm_crop_pil(Image.fromarray(pixels), 256).astype(int)
    out = adm_crop_torch(torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous(), 256)
    diff = np.abs(out[0].permute(1, 2, 0).numpy().astype(int) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_plan_halves_until_under_twice_the_target():
    plan = adm_plan(2100, 1100, 256)
    assert plan.halvings == ((1050, 550), (525, 275))
    assert plan.resized == (489, 256) and plan.top_left == (116, 0)
    assert adm_plan(375, 500, 256).halvings == ()


def test_sniff_sees_kind_size_components_and_truncation(imagenet):
    _, odd = imagenet
    s = {k: sniff(_read(p)) for k, p in odd.items()}
    assert (s["gray"].kind, s["gray"].channels, s["gray"].height, s["gray"].width) == ("jpeg", 1, 375, 500)
    assert (s["cmyk"].channels, s["png"].kind, s["png"].height, s["png"].width) == (4, "png", 500, 375)
    assert s["large"].plain_jpeg and s["gray"].plain_jpeg
    assert not s["cmyk"].plain_jpeg and not s["png"].plain_jpeg
    assert not s["truncated"].complete and not s["truncated"].plain_jpeg


# ----------------------------------------------------------------------------------------------------
# The check tool
# ----------------------------------------------------------------------------------------------------
def test_check_tool_lists_exactly_the_truncated_file(imagenet, tmp_path, capsys):
    root, odd = imagenet
    out = tmp_path / "problems.txt"
    assert check.main([root, "--out", str(out), "--workers", "2"]) == 0
    rows = [line.split("\t") for line in out.read_text().splitlines() if not line.startswith("#")]
    assert [r[0] for r in rows] == [odd["truncated"]]
    assert "truncated" in rows[0][1]
    printed = capsys.readouterr().out
    assert "scanned 18 files" in printed and "1 jpeg cmyk" in printed and "1 jpeg gray" in printed
    assert "1 png" in printed and "1 cannot be decoded" in printed


def test_check_tool_reasons_name_no_buffer_and_a_bad_out_folder_fails_first(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "not_an_image.JPEG").write_bytes(b"plain text, not an image")
    out = tmp_path / "problems.txt"
    assert check.main([str(folder), "--out", str(out), "--workers", "1"]) == 0
    reason = out.read_text().splitlines()[1].split("\t")[1]
    assert "BytesIO" not in reason and "cannot identify image file the file" in reason
    with pytest.raises(SystemExit):
        check.main([str(folder), "--out", str(tmp_path / "missing" / "problems.txt"), "--workers", "1"])
    assert "its folder does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Loaders agree with the reference
# ----------------------------------------------------------------------------------------------------
def _by_index(out):
    return {int(i): k for k, i in enumerate(out["indices"])}


def _expect_reference(out, images: ImageList, *, mean_levels, max_levels):
    for i, k in _by_index(out).items():
        diff = (out["pixels"][k] - _reference(images.path(i))).abs()
        assert diff.mean() < mean_levels * LEVEL and diff.max() <= max_levels * LEVEL + 1e-6, images.path(i)


def test_pil_loader_decodes_odd_files_to_the_reference(imagenet):
    root, odd = imagenet
    with pytest.warns(BadImageWarning, match="odd_truncated.JPEG"):
        out, loader = _run(root, backend="pil", workers=2)
    images = loader.images
    assert loader.backend.name == "pil" and list(loader.skipped) == [odd["truncated"]]
    assert out["pixels"].shape == (17, 3, 256, 256) and out["pixels"].dtype == torch.float32
    assert out["encoder_pixels"].shape == (17, 3, 224, 224)
    _expect_reference(out, images, mean_levels=1e-9, max_levels=0)
    gray = _by_index(out)[[images.path(i) for i in range(len(images))].index(odd["gray"])]
    assert torch.equal(out["pixels"][gray][0], out["pixels"][gray][1])  # gray -> equal R, G, B
    assert out["labels"].tolist() == images.labels[out["indices"].numpy()].tolist()


def test_encoder_pixels_are_the_crop_resized_like_pil(imagenet):
    root, _ = imagenet
    out, loader = _run(root, backend="pil", exclude_list="", on_error="skip", batch_size=8)
    for i, k in list(_by_index(out).items())[:6]:
        crop = decode_reference(_read(loader.images.path(i)), 256)
        ref = np.asarray(Image.fromarray(crop).resize((224, 224), Image.BICUBIC)).astype(np.float32) / 255
        got = out["encoder_pixels"][k].permute(1, 2, 0).numpy()
        # PIL rounds to 8 bits after each pass, we stay in float: the first rounding (0.5 level) passes
        # through the second pass's weights (sum of |w| < 2 for bicubic), the second adds 0.5
        diff = np.abs(got - ref)
        assert diff.mean() < 0.5 * LEVEL and diff.max() <= 1.5 * LEVEL


def test_torchvision_path_matches_pil_on_cpu(imagenet):
    root, odd = imagenet
    with pytest.warns(BadImageWarning, match="odd_truncated.JPEG"):
        out, loader = _run(root, backend="torchvision_gpu")
    assert loader.backend.name == "torchvision_gpu" and len(out["indices"]) == 17
    _expect_reference(out, loader.images, mean_levels=0.01, max_levels=1)


@needs_dali
def test_dali_cpu_decoder_matches_pil(imagenet):
    """The DALI pipeline itself (not the PIL fallback) on every file it accepts."""
    from fae_fast.data.dali import DaliDecoder

    root, _ = imagenet
    decoder = DaliDecoder(size=256, batch_size=32, threads=2, device=torch.device("cpu"))
    images = list_images(ImageDataConfig(root=root))
    datas = [np.fromfile(images.path(i), np.uint8) for i in range(len(images))]
    taken = [i for i, d in enumerate(datas) if decoder.accepts(sniff(d))]
    assert len(taken) == 15  # all but CMYK, PNG and truncated
    out = decoder.decode([datas[i] for i in taken], [sniff(datas[i]) for i in taken]).float() / 255
    for k, i in enumerate(taken):
        diff = (out[k] - _reference(images.path(i))).abs()
        assert diff.mean() < LEVEL and diff.max() <= 4 * LEVEL + 1e-6, images.path(i)


@needs_dali
def test_dali_cpu_loader_matches_pil(imagenet):
    root, odd = imagenet
    with pytest.warns(BadImageWarning, match="odd_truncated.JPEG"):
        out, loader = _run(root, backend="dali", workers=2)
    assert loader.backend.name == "dali" and len(out["indices"]) == 17
    _expect_reference(out, loader.images, mean_levels=1, max_levels=4)


class _Counting:
    """Wraps a decoder, counting its batch calls."""

    def __init__(self, decoder):
        self.inner, self.calls, self.name = decoder, [], decoder.name

    def accepts(self, s):
        return self.inner.accepts(s)

    def decode(self, datas, sniffs):
        self.calls.append(len(datas))
        return self.inner.decode(datas, sniffs)

    def reset(self):
        self.inner.reset()


def _decoders():
    yield pytest.param(lambda: TorchvisionDecoder(size=256, device=torch.device("cpu")), id="torchvision")
    yield pytest.param(lambda: __import__("fae_fast.data.dali", fromlist=["DaliDecoder"]).DaliDecoder(
        size=256, batch_size=8, threads=2, device=torch.device("cpu")), id="dali", marks=needs_dali)


@pytest.mark.parametrize("make_decoder", _decoders())
def test_failed_batch_is_retried_file_by_file(tmp_path, make_decoder):
    """A JPEG of headers only looks plain to the sniffer, so it reaches the fast decoder and fails its
    batch: the others must still come out, decoded by the fast decoder, and the bad one be named."""
    root = str(tmp_path)
    paths = write_imagenet_like(root, classes=1, per_class=3)
    whole = _read(paths[1])
    with open(paths[1], "wb") as f:
        f.write(whole[:whole.find(b"\xff\xda")] + b"\xff\xd9")
    images = list_images(ImageDataConfig(root=root))
    decoder = _Counting(make_decoder())
    backend = AcceleratedBackend(images, decoder, size=256, workers=2, device=torch.device("cpu"))
    (raw,) = list(backend.batches([np.arange(3)]))
    assert decoder.calls == [3, 1, 1, 1]  # the batch, then each file alone
    assert raw.indices.tolist() == [0, 2] and [i for i, _ in raw.failures] == [1]
    for k, i in enumerate(raw.indices):
        diff = (raw.pixels[k].float() / 255 - _reference(images.path(i))).abs()
        assert diff.mean() < LEVEL


# ----------------------------------------------------------------------------------------------------
# Bad files: skip, stop, exclude
# ----------------------------------------------------------------------------------------------------
def test_stop_names_the_bad_file(imagenet):
    root, odd = imagenet
    with pytest.raises(BadImageError, match="odd_truncated.JPEG"):
        _run(root, backend="pil", on_error="stop")


def test_skip_counts_and_loses_nothing_else(imagenet):
    root, odd = imagenet
    with pytest.warns(BadImageWarning, match="odd_truncated.JPEG"):
        out, loader = _run(root, backend="pil")
    bad = [loader.images.path(i) for i in range(len(loader.images))].index(odd["truncated"])
    assert sorted(out["indices"].tolist()) == [i for i in range(18) if i != bad]
    assert list(loader.skipped) == [odd["truncated"]] and "truncated" in loader.skipped[odd["truncated"]]


def test_exclude_list_from_the_check_tool_skips_up_front(imagenet, tmp_path, recwarn):
    root, odd = imagenet
    problems = tmp_path / "problems.txt"
    check.main([root, "--out", str(problems), "--workers", "1"])
    out, loader = _run(root, backend="pil", exclude_list=str(problems), on_error="stop")
    assert loader.num_images == 17 and len(out["indices"]) == 17 and not loader.skipped
    assert not [w for w in recwarn if issubclass(w.category, BadImageWarning)]


# ----------------------------------------------------------------------------------------------------
# Order: sharding, epochs, resuming
# ----------------------------------------------------------------------------------------------------
def _indices(loader, batches=None):
    got = []
    for j, b in enumerate(loader):
        got.append(b["indices"].tolist())
        if batches is not None and j + 1 == batches:
            break
    return got


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """16 readable photos, 4 classes."""
    root = str(tmp_path_factory.mktemp("clean"))
    write_imagenet_like(root, classes=4, per_class=4)
    return root


def _rank_loader(root, rank, world, **kw):
    cfg = ImageDataConfig(root=root, **({"batch_size": 2, "workers": 0, "backend": "pil"} | kw))
    return make_image_loader(cfg, rank=rank, world=world)


@pytest.mark.parametrize("shuffle", [True, False])
def test_two_ranks_are_disjoint_and_cover_the_epoch(clean, shuffle):
    ranks = [sum(_indices(_rank_loader(clean, r, 2, shuffle=shuffle)), []) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == list(range(16))
    if shuffle:
        assert len(ranks[0]) == len(ranks[1]) == 8 and ranks[0] != sorted(ranks[0])


def test_uneven_split_drops_the_remainder_when_shuffling(clean):
    ranks = [sum(_indices(_rank_loader(clean, r, 3, batch_size=2)), []) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4] and len(set(sum(ranks, []))) == 12
    loader = _rank_loader(clean, 0, 3, shuffle=False, batch_size=2)
    assert sum(_indices(loader), []) == list(range(0, 16, 3)) and len(loader) == 3


def test_every_epoch_is_a_new_seeded_permutation(clean):
    loader = _rank_loader(clean, 0, 1, batch_size=4)
    e0, e1 = sum(_indices(loader), []), sum(_indices(loader), [])
    assert sorted(e0) == sorted(e1) == list(range(16)) and e0 != e1 and loader.epoch == 2
    again = _rank_loader(clean, 0, 1, batch_size=4)
    assert sum(_indices(again), []) == e0
    assert sum(_indices(_rank_loader(clean, 0, 1, batch_size=4, seed=1)), []) != e0


def test_resume_continues_exactly(clean):
    whole = _indices(_rank_loader(clean, 0, 1, batch_size=3))
    first = _rank_loader(clean, 0, 1, batch_size=3)
    head = _indices(first, batches=2)
    state = first.state_dict()
    assert state["epoch"] == 0 and state["offset"] == 6
    resumed = _rank_loader(clean, 0, 1, batch_size=3)
    resumed.load_state_dict(state)
    assert head + _indices(resumed) == whole and resumed.epoch == 1 and resumed.offset == 0


def test_resume_on_another_number_of_ranks_sees_each_image_once(clean):
    first = [_rank_loader(clean, r, 2, batch_size=2) for r in range(2)]
    seen = sum((sum(_indices(l, batches=2), []) for l in first), [])
    state = first[0].state_dict()
    assert state == first[1].state_dict() and state["offset"] == 8
    rest = _rank_loader(clean, 0, 1, batch_size=2)
    rest.load_state_dict(state)
    assert sorted(seen + sum(_indices(rest), [])) == list(range(16))


def test_resume_refuses_other_data(clean, imagenet):
    state = _rank_loader(clean, 0, 1).state_dict()
    with pytest.raises(ValueError, match="saved for 16 files"):
        _rank_loader(imagenet[0], 0, 1).load_state_dict(state)


# ----------------------------------------------------------------------------------------------------
# Flips
# ----------------------------------------------------------------------------------------------------
def test_random_flip_mirrors_both_outputs_and_is_seeded(clean):
    plain, _ = _run(clean, backend="pil")
    flipped, _ = _run(clean, backend="pil", random_flip=True)
    again, _ = _run(clean, backend="pil", random_flip=True)
    f = flipped["flipped"]
    assert 0 < f.sum() < 16 and torch.equal(f, again["flipped"])
    mirror = {k: torch.where(f[:, None, None, None], plain[k].flip(-1), plain[k]) for k in plain}
    assert torch.equal(flipped["pixels"], mirror["pixels"])
    # resizing commutes with the flip up to float32 summation order
    torch.testing.assert_close(flipped["encoder_pixels"], mirror["encoder_pixels"], rtol=0, atol=1e-5)


def test_flip_twins_returns_every_image_both_ways(clean):
    out, loader = _run(clean, backend="pil", flip_twins=True, batch_size=4)
    batch = next(iter(make_image_loader(loader.cfg)))
    B = 4
    assert batch["pixels"].shape[0] == 2 * B and batch["flipped"].tolist() == [False] * B + [True] * B
    assert torch.equal(batch["indices"][:B], batch["indices"][B:])
    assert torch.equal(batch["pixels"][B:], batch["pixels"][:B].flip(-1))
    torch.testing.assert_close(batch["encoder_pixels"][B:], batch["encoder_pixels"][:B].flip(-1), rtol=0, atol=1e-5)
    assert sorted(out["indices"].tolist()) == sorted(list(range(16)) * 2)


def test_finish_batch_shapes():
    pixels = torch.randint(0, 256, (3, 3, 256, 256), dtype=torch.uint8)
    z = torch.zeros(3, dtype=torch.int64)
    out = finish_batch(pixels, z, z, torch.tensor([True, False, True]), encoder_size=224, twins=False)
    assert out["encoder_pixels"].shape == (3, 3, 224, 224)
    assert 0 <= out["encoder_pixels"].min() and out["encoder_pixels"].max() <= 1
    torch.testing.assert_close(out["pixels"][1], pixels[1].float() / 255)
    torch.testing.assert_close(out["pixels"][0], pixels[0].flip(-1).float() / 255)


# ----------------------------------------------------------------------------------------------------
# Listing, config, backend choice
# ----------------------------------------------------------------------------------------------------
def test_flat_val_folder_with_kaggle_labels(clean, tmp_path):
    root = str(tmp_path)
    for wnid in ("n00000000", "n00000001"):
        os.makedirs(os.path.join(root, "train", wnid))
    os.makedirs(os.path.join(root, "val"))
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(photo(300, 400, rng)).save(os.path.join(root, "val", f"ILSVRC2012_val_{k:08d}.JPEG"))
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000002,n00000000 1 2 3 4\n"
        "ILSVRC2012_val_00000000,n00000001 1 2 3 4\nILSVRC2012_val_00000001,n00000000 5 6 7 8\n")
    images = list_images(ImageDataConfig(root=root, split="val", val_labels=str(tmp_path / "LOC_val_solution.csv")))
    assert [p.decode() for p in images.paths][0] == "val/ILSVRC2012_val_00000000.JPEG"
    assert images.labels.tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="val_labels"):
        list_images(ImageDataConfig(root=root, split="val"))


def test_file_list_is_sorted_and_labelled(clean, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("train/n00000003/n00000003_1.JPEG 7\ntrain/n00000000/n00000000_2.JPEG 5\n")
    images = list_images(ImageDataConfig(root=clean, file_list=str(listing)))
    assert [p.decode() for p in images.paths] == ["train/n00000000/n00000000_2.JPEG",
                                                  "train/n00000003/n00000003_1.JPEG"]
    assert images.labels.tolist() == [5, 7]


def test_missing_root_and_bad_values_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(ImageDataConfig(root=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="backend='jpeg'"):
        make_image_loader(ImageDataConfig(root=str(tmp_path), backend="jpeg"))
    with pytest.raises(ValueError, match="flip_twins"):
        make_image_loader(ImageDataConfig(root=str(tmp_path), random_flip=True, flip_twins=True))


def test_auto_picks_pil_without_cuda():
    assert pick_backend("auto", torch.device("cpu")) == "pil"
    assert pick_backend("dali", torch.device("cpu")) == "dali"


def test_auto_takes_torchvision_on_cuda_and_missing_dali_is_an_error_when_asked_for(monkeypatch):
    from fae_fast.data import dali

    monkeypatch.setattr(dali, "unavailable", lambda: "ModuleNotFoundError: No module named 'nvidia'")
    assert pick_backend("auto", torch.device("cuda", 0)) == "torchvision_gpu"
    assert pick_backend("dali", torch.device("cuda", 0)) == "dali"
    with pytest.raises(ImportError, match="pip install nvidia-dali-cuda130"):
        dali.DaliDecoder(size=256, batch_size=4, threads=1, device=torch.device("cpu"))


def test_package_imports_and_loads_without_dali(clean):
    code = ("import sys; sys.modules['nvidia'] = None\n"
            "from fae_fast.data import images, backends, check, dali\n"
            "assert dali.unavailable() is not None\n"
            f"cfg = images.ImageDataConfig(root={clean!r}, batch_size=16, workers=0)\n"
            "assert len(next(iter(images.make_image_loader(cfg)))['indices']) == 16\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_breaking_out_of_an_epoch_keeps_the_position(clean):
    loader = _rank_loader(clean, 0, 1, batch_size=4, workers=2)
    assert len(_indices(loader, batches=1)) == 1 and loader.state_dict()["offset"] == 4
    assert len(_indices(loader)) == 3 and loader.epoch == 1


# ----------------------------------------------------------------------------------------------------
# GPU decoders (the lent GPU machine)
# ----------------------------------------------------------------------------------------------------
def _gpu_run(root, backend):
    cfg = ImageDataConfig(root=root, batch_size=8, workers=2, shuffle=False, backend=backend)
    loader = make_image_loader(cfg, device="cuda")
    with pytest.warns(BadImageWarning, match="odd_truncated.JPEG"):
        batches = list(loader)
    return {k: torch.cat([b[k] for b in batches]).cpu() for k in batches[0]}, loader


@pytest.mark.gpu
def test_torchvision_gpu_crop_matches_pil_on_the_same_decoded_pixels(imagenet, monkeypatch):
    """Our part of the GPU path: the crop of whatever nvJPEG decoded, against PIL's crop of it."""
    from fae_fast.data import backends

    seen = []

    def recording_crop(images, size, **kw):
        out = crop_decoded(images, size, **kw)
        seen.extend(zip([im.cpu() for im in images], out.cpu()))
        return out

    crop_decoded = backends.crop_decoded
    monkeypatch.setattr(backends, "crop_decoded", recording_crop)
    root, _ = imagenet
    _gpu_run(root, "torchvision_gpu")
    assert len(seen) >= 12  # the photos and the plain-JPEG odd files; the rest fall back to PIL
    for decoded, got in seen:
        ref = adm_crop_pil(Image.fromarray(decoded.permute(1, 2, 0).numpy()), 256)
        diff = (got.permute(1, 2, 0).int() - torch.from_numpy(ref).int()).abs().float()
        assert diff.mean() < 0.01 and diff.max() <= 1, tuple(decoded.shape)


@pytest.mark.gpu
def test_torchvision_gpu_matches_pil(imagenet):
    """End to end, the decoder included: the gross-error guard of the module docstring."""
    root, _ = imagenet
    out, loader = _gpu_run(root, "torchvision_gpu")
    assert len(out["indices"]) == 17
    _expect_reference(out, loader.images, mean_levels=4, max_levels=255)


@pytest.mark.gpu
@needs_dali
def test_dali_gpu_matches_pil(imagenet):
    root, _ = imagenet
    out, loader = _gpu_run(root, "dali")
    assert len(out["indices"]) == 17
    _expect_reference(out, loader.images, mean_levels=4, max_levels=255)


@pytest.mark.gpu
def test_pil_backend_on_gpu_is_exact(imagenet):
    root, _ = imagenet
    out, loader = _gpu_run(root, "pil")
    # float conversion on the GPU may differ from the CPU by an ulp (~6e-8); anything more is a real difference
    _expect_reference(out, loader.images, mean_levels=1e-4, max_levels=0)
