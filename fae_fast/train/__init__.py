"""What the training programs share: process groups, progress and health guards (runtime), DCP checkpoints
with checksums (checkpoint), and per-block compile + FSDP2 (parallelize)."""
