"""Sources of training latents for train_gen.py: the embedded toy set, random latents for benchmarks.

A source yields this rank's share of the global batch for a given step: `batch(step) -> (x, y)` with
x (B_local, T, C) float32 and y (B_local,) int64 on the training device. The toy and synthetic sources
are pure functions of (seed, step, rank), so a resumed run sees exactly the batches it would have seen.
"""
import torch

from fae_fast.config import DataConfig, LatentModel
from fae_fast.data.toy import ToyLatents
from fae_fast.seeding import step_generator


class ToySource:
    """Class-conditional Gaussian mixture latents (fae_fast.data.toy), generated on the fly."""

    def __init__(self, data: DataConfig, model: LatentModel, *, rank: int, world: int, device):
        self.toy = ToyLatents(model.num_classes, model.grid * model.grid, model.in_channels, seed=data.seed)
        self.seed, self.rank, self.device = data.seed, rank, device
        self.local_batch = data.global_batch // world

    def batch(self, step: int):
        x, y = self.toy.batch(self.local_batch, step_generator(self.seed, step, self.rank, "data"))
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ToyCaptionSource(ToySource):
    """The toy latents with the caption embeddings of their class, each in a wording drawn per sample
    (fae_fast.data.toy_captions): the condition of a text-conditioned model (TextGeneratorConfig)."""

    def __init__(self, data: DataConfig, model, *, rank: int, world: int, device):
        if not hasattr(model, "text_dim"):
            raise ValueError("data.source=toy_captions gives caption embeddings, which only a text-conditioned "
                             "model takes; use --recipe t2i-demo or data.source=toy")
        super().__init__(data, model, rank=rank, world=world, device=device)
        self.model = model

    def batch(self, step: int):
        from fae_fast.data.toy_captions import caption_conditions

        g = step_generator(self.seed, step, self.rank, "data")
        x, y = self.toy.batch(self.local_batch, g)
        wordings = torch.randint(0, 1 << 16, y.shape, generator=g)
        text = caption_conditions(self.model, y, wordings)
        return x.to(self.device, non_blocking=True), text.to(self.device, non_blocking=True)


class SyntheticSource:
    """Random latents and labels made once on the device: measures the step, not the data path."""

    def __init__(self, data: DataConfig, model: LatentModel, *, rank: int, world: int, device):
        g = torch.Generator().manual_seed(data.seed + rank)
        B, T = data.global_batch // world, model.grid * model.grid
        self.x = torch.randn(B, T, model.in_channels, generator=g).to(device)
        self.y = torch.randint(0, model.num_classes, (B,), generator=g).to(device)

    def batch(self, step: int):
        return self.x, self.y

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def make_source(data: DataConfig, model: LatentModel, *, rank: int, world: int, device):
    """The latent source a DataConfig names."""
    if data.global_batch % world:
        raise ValueError(f"data.global_batch={data.global_batch} does not divide by {world} ranks; "
                         f"use a multiple of {world}")
    sources = {"toy": ToySource, "toy_captions": ToyCaptionSource, "synthetic": SyntheticSource}
    if data.source == "cache":
        from fae_fast.data.latent_cache import LatentCacheSource

        if not data.path:
            raise ValueError("data.source=cache needs data.path: the --out folder of training/extract_latents.py "
                             "(--images for class labels, --captions for a text model); or data.source=toy / "
                             "synthetic to run without data")
        sources["cache"] = LatentCacheSource
    if data.source not in sources:
        raise ValueError(f"data.source={data.source!r} is not one of: toy, toy_captions, synthetic, cache")
    return sources[data.source](data, model, rank=rank, world=world, device=device)
