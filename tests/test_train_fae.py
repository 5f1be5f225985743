"""train_fae.py end to end on CPU, in this process (one gloo rank, FSDP2 as on GPUs): each stage learns
on generated smooth images with a random tiny timm ViT as the frozen encoder; the pixel stage without
VGG weights warns once; a killed feature run resumes to the uninterrupted result; bad input names itself."""
import json
import math
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fae_fast import losses
from fae_fast.data.fae_images import FolderImages, make_image_source
from fae_fast.data.synthetic import photo
from fae_fast.losses import PerceptualWeightsWarning
from training import train_fae

from conftest import PooledPixels  # noqa: E402 (tests/ is on sys.path)

# the tiny recipe (vit_tiny_patch16_224 at 64 px, FAE-tiny at 192 channels) on a folder of generated
# images; a wider pixel decoder and 16 latent channels so that a few dozen steps show learning, a short
# EMA so that the exported weights (the next stage's input) are the trained ones
COMMON = ["--data.source=folder", "--data.global_batch=8", "--data.backend=pil", "--run.log_every=5",
          "--run.eval_samples=8", "--loss.disc_channels=8", "--optim.ema_decay=0.9", "--fae.pix_width=64",
          "--fae.latent_dim=16"]


pytestmark = pytest.mark.usefixtures("in_process_group")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """32 smooth random 72x72 JPEGs in two class folders (root/train/<class>/*.JPEG)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(2):
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(16):
            Image.fromarray(photo(72, 72, rng, noise=2.0)).save(folder / f"{i}.JPEG", quality=95)
    return root


def run(images: Path, out: Path, *args: str) -> dict:
    return train_fae.main([*COMMON, f"--data.root={images}", f"--run.out_dir={out}", *args])


def logged(result: dict, key: str) -> list[float]:
    return [terms[key] for _, terms in result["history"]]


@pytest.fixture(scope="module")
def stages(images, tmp_path_factory):
    """The three stages chained as in the README, the pixel stages offline (no VGG weights)."""
    out = tmp_path_factory.mktemp("runs")

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network (simulated)")

    results = {"feature": run(images, out / "feature", "--run.steps=40")}
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mp.setenv("TORCH_HOME", str(out / "empty_hub"))
        mp.setattr(torch.hub, "download_url_to_file", offline)
        mp.setattr(losses, "_warned", False)
        results["pixel"] = run(images, out / "pixel", "--stage", "pixel", "--run.steps=40", "--loss.disc_start=20",
                               "--optim.lr=1e-2")
        results["pixel-finetune"] = run(
            images, out / "finetune", "--stage=pixel-finetune", "--run.steps=30", "--loss.disc_start=0",
            "--optim.lr=1e-2", "--optim.schedule=constant", "--optim.warmup_steps=0",
            f"--fae_weights={out / 'feature' / 'ema.safetensors'}", f"--pixel_init={out / 'pixel' / 'ema.safetensors'}")
    results["warnings"] = [w for w in caught if issubclass(w.category, PerceptualWeightsWarning)]
    results["out"] = out
    return results


def test_feature_stage_loss_falls(stages):
    rec, kl = logged(stages["feature"], "rec"), logged(stages["feature"], "kl")
    assert rec[-1] < 0.8 * rec[0], rec
    assert all(k > 0 for k in kl)
    ema = load_file(str(stages["out"] / "feature" / "ema.safetensors"))
    assert any(k.startswith("encoder.") for k in ema) and any(k.startswith("decoder.") for k in ema)


def test_pixel_stage_learns_and_its_gan_starts_at_disc_start(stages):
    history = stages["pixel"]["history"]
    l1 = logged(stages["pixel"], "l1")
    assert l1[-1] < 0.85 * l1[0], l1
    for step, terms in history:
        gan_on = step > 20  # the interval mean of steps step-4 .. step
        assert (terms["d_loss"] > 0) == gan_on and (terms["lambda"] > 0) == gan_on, (step, terms)
    assert "lpips" not in history[0][1]  # the perceptual term is off without weights ...
    assert (stages["out"] / "pixel" / "recon_final.png").exists()
    assert stages["pixel"]["eval"]["psnr"] > 5


def test_pixel_stages_without_vgg_weights_warn_exactly_once(stages):
    # ... and said so once, though two pixel-stage runs tried to load it
    assert len(stages["warnings"]) == 1, [str(w.message) for w in stages["warnings"]]
    assert "perceptual loss OFF" in str(stages["warnings"][0].message)


def test_pixel_finetune_learns_on_the_faes_features(stages):
    # measured 0.458 -> 0.401: the tiny FAE's 16 channels keep little of a random ViT's features, so the
    # floor is near; a decoder that ignored its input would stay at its first value
    l1 = logged(stages["pixel-finetune"], "l1")
    assert l1[-1] < 0.92 * l1[0], l1
    assert all(terms["d_loss"] > 0 for _, terms in stages["pixel-finetune"]["history"])


def test_pixel_finetune_starts_from_pixel_init_with_the_fae_frozen(stages):
    out = stages["out"]
    cfg = train_fae.parse_args([*COMMON, "--data.source=synthetic", "--stage=pixel-finetune",
                                "--loss.perceptual_weight=0",
                                f"--fae_weights={out / 'feature' / 'ema.safetensors'}",
                                f"--pixel_init={out / 'pixel' / 'ema.safetensors'}"])
    stage = train_fae.PixelStage(cfg, train_fae.init_distributed())
    pixel = load_file(str(out / "pixel" / "ema.safetensors"))
    for name, p in stage.model.named_parameters():
        torch.testing.assert_close(p.full_tensor().cpu(), pixel[name], rtol=0, atol=0)
    fae = load_file(str(out / "feature" / "ema.safetensors"))
    for name, p in stage.fae.named_parameters():
        assert not p.requires_grad
        torch.testing.assert_close(p.detach().cpu(), fae[name], rtol=0, atol=0)


def test_pixel_finetune_writes_the_whole_fae_for_sampling(stages):
    """fae.safetensors: encoder.* and feature_decoder.* of the FAE, pixel_decoder.* fine-tuned (sample.py --fae)."""
    out = stages["out"]
    whole = load_file(str(out / "finetune" / "fae.safetensors"))
    parts = {"encoder.": load_file(str(out / "feature" / "ema.safetensors")),
             "pixel_decoder.": load_file(str(out / "finetune" / "ema.safetensors"))}
    feature = {k[len("decoder."):]: v for k, v in parts["encoder."].items() if k.startswith("decoder.")}
    expected = {k: v for k, v in parts["encoder."].items() if k.startswith("encoder.")}
    expected |= {f"feature_decoder.{k}": v for k, v in feature.items()}
    expected |= {f"pixel_decoder.{k}": v for k, v in parts["pixel_decoder."].items()}
    assert set(whole) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(whole[name], value, rtol=0, atol=0)


def test_sample_and_extraction_read_the_whole_fae_file(stages):
    """The hand-off to the other programs: sample.py decodes with fae.safetensors and the fae_config.json
    beside it (no --fae_size needed), exactly as the trained decoders do; extraction reads its encoder."""
    from fae_fast.fae import FeatureDecoder, PixelDecoder
    from fae_fast.inference import fae_weights, load_fae_parts
    from training import sample

    out = stages["out"]
    fcfg = train_fae.parse_args([*COMMON, "--data.source=synthetic"]).fae
    scfg = sample.SampleConfig(fae=str(out / "finetune" / "fae.safetensors"), stats="identity", impl="torch")
    gcfg = sample.GeneratorConfig(in_channels=fcfg.latent_dim, grid=fcfg.grid)
    decoder = sample.decoder_of(scfg, gcfg, torch.device("cpu"), torch.float32)

    features, pixels = FeatureDecoder(fcfg, impl="torch"), PixelDecoder(fcfg, impl="torch")
    feature_ema = load_file(str(out / "feature" / "ema.safetensors"))
    features.load_state_dict({k[len("decoder."):]: v for k, v in feature_ema.items() if k.startswith("decoder.")})
    pixels.load_state_dict(load_file(str(out / "finetune" / "ema.safetensors")))
    z = torch.randn(3, fcfg.grid ** 2, fcfg.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ((pixels(features(z)) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(decoder(z), expected)

    (encoder,) = load_fae_parts(fae_weights(str(out / "finetune" / "fae.safetensors")), fcfg, ("encoder",), "")
    for name, p in encoder.state_dict().items():
        torch.testing.assert_close(p, feature_ema[f"encoder.{name}"], rtol=0, atol=0)


def test_killed_feature_run_resumes_to_the_uninterrupted_result(images, tmp_path, monkeypatch):
    """20 steps straight vs a run killed at step 13 (checkpoint at 10) and started again with the same
    command: the same logged losses after the restart and the same EMA weights. Crosses epoch ends (32
    images, batch 8), so the loader's saved position is exercised."""
    args = ["--run.steps=20", "--run.ckpt_every=10"]
    straight = run(images, tmp_path / "straight", *args)
    real_step = train_fae.FeatureStage.step

    def killed_at_13(self, step, *a):
        if step == 13:
            raise KeyboardInterrupt("simulated kill")
        return real_step(self, step, *a)

    monkeypatch.setattr(train_fae.FeatureStage, "step", killed_at_13)
    with pytest.raises(KeyboardInterrupt):
        run(images, tmp_path / "resumed", *args)
    monkeypatch.setattr(train_fae.FeatureStage, "step", real_step)
    resumed = run(images, tmp_path / "resumed", *args)
    a, b = dict(straight["history"]), dict(resumed["history"])
    assert set(b) == set(a)  # the lines logged before the kill are read back: the curve is whole
    for step in b:
        for key in ("loss", "rec", "kl"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6), (step, key)
    ema_a = load_file(str(tmp_path / "straight" / "ema.safetensors"))
    ema_b = load_file(str(tmp_path / "resumed" / "ema.safetensors"))
    for name in ema_a:
        torch.testing.assert_close(ema_b[name], ema_a[name], rtol=1e-6, atol=1e-7)


