"""Frechet distance between Gaussians: |m1 - m2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2).

Computed in float64 with symmetric eigendecompositions (no scipy): S1^1/2 S2 S1^1/2 is symmetric PSD,
so the trace of its square root is the sum of the square roots of its eigenvalues.
"""
import torch


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mean1, cov1, mean2, cov2) -> float:
    mean1, cov1, mean2, cov2 = (t.double() for t in (mean1, cov1, mean2, cov2))
    root1 = _sqrtm_psd(cov1)
    cross = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp(min=0).sqrt().sum()
    return float((mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2 * cross)


def moments(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (d,) and unbiased covariance (d, d) of samples (N, d), in float64."""
    x = samples.double().flatten(1)
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


class LowRankGaussian:
    """N(mean, F F^T + floor^2 I) with F (d, k), k << d: the toy latents' classes and their mixture. Its
    Frechet distance to a set of n samples is computed exactly without any d x d matrix, so scoring
    16x16x32 latents (d = 8192) takes a second instead of minutes of d x d eigendecompositions:

        the covariance's root R = floor I + U diag(sqrt(s^2 + floor^2) - floor) U^T   (F = U diag(s) V^T),
        tr (R S R)^1/2 with S = C^T C / (n - 1) (C the centred samples) = the sum of the square roots of the
        eigenvalues of the n x n (or d x d, whichever is smaller) Gram matrix of A = C R / sqrt(n - 1).
    """

    def __init__(self, mean: torch.Tensor, factor: torch.Tensor, floor: float):
        self.mean, self.factor, self.floor = mean.double(), factor.double(), float(floor)
        basis, singular, _ = torch.linalg.svd(self.factor, full_matrices=False)
        self.basis = basis
        self.root_gain = (singular.square() + self.floor**2).sqrt() - self.floor
        self.trace = float(singular.square().sum() + self.floor**2 * mean.numel())

    def covariance(self) -> torch.Tensor:
        """The d x d covariance (for tests and small d)."""
        eye = torch.eye(self.mean.numel(), dtype=torch.float64)
        return self.factor @ self.factor.T + self.floor**2 * eye

    def frechet_distance(self, samples: torch.Tensor) -> float:
        """Frechet distance of samples (n, ...) to this Gaussian, computed on the samples' device; equal to
        `frechet_distance(*moments(samples), mean, covariance())`."""
        x = samples.double().flatten(1)
        n = x.shape[0]
        mean, basis, gain = (t.to(x.device) for t in (self.mean, self.basis, self.root_gain))
        sample_mean = x.mean(0)
        centred = x - sample_mean
        a = (self.floor * centred + ((centred @ basis) * gain) @ basis.T) / (n - 1) ** 0.5  # C R / sqrt(n - 1)
        gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
        cross = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().sum()
        sample_trace = centred.square().sum() / (n - 1)
        return float((sample_mean - mean).square().sum() + sample_trace + self.trace - 2 * cross)
