"""Conditioning: what a generator is conditioned on, its null (unconditional) value, and its dropout for
classifier-free guidance, in one piece that the training loop, the samplers and guidance go through
without knowing the kind. Guidance batches a condition with its null (`torch.cat([c, null(c)])`), so any
kind whose values stack along dim 0 works: class labels (B,) today, text embeddings (B, L, D) next.
"""
import torch

from fae_fast.eval.protocol import index_labels


def draw_dropped(conditioning, batch: int, device, generator: torch.Generator | None) -> torch.Tensor | None:
    """Which samples of a batch lose their condition, bool (B,): one uniform draw per sample from `generator`,
    below `conditioning.dropout`; None, and nothing drawn, without dropout."""
    if conditioning.dropout <= 0:
        return None
    return torch.rand(batch, device=device, generator=generator) < conditioning.dropout


def replace_dropped(conditioning, condition: torch.Tensor, dropped: torch.Tensor | None) -> torch.Tensor:
    """`condition` with the samples marked in `dropped` (draw_dropped) replaced by `conditioning.null`."""
    if dropped is None:
        return condition
    return torch.where(dropped.view(-1, *[1] * (condition.dim() - 1)), conditioning.null(condition), condition)


def drop_to_null(conditioning, condition: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """`condition` with each sample (along dim 0) replaced by `conditioning.null` with probability
    `conditioning.dropout`, one uniform draw per sample from `generator`."""
    dropped = draw_dropped(conditioning, condition.shape[0], condition.device, generator)
    return replace_dropped(conditioning, condition, dropped)


class ClassLabels:
    """Class labels (B,) int64 in [0, num_classes); the null label is num_classes (the embedding table has
    num_classes + 1 rows). Training replaces each label by the null one with probability `dropout`."""

    def __init__(self, num_classes: int, dropout: float = 0.0):
        self.num_classes, self.dropout = num_classes, dropout

    @property
    def null_label(self) -> int:
        return self.num_classes

    def null(self, condition: torch.Tensor) -> torch.Tensor:
        """The null condition for every sample of `condition`."""
        return torch.full_like(condition, self.null_label)

    def drop(self, condition: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Each sample's condition replaced by the null one with probability `dropout` (training only)."""
        return drop_to_null(self, condition, generator)

    def for_indices(self, seed: int, indices: torch.Tensor, mode: str = "balanced") -> torch.Tensor:
        """The condition of evaluation samples `indices` (B,): a pure function of (seed, index), so a sample
        set does not depend on how it was split over batches and GPUs ('balanced': index mod K; 'random':
        uniform from the label stream; fae_fast.eval.protocol.index_labels)."""
        return index_labels(seed, indices, self.num_classes, mode)


class TextEmbeddings:
    """Caption token embeddings (B, L, D) of a frozen text tower (fae_fast/text.py); the null caption is all
    zeros (the model learns what it means: its projection's bias). Training replaces each caption by the null
    one with probability `dropout`."""

    def __init__(self, dropout: float = 0.0):
        self.dropout = dropout

    def null(self, condition: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(condition)

    def drop(self, condition: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return drop_to_null(self, condition, generator)

    def for_indices(self, seed: int, indices: torch.Tensor, mode: str = "balanced") -> torch.Tensor:
        raise ValueError("a text-conditioned generator samples from captions, not from class-label indices; "
                         "pass the captions' embeddings (fae_fast.text.FrozenTextEncoder) as the condition")
