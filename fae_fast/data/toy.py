"""An embedded toy latent data set whose class-conditional distribution is known exactly.

Class c is a Gaussian N(m_c, A_c A_c^T + s^2 I) over the flattened (T * C) latent: a random mean, a
low-rank covariance and a small isotropic floor, all drawn from a fixed seed (no files). Because the
true distribution is known, a trained generator is scored by the Frechet distance between its samples
and the true per-class and overall (mixture) moments.
"""
import torch

from fae_fast.eval.frechet import LowRankGaussian


class ToyLatents:
    """Class-conditional Gaussian latents of shape (T, C), drawn deterministically from (seed, step, rank)."""

    def __init__(self, num_classes: int, tokens: int, channels: int, *, rank: int = 4, floor: float = 0.1,
                 seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.num_classes, self.tokens, self.channels = num_classes, tokens, channels
        dim = tokens * channels
        self.means = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)  # (K, d)
        self.factors = 0.5 * torch.randn(num_classes, dim, rank, generator=g, dtype=torch.float64)  # (K, d, r)
        self.floor = floor

    @property
    def dim(self) -> int:
        return self.tokens * self.channels

    def covariance(self, label: int) -> torch.Tensor:
        a = self.factors[label]
        return a @ a.T + self.floor**2 * torch.eye(self.dim, dtype=torch.float64)

    def mixture_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of the class-balanced mixture: E[cov] + Cov[mean]."""
        mean = self.means.mean(0)
        centred = self.means - mean
        cov = sum(self.covariance(k) for k in range(self.num_classes)) / self.num_classes
        return mean, cov + centred.T @ centred / self.num_classes

    def reference(self, label: int) -> LowRankGaussian:
        """Class `label`'s true Gaussian, in the form that scores samples against it fast."""
        return LowRankGaussian(self.means[label], self.factors[label], self.floor)

    def mixture_reference(self) -> LowRankGaussian:
        """The mixture's moments (`mixture_moments`) as a low-rank Gaussian: its covariance is floor^2 I plus
        the classes' factors and the centred means, each over sqrt(K)."""
        mean = self.means.mean(0)
        spread = torch.cat([*self.factors, (self.means - mean).T], dim=1) / self.num_classes**0.5
        return LowRankGaussian(mean, spread, self.floor)

    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Latents (B, T, C) float32 for the given labels (B,), on the CPU."""
        B = labels.shape[0]
        r = self.factors.shape[-1]
        u = torch.randn(B, r, 1, generator=generator, dtype=torch.float64)
        e = torch.randn(B, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[labels] + (self.factors[labels] @ u).squeeze(-1) + self.floor * e
        return x.float().view(B, self.tokens, self.channels)

    def batch(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents (B, T, C), labels (B,)) with uniformly drawn labels."""
        labels = torch.randint(0, self.num_classes, (batch,), generator=generator)
        return self.sample(labels, generator), labels
