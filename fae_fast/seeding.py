"""The one seed formula of fae_fast: every random draw of a training step comes from a generator seeded by
(run seed, step, rank, stream), so a resumed run draws exactly what an uninterrupted one would, and the
streams of one step (its data, its noise, its generated images) never share a seed."""
import torch

STREAMS = {"data": 0, "noise": 7, "images": 7 + 0x5EED}
"""Offsets that keep the streams apart (chosen so that runs written before this module draw the same)."""


def step_seed(seed: int, step: int, rank: int, stream: str) -> int:
    """Integer seed of (seed, step, rank) in one of STREAMS."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; one of {', '.join(STREAMS)}")
    return seed * 1_000_003 + step * 1009 + rank + STREAMS[stream]


def step_generator(seed: int, step: int, rank: int, stream: str, device="cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded by step_seed."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, rank, stream))