def test_resume_from_another_stage_names_the_stage(images, tmp_path):
    run(images, tmp_path / "run", "--run.steps=2", "--run.eval_samples=0")
    with pytest.raises(ValueError, match="belongs to stage 'feature', not 'pixel'"):
        run(images, tmp_path / "run", "--stage=pixel", "--run.steps=4", "--loss.perceptual_weight=0")


def test_synthetic_source_is_a_function_of_the_step():
    cfg = train_fae.parse_args(["--data.global_batch=4"])
    d = train_fae.init_distributed()
    a, b = make_image_source(cfg, d), make_image_source(cfg, d)
    pixels, enc = a.batch(7)
    assert pixels.shape == (4, 3, 64, 64) and enc.shape == (4, 3, 64, 64)
    assert 0 <= pixels.min() and pixels.max() <= 1 and pixels.std() > 0.05
    torch.testing.assert_close(b.batch(7)[0], pixels)
    assert not torch.equal(a.batch(8)[0], pixels)


def test_command_line():
    cfg = train_fae.parse_args(["--stage", "pixel", "--loss.adv_weight=0.25", "--recipe=tiny"])
    assert cfg.stage == "pixel" and cfg.loss.adv_weight == 0.25 and cfg.run.out_dir == "runs/fae-tiny-pixel"
    full = train_fae.parse_args(["--recipe", "dinov2-g", "--stage=feature", "--data.root=/x"])
    assert (full.run.steps, full.data.global_batch, full.optim.warmup_steps, full.optim.schedule) == \
        (1_000_000, 1024, 1000, "cosine")
    assert train_fae.parse_args(["--recipe=dinov2-g", "--stage=pixel", "--data.root=/x"]).data.global_batch == 512


