"""Writing a caption cache: per image-caption pair, the FAE latents of the image and of its flipped twin and
the caption's token embeddings from the frozen text tower (format 2 of fae_fast/data/latent_cache.py, which
reads it back and hands the embeddings to a text-conditioned generator as its condition).

    writer = TextCacheWriter(out, num_pairs=len(pairs), shard_size=1024, tokens=256, channels=32,
                             text_length=64, text_dim=1152)
    for batch in batches_of(writer.todo(rank, world)):   # TextBatch: pairs, latents, text, text_length, skipped
        writer.put(batch)
    writer.close()
    index = writer.finish()   # once every shard is on disk (rank 0): stats.json, then index.json

Shard k is planned for pairs [k * shard_size, (k + 1) * shard_size) of the caption shards
(caption_shards.CaptionShards numbers them) and written the way class caches are: under '.tmp' names, renamed
when complete, latents last; `todo()` lists the shards not on disk, so a resumed run redoes only those.
A pair the reader left out (its batch's `skipped`) is accounted for and not stored.
"""
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np

from fae_fast.data import latent_cache as lc


class TextBatch(NamedTuple):
    """What the writer stores of one batch of pairs."""

    pairs: np.ndarray
    """(n,) int64 pair indices, increasing."""
    latents: np.ndarray
    """(n, 2, T, C): the FAE latent mean of each image and of its flipped twin."""
    text: np.ndarray
    """(n, L, D): each caption's token embeddings (stored float16)."""
    text_length: np.ndarray
    """(n,): each caption's tokens before the padding."""
    skipped: np.ndarray = np.zeros(0, dtype=np.int64)
    """Pair indices of this batch left out by the reader (image does not decode, empty caption)."""


def caption_lengths(text_encoder, captions: list[str]) -> np.ndarray:
    """Tokens of each caption before the padding, at most the encoder's max_length (int32): the attention
    mask of the tokenization fae_fast.text.FrozenTextEncoder runs."""
    if not captions:  # a batch whose pairs were all skipped (the tokenizer refuses an empty list)
        return np.zeros(0, dtype=np.int32)
    tokens = text_encoder.tokenizer(list(captions), padding="max_length", truncation=True,
                                    max_length=text_encoder.max_length, return_attention_mask=True,
                                    return_tensors="np")
    return tokens["attention_mask"].sum(1).astype(np.int32)


class TextCacheWriter:
    """Routes TextBatches into the shards they belong to, each shard written once (see the module docstring).
    The pairs of one shard must come together, in any number of batches; a batch may straddle shards."""

    def __init__(self, folder: str | Path, *, num_pairs: int, shard_size: int, tokens: int, channels: int,
                 text_length: int, text_dim: int, **provenance):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.meta = {"condition": "text", "num_pairs": num_pairs, "tokens": tokens, "channels": channels,
                     "dtype": "float16", "flips": True, "shard_size": shard_size, "text_length": text_length,
                     "text_dim": text_dim, "text_dtype": "float16", **provenance}
        self.condition = lc.condition_of(self.meta)
        self.plan = lc.plan_shards(num_pairs, shard_size)
        self.done = {s.k for s in self.plan if self.is_done(s)}  # on disk before this run: dropped if given again
        self.writer: lc.ShardWriter | None = None

    def is_done(self, shard: lc.Shard) -> bool:
        return lc.shard_done(self.folder, shard, self.meta["tokens"], self.meta["channels"], condition=self.condition)

    def todo(self, rank: int = 0, world: int = 1) -> list[lc.Shard]:
        """The shards of rank `rank` of `world` (shard k to rank k % world) not yet on disk."""
        return [s for s in self.plan if s.k % world == rank and s.k not in self.done]

    def put(self, batch: TextBatch) -> None:
        """Store one batch (float16), shard by shard; the rows of shards already on disk are dropped."""
        size = self.meta["shard_size"]
        pairs, skipped = np.asarray(batch.pairs, np.int64), np.asarray(batch.skipped, np.int64)
        for k in np.unique(np.r_[pairs // size, skipped // size]):
            if k in self.done:
                continue
            rows = np.flatnonzero(pairs // size == k)
            writer = self._writer(self.plan[k])
            if len(rows):
                writer.write(pairs[rows], batch.latents[rows].astype(np.float16), text=batch.text[rows].astype(
                    np.float16), text_length=batch.text_length[rows].astype(np.int32), pairs=pairs[rows])
            if len(left_out := skipped[skipped // size == k]):
                writer.skip(left_out)

    def _writer(self, shard: lc.Shard) -> lc.ShardWriter:
        """The open shard's writer; a new shard closes the previous one, which is then complete."""
        if self.writer is None or self.writer.shard.k != shard.k:
            self.close()
            T, C = self.meta["tokens"], self.meta["channels"]
            self.writer = lc.ShardWriter(self.folder, shard, T, C, self.condition)
        return self.writer

    def close(self) -> None:
        """Finish the open shard (checks that each of its pairs came once, stored or skipped)."""
        if self.writer is not None:
            self.writer.finish()
            self.done.add(self.writer.shard.k)
            self.writer = None

    def missing(self) -> list[lc.Shard]:
        """The shards not on disk (of every rank)."""
        return [s for s in self.plan if not self.is_done(s)]

    def finish(self) -> dict | None:
        """When every shard is on disk: stats.json and index.json (one process); None while shards are missing."""
        if self.missing():
            return None
        moments = [lc.shard_moments(self.folder / s.file) for s in self.plan]
        return lc.finish_cache(self.folder, self.plan, self.meta, moments)


def write_text_cache(folder: str | Path, batches: Iterable[TextBatch], *, num_pairs: int, shard_size: int,
                     tokens: int, channels: int, text_length: int, text_dim: int, **provenance) -> dict:
    """A complete caption cache from batches in pair order (one process). On a resumed cache, the batches of
    the shards already on disk are dropped unwritten (TextCacheWriter.todo() says which to make at all).
    Returns the index; raises naming the first missing shard when the batches left pairs out."""
    writer = TextCacheWriter(folder, num_pairs=num_pairs, shard_size=shard_size, tokens=tokens, channels=channels,
                             text_length=text_length, text_dim=text_dim, **provenance)
    lc.check_settings(writer.folder, writer.meta)
    for batch in batches:
        writer.put(batch)
    writer.close()
    index = writer.finish()
    if index is None:
        first = writer.missing()[0]
        last = first.start + first.count - 1
        raise ValueError(f"the batches never reached shard {first.k} (pairs {first.start}-{last}) of {folder}; give "
                         f"a batch for every pair of {num_pairs} (stored or skipped)")
    return index
