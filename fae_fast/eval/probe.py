"""Linear probe on FAE latents: the top-1 accuracy of a linear classifier on held-out images.

    python -m fae_fast.eval.probe --train /latents/train --val /latents/val      # ImageNet val as held out
    python -m fae_fast.eval.probe --train /latents/train --holdout 0.02          # a held-out slice of train

What is probed (our choice; the paper reports 86.17% top-1 for DINOv2-g latents without saying how it
pooled): the whole latent, flattened (16 x 16 x 32 = 8192 values), not its token mean. Mean-pooling
leaves 32 numbers per image and throws away where things are, so it measures the pooling more than the
latent; the flattened probe is the linear read-out of everything the generator sees. `pool="mean"` is
there for comparison. Each feature is standardised with the training split's mean and std (so one
learning rate fits every latent scale); the classifier is one nn.Linear trained with AdamW on
cross-entropy, minibatches, cosine learning-rate decay, on the GPU when there is one. Only the plain
latents are used (index 0 of each image's pair), not the flipped twins.
"""
import argparse
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class ProbeResult:
    top1: float
    """Top-1 accuracy on the held-out split."""
    train_top1: float
    """Top-1 accuracy on the training split (how well the probe fits)."""
    num_train: int
    num_test: int
    pool: str


def pool_features(latents: torch.Tensor, pool: str) -> torch.Tensor:
    """(N, T, C) -> (N, T*C) with 'flatten' or (N, C) with 'mean' over tokens."""
    if pool == "flatten":
        return latents.flatten(1)
    if pool == "mean":
        return latents.float().mean(1)
    raise ValueError(f"pool={pool!r} is not 'flatten' or 'mean'")


def _accuracy(model: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, mean, std, batch: int) -> float:
    correct = 0
    with torch.no_grad():
        for s in range(0, len(x), batch):
            logits = model((x[s:s + batch].float() - mean) / std)
            correct += int((logits.argmax(1) == y[s:s + batch]).sum())
    return correct / max(len(x), 1)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                 num_classes: int | None = None, pool: str = "flatten", epochs: int = 20, batch_size: int = 1024,
                 lr: float = 1e-3, weight_decay: float = 1e-4, device=None, seed: int = 0) -> ProbeResult:
    """Train a linear classifier on (train_x (N, T, C), train_y (N,)) and score it on the test split."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    xs = [pool_features(x, pool).to(device) for x in (train_x, test_x)]  # kept in their dtype (fp16 is fine)
    ys = [y.to(device=device, dtype=torch.long) for y in (train_y, test_y)]
    num_classes = num_classes or int(max(ys[0].max(), ys[1].max())) + 1
    mean, std = _standardiser(xs[0], batch_size)
    g = torch.Generator(device="cpu").manual_seed(seed)
    model = torch.nn.Linear(xs[0].shape[1], num_classes).to(device)
    with torch.no_grad():  # zero start: the problem is convex, so the result depends only on the data order
        model.weight.zero_()
        model.bias.zero_()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(xs[0]) / batch_size)
    total = epochs * steps_per_epoch
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(xs[0]), generator=g).to(device)
        rows = order[(step % steps_per_epoch) * batch_size:][:batch_size]
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
        loss = F.cross_entropy(model((xs[0][rows].float() - mean) / std), ys[0][rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return ProbeResult(top1=_accuracy(model, xs[1], ys[1], mean, std, batch_size),
                       train_top1=_accuracy(model, xs[0], ys[0], mean, std, batch_size),
                       num_train=len(xs[0]), num_test=len(xs[1]), pool=pool)


def _standardiser(x: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std (float64 sums, float32 result) of x (N, D), in batches."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    square = torch.zeros_like(total)
    for s in range(0, len(x), batch):
        part = x[s:s + batch].double()
        total += part.sum(0)
        square += part.square().sum(0)
    mean = total / len(x)
    var = (square / len(x) - mean.square()).clamp(min=0)
    return mean.float(), var.sqrt().clamp(min=1e-6).float()


def holdout_split(num_images: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) index arrays: a seeded random `fraction` of the images held out."""
    order = np.random.default_rng(seed).permutation(num_images)
    n_test = max(1, int(round(fraction * num_images)))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def cache_latents(path: str, images: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain (unflipped) latents (n, T, C) in the cache's dtype and labels (n,) of a latent cache."""
    from fae_fast.data.latent_cache import LatentCache

    cache = LatentCache(path)
    images = np.arange(cache.num_images) if images is None else images
    x = cache.gather(images, np.zeros(len(images), dtype=bool))
    return torch.from_numpy(x), torch.from_numpy(cache.labels[images])


def probe_cache(train: str, val: str = "", *, holdout: float = 0.02, max_train: int = 0, seed: int = 0,
                **probe_args) -> ProbeResult:
    """Linear probe of a cache: on `val` when given, else on a held-out `holdout` fraction of `train`.
    max_train > 0 probes a seeded random subset of that many training images (quick runs)."""
    from fae_fast.data.latent_cache import LatentCache

    n = LatentCache(train).num_images
    train_idx, test_idx = (np.arange(n), None) if val else holdout_split(n, holdout, seed)
    if max_train and max_train < len(train_idx):
        train_idx = np.sort(np.random.default_rng(seed + 1).choice(train_idx, max_train, replace=False))
    tx, ty = cache_latents(train, train_idx)
    vx, vy = cache_latents(val) if val else cache_latents(train, test_idx)
    return linear_probe(tx, ty, vx, vy, seed=seed, **probe_args)


def main(argv: list[str] | None = None) -> ProbeResult:
    p = argparse.ArgumentParser(description="Linear probe (top-1) on a latent cache")
    p.add_argument("--train", required=True, help="latent cache of the training images")
    p.add_argument("--val", default="", help="latent cache of held-out images (else --holdout of --train)")
    p.add_argument("--holdout", type=float, default=0.02)
    p.add_argument("--max-train", type=int, default=0)
    p.add_argument("--pool", default="flatten", choices=["flatten", "mean"])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    a = p.parse_args(argv)
    result = probe_cache(a.train, a.val, holdout=a.holdout, max_train=a.max_train, pool=a.pool, epochs=a.epochs,
                         batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay)
    print(f"linear probe ({result.pool}): top-1 {100 * result.top1:.2f}% on {result.num_test:,} held-out images "
          f"(train {100 * result.train_top1:.2f}% on {result.num_train:,})")
    return result


if __name__ == "__main__":
    main()
