"""Linear probe (fae_fast.eval.probe): high accuracy on a linearly separable set, chance on random labels
(while fitting its own training labels, so a probe scored on training data would be caught), and the
same on a latent cache read from disk.

Bounds: 1000 held-out images of 10 classes; chance is 0.1 with a standard deviation of 0.0095, so the
random-label accuracy must lie within 0.05 (five standard deviations) of it.
"""
import pytest
import torch

from fae_fast.data.latent_cache import write_cache
from fae_fast.eval.probe import holdout_split, linear_probe, pool_features, probe_cache

K, T, C = 10, 16, 16


pytestmark = pytest.mark.usefixtures("one_thread")


def separable(n: int, seed: int):
    """Latents (n, T, C): a class mean per class plus unit noise; classes differ in every token."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(K, T, C, generator=torch.Generator().manual_seed(123))
    y = torch.randint(0, K, (n,), generator=g)
    return means[y] + torch.randn(n, T, C, generator=g), y


def test_separable_latents_are_probed_near_perfectly():
    (tx, ty), (vx, vy) = separable(2000, 0), separable(1000, 1)
    result = linear_probe(tx, ty, vx, vy, epochs=10, batch_size=256, lr=3e-3, device="cpu")
    assert result.top1 > 0.97 and result.num_test == 1000


def test_random_labels_give_chance_on_held_out_images():
    g = torch.Generator().manual_seed(0)
    tx, vx = torch.randn(500, T, C, generator=g), torch.randn(1000, T, C, generator=g)
    ty, vy = torch.randint(0, K, (500,), generator=g), torch.randint(0, K, (1000,), generator=g)
    result = linear_probe(tx, ty, vx, vy, epochs=60, batch_size=100, lr=3e-3, weight_decay=0.0, device="cpu")
    assert result.train_top1 > 0.9  # 256 features memorise 500 random labels
    assert abs(result.top1 - 1 / K) < 0.05


def test_pooling_choices():
    x = torch.randn(3, T, C)
    assert pool_features(x, "flatten").shape == (3, T * C)
    torch.testing.assert_close(pool_features(x, "mean"), x.mean(1))
    with pytest.raises(ValueError, match="pool='max'"):
        pool_features(x, "max")


def test_probe_of_a_cache_uses_a_held_out_split(tmp_path):
    x, y = separable(600, 2)
    latents = torch.stack([x, x.flip(1)], 1).numpy()  # (N, 2, T, C); the twin is not used by the probe
    write_cache(tmp_path, latents, y.numpy(), shard_size=128)
    train, test = holdout_split(600, 0.25, seed=0)
    assert len(test) == 150 and not set(train) & set(test) and len(train) + len(test) == 600
    result = probe_cache(str(tmp_path), holdout=0.25, epochs=10, batch_size=128, lr=3e-3, device="cpu")
    assert (result.num_train, result.num_test) == (450, 150) and result.top1 > 0.95