@pytest.mark.parametrize("args,message", [
    (["--stage=decode"], "--stage 'decode' is unknown; choose one of: feature, pixel, pixel-finetune"),
    (["--stage=pixel-finetune", "--fae_weights="], "pass --fae_weights="),
    (["--fae.feature_dim=96"], "set --fae.feature_dim=192"),
    (["--data.source=folder"], "needs data.root"),
])
def test_bad_configs_say_what_to_change(args, message):
    with pytest.raises(ValueError, match=message):
        train_fae.parse_args(args)


def test_missing_fae_weights_file_names_the_path(images, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        run(images, tmp_path / "ft", "--stage=pixel-finetune", f"--fae_weights={missing}", "--pixel_init=",
            "--loss.perceptual_weight=0")


def test_benchmark_recipe_runs_pixel_finetune_on_a_random_fae(capsys):
    """The full-size speed run of stage II needs no trained FAE (fae_weights=random, said aloud); the
    same path at the tiny size takes a step here."""
    assert train_fae.parse_args(["--recipe=dinov2-g-benchmark", "--stage=pixel-finetune"]).fae_weights == "random"
    cfg = train_fae.parse_args(["--recipe=tiny", "--stage=pixel-finetune", "--fae_weights=random", "--pixel_init=",
                                "--loss.perceptual_weight=0"])
    stage = train_fae.PixelStage(cfg, train_fae.init_distributed())
    assert "fae_weights=random" in capsys.readouterr().out
    pixels, encoder_pixels = make_image_source(cfg, train_fae.init_distributed()).batch(0)
    terms = stage.step(0, pixels, encoder_pixels)
    assert math.isfinite(float(terms["loss"]))


def test_history_and_plot_are_written(stages):
    out = stages["out"] / "feature"
    steps = [s for s, _ in json.loads((out / "history.json").read_text())]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]
    assert (out / "loss.png").stat().st_size > 1000


