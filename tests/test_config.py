import pytest

from fae_fast.cli import UsageError, apply_overrides
from fae_fast.config import (GenTrainConfig, encoder_config, fae_config, generator_config, recipe, validate_encoder,
                             validate_fae, validate_generator)


def test_overrides_set_nested_fields_with_their_types():
    cfg = apply_overrides(GenTrainConfig(), [
        "--model.depth=4", "--run.compile=false", "--optim.lr=2e-4", "--optim.betas=(0.9, 0.95)",
        "--sampler.cfg=[(0.3, 1.0, 2.5)]", "--data.path=/tmp/latents",
    ])
    assert cfg.model.depth == 4 and cfg.run.compile is False and cfg.optim.lr == 2e-4
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.sampler.cfg == [(0.3, 1.0, 2.5)]
    assert cfg.data.path == "/tmp/latents"


@pytest.mark.parametrize("bad, needle", [
    ("--model.dept=4", "has no field 'dept'"),
    ("--modle.depth=4", "has no section 'modle'"),
    ("--run.compile=maybe", "expected true or false"),
    ("model.depth=4", "is not an option"),
    ("--model.depth=four", "--model.depth=four"),
])
def test_bad_overrides_name_the_problem(bad, needle):
    with pytest.raises(UsageError, match=needle):
        apply_overrides(GenTrainConfig(), [bad])


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="unknown recipe 'lightning'.*lightningdit-xl-80ep"):
        recipe("lightning")
    with pytest.raises(ValueError, match="unknown generator size 'DiT-XL/2'.*SiT-XL/1"):
        generator_config("DiT-XL/2")
    with pytest.raises(ValueError, match="unknown FAE size"):
        fae_config("FAE-huge")
    with pytest.raises(ValueError, match="unknown encoder size"):
        encoder_config("DINOv3")


def test_paper_recipes():
    cfg = recipe("lightningdit-xl-80ep")
    assert (cfg.model.depth, cfg.model.width, cfg.model.heads) == (28, 1152, 16)
    assert cfg.model.norm == "rms" and cfg.model.mlp == "swiglu" and cfg.model.rope
    assert cfg.data.global_batch == 512 and cfg.run.steps == 200_000
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.9, 0.999) and cfg.optim.schedule == "constant"
    assert cfg.optim.warmup_steps == 0 and cfg.transport.time_shift == 0.4
    assert recipe("lightningdit-xl-800ep").run.steps == 2_000_000
    assert recipe("sit-xl-80ep").model.norm == "layer"


def test_configs_that_cannot_work_are_rejected():
    with pytest.raises(ValueError, match="width 1000 is not divisible by heads 16"):
        validate_generator(generator_config("SiT-XL/1", width=1000))
    with pytest.raises(ValueError, match="not divisible by heads"):
        validate_fae(fae_config("FAE-DINOv2-g", dec_heads=25))
    with pytest.raises(ValueError, match="set encoder.image_size=224"):
        validate_encoder(encoder_config("DINOv2-g/14", image_size=256), grid=16)
