"""Scaling of the generator training step over the GPUs of one host: the fae_fast step (fused kernels,
per-block compile, FSDP2) at batch 128 per GPU on 1, 2, 4 and 8 GPUs (as many as the machine has), in one
call, printing images/s per GPU and the scaling efficiency against 1 GPU measured in the same call.

    python benchmarks/scaling.py [--size LightningDiT-XL/1] [--batch 128] [--steps 20]

NVLink multicast (NVLS) stays off: it is switched off in the environment of every launched process.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import child_env  # noqa: E402


def run(n: int, args) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               str(Path(__file__).with_name("train_step.py")), "--provider", "fae_fast", "--size", args.size,
               "--batch", str(args.batch), "--steps", str(args.steps), "--out", out.name]
        subprocess.run(cmd, check=True, env=child_env())
        return json.loads(out.read().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="LightningDiT-XL/1")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    counts = [n for n in (1, 2, 4, 8) if n <= torch.cuda.device_count()]
    results = [run(n, args) for n in counts]
    base = results[0]["images_per_s_per_gpu"]
    print(f"\n{args.size}, batch {args.batch} per GPU, {results[0]['gpu']}, NCCL: "
          + ", ".join(f"{k}={v}" for k, v in NCCL_SAFE.items()))
    print("| GPUs | images/s per GPU | images/s total | scaling efficiency | MFU |")
    print("|---|---|---|---|---|")
    for r in results:
        ips = r["images_per_s_per_gpu"]
        print(f"| {r['world']} | {ips:.0f} | {ips * r['world']:.0f} | {ips / base:.3f} | {r['mfu']:.3f} |")


if __name__ == "__main__":
    main()
