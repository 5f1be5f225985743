"""Zero-shot COCO evaluation of a text-to-image model: training/sample.py drawing one sample per caption of the
prompt set (conditions, guidance against the null caption, the prompt list, resume), a class-conditional run
unchanged, training/evaluate.py scoring the set against its own COCO images, and the errors of options that
do not fit. A fake COCO tree (captions JSON and small JPEGs), a tiny random text generator and a tiny random
SigLIP 2 text tower stand in for the real ones; a random conv net stands in for Inception (tests/test_fid.py)."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from fae_fast.cli import UsageError  # noqa: E402
from fae_fast.data.toy_captions import toy_captions, toy_text_encoder  # noqa: E402
from fae_fast.eval.coco import CocoConfig, coco_prompts, prompt_set_digest, write_prompt_list  # noqa: E402
from fae_fast.eval.fid import center_crop  # noqa: E402
from fae_fast.eval.frechet import frechet_distance, moments  # noqa: E402
from fae_fast.eval.protocol import index_labels, index_normal  # noqa: E402
from fae_fast.families import family_of  # noqa: E402
from fae_fast.sampling import sample_latents  # noqa: E402
from training import evaluate, sample  # noqa: E402
from conftest import program_env  # noqa: E402 (tests/ is on sys.path)
from test_fid import RandomConv  # noqa: E402
from test_sample import tiny_fae, tiny_generator  # noqa: E402
from test_text import TINY  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COUNT = 6
"""Captions (and samples) in the test's prompt set, drawn from the fake tree's 10 images."""
STEPS = ["--preset=paper-cfg", "--sampler.steps=4", "--impl=torch", "--seed=5"]
"""Euler, guidance 1.5 on t in [0.3, 1): two of the four steps guided against the null caption."""


pytestmark = pytest.mark.usefixtures("in_process_group")


def write_coco_tree(root: Path, images: int = 10) -> tuple[Path, Path]:
    """annotations/captions_val2014.json and val2014/ with `images` smooth random JPEGs of several sizes, image k
    captioned by the toy captions of class k (three wordings: words the toy text tower knows)."""
    folder, wordings = root / "val2014", toy_captions(images)
    folder.mkdir(parents=True)
    entries, annotations = [], []
    for k in range(images):
        name = f"COCO_val2014_{k:012d}.jpg"
        pixels = np.random.default_rng(k).integers(0, 256, (6, 8 + k % 3, 3), dtype=np.uint8)
        Image.fromarray(pixels.repeat(8, 0).repeat(8, 1)).save(folder / name, quality=95)
        entries.append({"id": 500 + k, "file_name": name})
        annotations += [{"image_id": 500 + k, "id": 10 * k + j, "caption": c} for j, c in enumerate(wordings[k])]
    (root / "annotations").mkdir()
    path = root / "annotations" / "captions_val2014.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations}))
    return path, folder


def tiny_text_generator(folder: Path) -> torch.nn.Module:
    """The tiny text generator of tests/test_text.py with random weights (the caption path's zero-initialised
    projections perturbed, so captions matter), written as train_gen writes it."""
    torch.manual_seed(0)
    model = family_of(TINY).build(TINY, impl="torch")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.named_parameters()}, str(folder / "ema.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model": dataclasses.asdict(TINY),
                                                    "family": family_of(TINY).name}))
    return model.eval()


def save_text_tower(folder: Path, width: int = 32) -> Path:
    """A random 2-layer SigLIP 2 text tower (the toy one) saved as save_pretrained writes it."""
    encoder = toy_text_encoder(width, 8, seed=3)
    encoder.tokenizer.save_pretrained(folder)
    encoder.tower.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> dict:
    """The fake tree, the tiny models, and one uninterrupted COCO run with decoders (out: 'whole')."""
    root = tmp_path_factory.mktemp("coco")
    annotations, images = write_coco_tree(root / "coco")
    (root / "fae").mkdir()
    fae, stats = tiny_fae(root / "fae")
    setup = {"root": root, "annotations": annotations, "images": images,
             "model": tiny_text_generator(root / "gen"), "tower": save_text_tower(root / "tower")}
    setup["args"] = [*STEPS, f"--ckpt={root / 'gen' / 'ema.safetensors'}", f"--text_tower={setup['tower']}",
                     f"--coco.annotations={annotations}", f"--coco.images={images}", f"--coco.count={COUNT}",
                     "--batch=4", "--grid_seeds=1"]
    setup["decoded"] = [f"--fae={fae}", "--fae_size=FAE-tiny", f"--stats={stats}"]
    setup["whole"] = sample.main([*setup["args"], *setup["decoded"], f"--out_dir={root / 'whole'}"])
    return setup


def sample_on_cpu(args: list[str]) -> str:
    """training/sample.py in a subprocess with the GPUs hidden; its stdout. For the tests that compare the
    program's latents with the sampler run here in fp32 on the CPU at 1e-5 (on CUDA the program runs bf16
    and compiled; the CUDA path is the one the other tests of this file run in-process)."""
    done = subprocess.run([sys.executable, str(ROOT / "training" / "sample.py"), *args], capture_output=True,
                          text=True, env={**program_env(), "CUDA_VISIBLE_DEVICES": ""}, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as f:
        return f["arr_0"], f["arr_1"]


# ---------------------------------------------------------------------------------------- sample.py
def test_a_text_model_draws_one_sample_per_caption_guided_against_the_null_caption(coco):
    """Latents (no decoders): sample i is the sampler run from noise (seed, i) on caption i's embedding with
    guidance against the null caption, computed here without the program; arr_1 and prompts.json name the
    prompt set's images and captions in order."""
    out = coco["root"] / "latents"
    assert "prompts.json (evaluate.py reads it)" in sample_on_cpu([*coco["args"], f"--out_dir={out}"])
    final = out / f"latents_{COUNT}x16x4.npz"
    latents, ids = read_npz(final)
    prompts = coco_prompts(coco["annotations"], coco["images"], count=COUNT)
    assert ids.tolist() == [p.image_id for p in prompts]
    text = toy_text_encoder(32, 8, seed=3)([p.caption for p in prompts])
    noise = index_normal(5, torch.arange(COUNT), (16, 4))
    sampler = sample.parse_args(STEPS).sampler
    expected = sample_latents(coco["model"], text, noise, sampler)
    torch.testing.assert_close(torch.from_numpy(latents), expected, atol=1e-5, rtol=0)
    other_captions = sample_latents(coco["model"], text.roll(1, dims=0), noise, sampler)
    assert (other_captions - expected).abs().max() > 1e-2  # the captions steer the samples
    listed = json.loads((out / "prompts.json").read_text())
    assert listed["digest"] == prompt_set_digest(prompts) and listed["count"] == COUNT
    assert listed["prompts"] == [{"index": i, "image_id": p.image_id, "file": p.file.name, "caption": p.caption}
                                 for i, p in enumerate(prompts)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompt_set"] == listed["digest"] and manifest["num_samples"] == COUNT


def test_decoded_text_set_and_its_grid_of_captions(coco):
    images, ids = read_npz(coco["whole"])
    assert coco["whole"].name == f"samples_{COUNT}x64x64x3.npz"
    assert images.dtype == np.uint8 and images.shape == (COUNT, 64, 64, 3) and images.std() > 0
    assert len(set(ids.tolist())) == COUNT
    grid = Image.open(coco["whole"].parent / "grid.png")  # one row per caption (6 of the 8 grid rows), 1 seed
    assert grid.size == (2 + 66, 2 + COUNT * 66)


def test_an_interrupted_text_run_resumes_to_the_same_npz(coco, monkeypatch, capsys):
    out, real_write = coco["root"] / "resumed", sample.write_chunk

    def crash_after_one_chunk(folder, start, end, **arrays):
        if start > 0:
            raise KeyboardInterrupt("simulated crash")
        return real_write(folder, start, end, **arrays)

    monkeypatch.setattr(sample, "write_chunk", crash_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        sample.main([*coco["args"], *coco["decoded"], f"--out_dir={out}"])
    monkeypatch.undo()
    capsys.readouterr()
    final = sample.main([*coco["args"], *coco["decoded"], f"--out_dir={out}"])
    assert f"4 of {COUNT} samples on disk" in capsys.readouterr().out
    for resumed, whole in zip(read_npz(final), read_npz(coco["whole"])):
        assert np.array_equal(resumed, whole)
    assert (out / "prompts.json").read_text() == (coco["whole"].parent / "prompts.json").read_text()
    with pytest.raises(ValueError, match="drawn with prompt_set="):  # another prompt set cannot resume here
        sample.main([*coco["args"], *coco["decoded"], "--coco.seed=1", f"--out_dir={out}"])


def test_a_class_conditional_run_is_unchanged(tmp_path):
    """The class path after the text path was added: labels i mod K, no prompt list, the manifest's keys of
    before, and the latents of the sampler run on those labels, computed here without the program."""
    model = tiny_generator(tmp_path / "gen")
    sample_on_cpu([*STEPS, f"--ckpt={tmp_path / 'gen' / 'ema.safetensors'}", "--num_samples=5", "--batch=4",
                   "--grid_classes=[]", f"--out_dir={tmp_path / 'out'}"])
    final = tmp_path / "out" / "latents_5x16x4.npz"
    latents, labels = read_npz(final)
    assert labels.tolist() == [0, 1, 2, 3, 4]
    indices = torch.arange(5)
    expected = sample_latents(model.eval(), index_labels(5, indices, 10), index_normal(5, indices, (16, 4)),
                              sample.parse_args(STEPS).sampler)
    torch.testing.assert_close(torch.from_numpy(latents), expected, atol=1e-5, rtol=0)
    assert not (tmp_path / "out" / "prompts.json").exists()
    assert set(json.loads((tmp_path / "out" / "manifest.json").read_text())) == {
        "ckpt", "fae", "fae_size", "fae_config", "stats", "num_samples", "labels", "seed", "sampler", "dtype"}


def test_options_that_do_not_fit_the_model_or_the_files_are_named_before_anything_is_written(coco, tmp_path):
    text_ckpt, out = f"--ckpt={coco['root'] / 'gen' / 'ema.safetensors'}", f"--out_dir={tmp_path / 'out'}"
    coco_args = [a for a in coco["args"] if a.startswith("--coco.")]
    with pytest.raises(ValueError, match="is a text-to-image generator: .* pass --coco.annotations="):
        sample.main([*STEPS, text_ckpt, f"--text_tower={coco['tower']}", out])
    with pytest.raises(ValueError, match="--labels=random picks class labels"):
        sample.main([*coco["args"], "--labels=random", out])
    tiny_generator(tmp_path / "class")
    with pytest.raises(ValueError, match="is a class-conditional generator; the --coco options are for text"):
        sample.main([*STEPS, f"--ckpt={tmp_path / 'class' / 'ema.safetensors'}", *coco_args, out])
    with pytest.raises(ValueError, match="gives 16-wide caption embeddings but the generator was trained on 32"):
        sample.main([*coco["args"], f"--text_tower={save_text_tower(tmp_path / 'narrow', width=16)}", out])
    with pytest.raises(FileNotFoundError, match="captions_val2014.json from COCO"):
        sample.main([*coco["args"], f"--coco.annotations={tmp_path / 'none.json'}", out])
    with pytest.raises(FileNotFoundError, match=f"COCO image folder '{tmp_path / 'val2014'}' does not exist"):
        sample.main([*coco["args"], f"--coco.images={tmp_path / 'val2014'}", out])
    with pytest.raises(UsageError, match="--num_samples=5 and --coco.count=6 disagree"):
        sample.parse_args([*coco["args"], "--num_samples=5"])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- evaluate.py
def features_of(images: np.ndarray) -> torch.Tensor:
    return RandomConv()(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2))[0]


def test_evaluate_scores_a_coco_set_against_its_own_images_and_caches_them(coco, capsys):
    """FID of the samples against the prompt set's images (centre-cropped to 256), computed here without the
    program; not against the whole image folder; the reference is computed once, cached under its digest."""
    prompts = coco_prompts(coco["annotations"], coco["images"], count=COUNT)
    args = [f"--samples={coco['whole']}", "--batch=4", "--workers=0", "--prc=false"]
    extractor = RandomConv()
    record = evaluate.main(args, extractor=extractor)
    samples = features_of(read_npz(coco["whole"])[0])

    def fid_against(files):
        crops = np.stack([center_crop(Image.open(f).convert("RGB"), 256) for f in files])
        return frechet_distance(*moments(samples), *moments(features_of(crops)))

    assert record["fid"] == pytest.approx(fid_against([p.file for p in prompts]), rel=1e-4)
    assert abs(record["fid"] - fid_against(sorted(coco["images"].iterdir()))) > 1e-3 * record["fid"]
    digest = prompt_set_digest(prompts)
    assert record["prompt_set"] == digest and digest in record["reference"] and record["num_samples"] == COUNT
    assert f"vs COCO prompt set {digest} ({COUNT} val2014 images) (random-conv)" in capsys.readouterr().out
    assert Path(f"{coco['images']}.coco-{digest}.random-conv.stats.npz").is_file()
    calls = extractor.calls
    assert evaluate.main(args, extractor=extractor)["fid"] == record["fid"]
    assert extractor.calls - calls == 2  # the samples' two batches; the reference came from the cache


def test_evaluate_refuses_a_prompt_list_that_is_not_the_sets(coco, tmp_path):
    samples = f"--samples={coco['whole']}"
    other = tmp_path / "other.json"
    config = CocoConfig(annotations=str(coco["annotations"]), images=str(coco["images"]), seed=1)
    write_prompt_list(other, coco_prompts(coco["annotations"], coco["images"], count=COUNT, seed=1), config)
    with pytest.raises(ValueError, match="was drawn for other COCO images than the prompt list names"):
        evaluate.main([samples, f"--coco_prompts={other}"], extractor=RandomConv())
    write_prompt_list(other, coco_prompts(coco["annotations"], coco["images"], count=COUNT - 1), config)
    with pytest.raises(ValueError, match=f"holds {COUNT} samples but the prompt list names {COUNT - 1} captions"):
        evaluate.main([samples, f"--coco_prompts={other}"], extractor=RandomConv())
    other.write_text(other.read_text().replace("circle", "triangle"))
    with pytest.raises(ValueError, match="was changed after sample.py wrote it"):
        evaluate.main([samples, f"--coco_prompts={other}"], extractor=RandomConv())
    with pytest.raises(UsageError, match="--ref and --coco_prompts name two references"):
        evaluate.parse_args([samples, f"--ref={coco['images']}", f"--coco_prompts={other}"])
    with pytest.raises(FileNotFoundError, match="COCO image folder .*moved.* does not exist"):
        evaluate.main([samples, f"--coco_images={tmp_path / 'moved'}"], extractor=RandomConv())


# ---------------------------------------------------------------------------------- text-image score
def save_tiny_siglip(folder: Path, words: list[str]) -> Path:
    """A 1-layer SiglipModel with random weights, a word-level tokenizer of `words` and a 32 px image
    processor, saved as a SigLIP checkpoint is (model and processor in one folder)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (PreTrainedTokenizerFast, SiglipConfig, SiglipImageProcessor, SiglipModel,
                              SiglipProcessor)

    vocabulary = ["<pad>", "<unk>", "</s>", *sorted(set(words))]
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="</s>")
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = SiglipConfig(text_config=dict(vocab_size=len(vocabulary), max_position_embeddings=16, **tower),
                          vision_config=dict(image_size=32, patch_size=8, **tower))
    torch.manual_seed(0)
    SiglipModel(config).save_pretrained(folder)
    SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}),
                    tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_text_image_score_of_a_coco_set_is_the_mean_cosine_of_each_sample_with_its_caption(coco, tmp_path):
    from fae_fast.eval.text_image import TextImageScorer, text_image_score

    prompts = coco_prompts(coco["annotations"], coco["images"], count=COUNT)
    model = save_tiny_siglip(tmp_path / "siglip", [w for p in prompts for w in p.caption.split()])
    args = [f"--samples={coco['whole']}", "--batch=4", "--workers=0", "--prc=false", "--isc=false",
            f"--text_image_model={model}", f"--out={tmp_path / 'metrics.json'}"]
    record = evaluate.main(args, extractor=RandomConv())
    scorer = TextImageScorer.load(str(model))
    images = read_npz(coco["whole"])[0]
    cosines = [scorer.similarities(images[i:i + 1], [p.caption])[0].item() for i, p in enumerate(prompts)]
    assert record["text_image_score"] == pytest.approx(100 * np.mean(cosines), rel=1e-4, abs=1e-4)
    shuffled = text_image_score(scorer, [images], [p.caption for p in prompts[1:] + prompts[:1]])
    assert abs(shuffled - record["text_image_score"]) > 1e-3  # the score reads each sample with its own caption
    assert json.loads((tmp_path / "metrics.json").read_text())["text_image_model"] == str(model)


def test_text_image_score_needs_a_coco_set_and_a_model_before_any_work(coco, tmp_path):
    with pytest.raises(UsageError, match="--text_image_model scores samples against their captions: it needs a "
                                         "COCO set"):
        evaluate.main([f"--samples={coco['whole']}", f"--ref={coco['images']}", "--text_image_model=x"],
                      extractor=RandomConv())
    extractor = RandomConv()
    with pytest.raises(FileNotFoundError, match=r"--text_image_model='.*nope' is not a SigLIP / SigLIP 2 checkpoint"):
        evaluate.main([f"--samples={coco['whole']}", f"--text_image_model={tmp_path / 'nope'}"], extractor=extractor)
    assert extractor.calls == 0
