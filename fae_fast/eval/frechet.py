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
