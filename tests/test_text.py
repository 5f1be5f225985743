"""The text-to-image path: the SigLIP 2 text tower loader (on checkpoints of the published format written
here), caption conditioning (dropout, the null caption), the text-conditioned generator (fused against
plain, guidance), the toy captions and their latent source, and the t2i demo end to end."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fae_fast.conditioning import TextEmbeddings  # noqa: E402
from fae_fast.config import DataConfig, SamplerConfig, TextGeneratorConfig, TransportConfig  # noqa: E402
from fae_fast.data.latents import make_source  # noqa: E402
from fae_fast.data.toy_captions import WORDINGS, toy_caption_embeddings, toy_captions, toy_text_encoder  # noqa: E402
from fae_fast.families import family_of, model_config_from_json  # noqa: E402
from fae_fast.text import FrozenTextEncoder  # noqa: E402
from conftest import program_env  # noqa: E402 (tests/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
TINY = TextGeneratorConfig(depth=2, width=32, heads=2, in_channels=4, grid=4, num_classes=4, text_dim=32,
                           text_length=8, norm="rms", mlp="swiglu", rope=True, qk_norm=True)


def test_a_saved_text_tower_and_a_whole_siglip2_checkpoint_load_with_their_outputs(tmp_path):
    encoder = toy_text_encoder(32, 8, seed=3)
    captions = ["a red circle", "the square is blue", "an unknown word"]
    expected = encoder(captions)
    encoder.tokenizer.save_pretrained(tmp_path / "text")
    encoder.tower.save_pretrained(tmp_path / "text")
    loaded = FrozenTextEncoder.load(str(tmp_path / "text"), max_length=8)
    assert torch.equal(loaded(captions), expected) and expected.shape == (3, 8, 32)

    # the published checkpoints hold both towers (Siglip2Model): the text tower is read out of them
    text_config = encoder.tower.config.to_dict()
    whole = transformers.Siglip2Model(transformers.Siglip2Config(
        text_config=text_config, vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, num_patches=16, patch_size=4)))
    whole.save_pretrained(tmp_path / "whole")
    encoder.tokenizer.save_pretrained(tmp_path / "whole")
    ids = torch.tensor([[3, 4, 5, 0, 0, 0, 0, 0], [6, 7, 2, 1, 0, 0, 0, 0]])
    tower = FrozenTextEncoder.load(str(tmp_path / "whole"), max_length=8).tower  # (the tokenizer is the file's)
    with torch.no_grad():
        assert torch.equal(tower(input_ids=ids).last_hidden_state, whole.text_model(input_ids=ids).last_hidden_state)
        assert not torch.allclose(tower(input_ids=ids).last_hidden_state, encoder.tower(input_ids=ids).last_hidden_state)


def test_a_missing_text_tower_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SigLIP 2 text tower at .*save_pretrained"):
        FrozenTextEncoder.load(str(tmp_path / "nothing_here"))


def test_caption_dropout_uses_the_null_caption_at_its_rate():
    conditioning = TextEmbeddings(dropout=0.25)
    text = torch.randn(4000, 8, 32) + 1.0
    dropped = conditioning.drop(text, torch.Generator().manual_seed(0))
    is_null = (dropped == 0).all(dim=(1, 2))
    assert 0.22 < is_null.float().mean() < 0.28
    assert torch.equal(dropped[~is_null], text[~is_null])
    assert torch.equal(conditioning.null(text), torch.zeros_like(text))
    with pytest.raises(ValueError, match="samples from captions"):
        conditioning.for_indices(0, torch.arange(3))


@pytest.mark.parametrize("text_attention", ["cross", "joint"])
def test_text_generator_fused_path_matches_the_plain_one_and_guidance_runs(device, text_attention):
    cfg = dataclasses.replace(TINY, text_attention=text_attention)
    family = family_of(cfg)
    torch.manual_seed(0)
    plain = family.build(cfg, impl="torch").to(device)
    fused = family.build(cfg, impl="triton").to(device)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in plain.parameters():  # every cross-attention and modulation non-zero
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    fused.load_state_dict(plain.state_dict())
    x, t = torch.randn(3, 16, 4, device=device), torch.rand(3, device=device)
    text = torch.randn(3, 8, 32, device=device)
    torch.testing.assert_close(fused(x, t, text), plain(x, t, text), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(plain(x, t, text), plain(x, t, torch.zeros_like(text)))  # the caption matters
    loss = family.loss(plain, x, text, TransportConfig(), torch.Generator(device=device).manual_seed(0))
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    with torch.no_grad():
        guided = family.sample(plain, text, x, SamplerConfig(method="euler", steps=4, cfg=[(0.0, 1.0, 3.0)]))
        unguided = family.sample(plain, text, x, SamplerConfig(method="euler", steps=4, cfg=[]))
    assert guided.shape == x.shape and (guided - unguided).abs().max() > 1e-3


@pytest.mark.parametrize("text_attention", ["cross", "joint"])
def test_the_attention_backend_is_measured_for_the_shape_the_model_attends_with(monkeypatch, text_attention):
    """The family's chooser measures the self-attention shape the forward runs: 16 latent + 8 caption tokens
    for joint attention (a choice for the latent tokens alone is never looked up there), 16 for cross."""
    import fae_fast.layers as layers
    import fae_fast.text_generator as text_generator

    cfg = dataclasses.replace(TINY, text_attention=text_attention)
    measured, attended = [], []
    monkeypatch.setattr(text_generator, "choose_backend", lambda rows, heads, tokens, head_dim, dtype, device:
                        measured.append((rows, heads, tokens, head_dim)) or "sdpa")
    family_of(cfg).choose_attention(cfg, 3, torch.float32, torch.device("cpu"))
    model = family_of(cfg).build(cfg, impl="torch")
    module = text_generator if text_attention == "joint" else layers  # where the self-attention is called
    real = module.attention_tokens
    monkeypatch.setattr(module, "attention_tokens",
                        lambda q, k, v, **kw: attended.append(tuple(q.shape)) or real(q, k, v, **kw))
    model(torch.randn(3, 16, 4), torch.rand(3), torch.randn(3, 8, 32))
    assert len(measured) == 1 and attended and set(attended) == set(measured), (measured, attended)


@pytest.mark.parametrize("text_attention", ["cross", "joint"])
def test_every_weight_of_a_text_model_reaches_the_output(text_attention):
    """No dead weights: every parameter gets a gradient from the velocity (the last joint block has no
    caption output path, since nothing reads the caption tokens after it)."""
    cfg = dataclasses.replace(TINY, text_attention=text_attention)
    torch.manual_seed(0)
    model = family_of(cfg).build(cfg, impl="torch")
    with torch.no_grad():
        for p in model.parameters():  # past the zero start, so that every path carries a gradient
            p.add_(torch.randn_like(p) * 0.1)
    model(torch.randn(3, 16, 4), torch.rand(3), torch.randn(3, 8, 32)).square().sum().backward()
    unreached = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not unreached, unreached
    if text_attention == "joint":
        assert not hasattr(model.blocks[-1], "text_mlp") and hasattr(model.blocks[0], "text_mlp")


def test_toy_captions_name_each_class_in_every_wording_and_the_source_draws_them():
    captions = toy_captions(4)
    assert len(captions) == 4 and all(len(c) == len(WORDINGS) for c in captions)
    assert len({c for wordings in captions for c in wordings}) == 4 * len(WORDINGS)
    table = toy_caption_embeddings(4, 32, 8)
    assert table.shape == (4, len(WORDINGS), 8, 32)
    source = make_source(DataConfig(source="toy_captions", global_batch=16), TINY, rank=0, world=1, device="cpu")
    x, text = source.batch(0)
    again_x, again_text = source.batch(0)
    assert x.shape == (16, 16, 4) and text.shape == (16, 8, 32)
    assert torch.equal(x, again_x) and torch.equal(text, again_text)  # a step's batch is a function of the step
    matches = (text[:, None, None] == table[None]).flatten(3).all(dim=3)  # (16, classes, wordings)
    assert matches.any(dim=(1, 2)).all()  # every condition is one of the toy captions
    with pytest.raises(ValueError, match="only a text-conditioned model"):
        make_source(DataConfig(source="toy_captions"), family_of(TINY).config_class.__mro__[1](), rank=0,
                    world=1, device="cpu")


@pytest.mark.slow
def test_t2i_demo_learns_the_toy_set_and_captions_steer(tmp_path):
    """t2i-demo shortened to 600 steps: the Frechet distance falls severalfold and the samples drawn for each
    caption land nearest their own class; the run's checkpoint names the text family."""
    out = tmp_path / "t2i"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(ROOT / "training" / "train_gen.py"), "--recipe", "t2i-demo", "--run.steps=600",
           "--optim.ema_decay=0.98", "--run.eval_samples=1024", "--run.ckpt_every=600", "--run.eval_every=0",
           f"--run.out_dir={out}"]
    res = subprocess.run(cmd, cwd=ROOT, env=program_env(1), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    scores = json.loads((out / "frechet.json").read_text())
    assert scores["after"]["overall"] < scores["before"]["overall"] / 3, scores
    assert scores["caption_steering"]["overall"] >= 0.9, scores["caption_steering"]
    assert "captions steer" in res.stdout
    family, config = model_config_from_json(next((out / "checkpoints").glob("step_*")) / "config.json")
    assert family.name == "text_flow_transformer" and config.text_dim == 32


def write_fake_coco(root: Path, images: int = 12) -> tuple[Path, Path]:
    """annotations/captions_val2014.json and val2014/ with `images` tiny JPEGs, 2-3 captions each."""
    from PIL import Image

    folder = root / "val2014"
    folder.mkdir(parents=True)
    entries, annotations = [], []
    for i in range(images):
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.new("RGB", (40 + i, 30), (10 * i, 50, 90)).save(folder / name)
        entries.append({"id": 1000 + i, "file_name": name})
        annotations += [{"image_id": 1000 + i, "id": 10 * i + j, "caption": f" picture {i} caption {j} "}
                        for j in range(2 + i % 2)]
    (root / "annotations").mkdir()
    path = root / "annotations" / "captions_val2014.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations}))
    return path, folder


def test_coco_protocol_draws_a_seeded_set_of_images_with_one_of_their_captions(tmp_path):
    from fae_fast.eval.coco import coco_prompts

    annotations, images = write_fake_coco(tmp_path)
    prompts = coco_prompts(annotations, images, count=8, seed=0)
    assert len(prompts) == 8 and len({p.image_id for p in prompts}) == 8  # without replacement
    assert prompts == coco_prompts(annotations, images, count=8, seed=0)  # a function of the seed
    assert prompts != coco_prompts(annotations, images, count=8, seed=1)
    for p in prompts:
        number = p.image_id - 1000
        assert p.file == images / f"COCO_val2014_{number:012d}.jpg"
        assert p.caption.startswith(f"picture {number} caption") and p.caption == p.caption.strip()
    with pytest.raises(ValueError, match="fewer than the 13 asked for"):
        coco_prompts(annotations, images, count=13)
    next(images.iterdir()).unlink()
    with pytest.raises(FileNotFoundError, match="missing under .*val2014"):
        coco_prompts(annotations, images, count=12)
    with pytest.raises(FileNotFoundError, match="captions_val2014.json from COCO"):
        coco_prompts(tmp_path / "nope.json", images)
    (tmp_path / "bad.json").write_text("{\"images\": []}")
    with pytest.raises(ValueError, match="is not a COCO captions file"):
        coco_prompts(tmp_path / "bad.json", images, count=1)


@pytest.mark.slow
def test_two_process_sharded_text_training_lowers_the_loss_and_samples(tmp_path):
    """FSDP2 over 2 ranks (gloo) for the text model (joint blocks, the last without a caption output): the
    loss falls, and the sample grids are drawn from the sharded weights."""
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "training" / "train_gen.py"), "--recipe", "t2i-demo", "--data.global_batch=64",
                          "--run.steps=60", "--run.log_every=20", "--run.sample_every=30", "--run.ckpt_every=0",
                          "--run.fsdp=on", "--run.eval_every=0", "--run.eval_samples=0", f"--run.out_dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, env=program_env(2), timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "2 rank(s)" in res.stdout
    losses = [terms["loss"] for _, terms in json.loads((tmp_path / "history.json").read_text())]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.1, losses
    assert (tmp_path / "samples_00000030.png").is_file() and (tmp_path / "samples_final.png").is_file()