def test_pixel_stage_scores_rfid_through_the_extractor(images, tmp_path, monkeypatch):
    from fae_fast.eval import fid

    monkeypatch.setattr(train_fae, "RFID_MIN_IMAGES", 16)
    monkeypatch.setattr(fid, "InceptionExtractor", PooledPixels)
    scores = run(images, tmp_path / "pixel", "--stage=pixel", "--run.steps=2", "--run.eval_samples=24",
                 "--loss.perceptual_weight=0")["eval"]
    assert scores["rfid"] > 0 and math.isfinite(scores["rfid"]) and scores["psnr"] > 5


@pytest.mark.slow
def test_probe_of_trained_fae_latents_beats_an_untrained_faes(tmp_path):
    """The chain of the paper's probe: feature stage -> extraction -> linear probe, on 4 classes told
    apart by a colour tint, with one random tiny ViT (saved to a file) as the frozen encoder of both
    programs. The trained FAE's 4 latent channels must keep more of the class than a random FAE's
    (seen: 98.4% against 78.1% held-out top-1; chance is 25%)."""
    from safetensors.torch import save_file

    from fae_fast.config import encoder_config
    from fae_fast.encoders import FrozenEncoder
    from fae_fast.eval.probe import probe_cache
    from training import extract_latents

    torch.manual_seed(0)
    encoder_file = tmp_path / "encoder.safetensors"
    encoder = FrozenEncoder(encoder_config("tiny", feature_dim=192), grid=4)
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, str(encoder_file))
    rng = np.random.default_rng(0)
    tints = np.array([[40, -20, -20], [-20, 40, -20], [-20, -20, 40], [30, 30, -40]])
    for c, tint in enumerate(tints):
        folder = tmp_path / "images" / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(64):
            image = photo(72, 72, rng, noise=8.0).astype(np.int32) + tint * rng.uniform(0.3, 1.0)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i}.JPEG", quality=95)

    train_fae.main(["--recipe=tiny", "--data.source=folder", f"--data.root={tmp_path / 'images'}",
                    "--data.backend=pil", f"--encoder.weights_path={encoder_file}", "--run.steps=200",
                    "--run.eval_samples=0", f"--run.out_dir={tmp_path / 'fae'}"])
    top1 = {}
    for kind, weights in (("trained", ["--fae", str(tmp_path / "fae" / "ema.safetensors")]),
                          ("random", ["--random-weights"])):
        cache = tmp_path / f"cache_{kind}"
        assert extract_latents.main(["--images", str(tmp_path / "images" / "train"), "--encoder", "tiny", *weights,
                                     f"--encoder.weights_path={encoder_file}", "--batch", "16", "--shard-size", "64",
                                     "--workers", "0", "--backend", "pil", "--out", str(cache)])
        top1[kind] = probe_cache(str(cache), holdout=0.25, epochs=50, batch_size=64).top1
    assert top1["trained"] > top1["random"] + 0.05 and top1["trained"] > 0.8, top1


def test_folder_source_honours_the_check_tools_exclude_list(images, tmp_path):
    """data.exclude_list and data.on_error reach the image loader: listed files are never read."""
    listed = sorted((images / "train" / "n00000000").glob("*.JPEG"))[:3]
    problems = tmp_path / "problems.txt"
    problems.write_text("".join(f"{p}\n" for p in listed))
    cfg = train_fae.parse_args([*COMMON, f"--data.root={images}", f"--data.exclude_list={problems}",
                                "--data.on_error=stop"])
    source = FolderImages(cfg, rank=0, world=1, device=torch.device("cpu"))
    assert source.loader.num_images == 32 - 3
    assert source.loader.cfg.on_error == "stop"
