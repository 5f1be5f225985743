"""Image sources of FAE training (training/train_fae.py): `batch(step) -> (pixels (B, 3, S, S), encoder_pixels
(B, 3, E, E))`, floats in [0, 1] on the device, with the state a checkpoint keeps. Generated images (a pure
function of the step, nothing to keep) or an ImageNet-layout folder through fae_fast.data.images (the
loader's position is the state).
"""
import math

import torch

from fae_fast.data.images import ImageDataConfig, finish_batch, make_image_loader
from fae_fast.fae_config import FAETrainConfig
from fae_fast.seeding import step_generator


class SyntheticImages:
    """A fixed set of smooth random images (six plane waves per channel around grey), rendered on the
    device; the batch of step s on rank r is drawn by a generator seeded by (data.seed, s, r), so the
    source is a pure function of the step and needs no state to resume."""

    def __init__(self, cfg: FAETrainConfig, *, rank: int, world: int, device: torch.device):
        data, g = cfg.data, torch.Generator().manual_seed(cfg.data.seed)
        n, waves = data.synthetic_images, 6
        self.freq = (1 + 5 * torch.rand(n, waves, 2, generator=g)).to(device)  # cycles per image side
        self.phase = (2 * math.pi * torch.rand(n, waves, generator=g)).to(device)
        self.amp = (0.05 + 0.15 * torch.rand(n, waves, 3, generator=g)).to(device)
        self.data, self.rank, self.device = data, rank, device
        self.size, self.encoder_size = cfg.fae.image_size, cfg.encoder.image_size
        self.local_batch = data.global_batch // world

    def render(self, idx: torch.Tensor) -> torch.Tensor:
        """Images `idx` (B,) -> uint8 (B, 3, S, S), quantised like decoded files."""
        pos = torch.arange(self.size, device=self.device) / self.size
        f, ph = self.freq[idx], self.phase[idx]  # (B, K, 2), (B, K)
        cycles = f[..., 0, None, None] * pos[None, :] + f[..., 1, None, None] * pos[:, None]  # (B, K, S, S)
        arg = 2 * math.pi * cycles + ph[..., None, None]
        img = 0.5 + torch.einsum("bkc,bkhw->bchw", self.amp[idx], torch.sin(arg))  # (B, 3, S, S)
        return (img.clamp(0, 1) * 255).round().to(torch.uint8)

    def batch(self, step: int):
        g = step_generator(self.data.seed, step, self.rank, "images")  # not the noise stream
        idx = torch.randint(len(self.freq), (self.local_batch,), generator=g)
        flip = (torch.rand(self.local_batch, generator=g) < 0.5) & self.data.random_flip
        idx, flip = idx.to(self.device), flip.to(self.device)
        out = finish_batch(self.render(idx), idx, idx, flip, encoder_size=self.encoder_size, twins=False)
        return out["pixels"], out["encoder_pixels"]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FolderImages:
    """An ImageNet-layout folder through fae_fast.data.images, epoch after epoch; the loader's position is
    the checkpointed state."""

    def __init__(self, cfg: FAETrainConfig, *, rank: int, world: int, device: torch.device):
        data = cfg.data
        self.loader = make_image_loader(
            ImageDataConfig(root=data.root, split=data.split, batch_size=data.global_batch // world,
                            image_size=cfg.fae.image_size, encoder_size=cfg.encoder.image_size,
                            random_flip=data.random_flip, shuffle=True, backend=data.backend, workers=data.workers,
                            seed=data.seed, exclude_list=data.exclude_list, on_error=data.on_error),
            rank=rank, world=world, device=device)
        self._it = None

    def batch(self, step: int):
        for _ in range(2):  # the end of an epoch: start the next one
            if self._it is None:
                self._it = iter(self.loader)
            out = next(self._it, None)
            if out is not None:
                return out["pixels"], out["encoder_pixels"]
            self._it = None
        raise RuntimeError(f"{self.loader.cfg.root} has fewer images ({self.loader.num_images}) than one global batch; "
                           f"lower data.global_batch or add images")

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._it = None


def make_image_source(cfg: FAETrainConfig, d):
    if cfg.data.global_batch % d.world:
        raise ValueError(f"data.global_batch={cfg.data.global_batch} does not divide by {d.world} ranks; "
                         f"use a multiple of {d.world}")
    kind = SyntheticImages if cfg.data.source == "synthetic" else FolderImages
    return kind(cfg, rank=d.rank, world=d.world, device=d.device)
