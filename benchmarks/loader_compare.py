"""The image loaders side by side in one run: throughput (images/s, CPU cores) of each backend, and how far
their pixels lie from each other's on the same files.

    python benchmarks/loader_compare.py --out DIR                     # a GPU machine
    python benchmarks/loader_compare.py --out DIR --device cpu --files 16 --repeats 1 --batch 8 --epochs 1

Throughput: as benchmarks/test_bench_data.py measures it (same config, workers and CPU-seconds method),
on its ImageNet-like JPEGs (`--files` of them listed `--repeats` times) plus the odd files of ImageNet
(gray, CMYK, PNG named .JPEG, large, small, truncated: skipped with a warning by every loader), one
warm-up epoch, then `--epochs` timed ones; images/s from the median epoch.
Agreement: the odd files and 32 plain ones in one sorted, unshuffled, unflipped batch (the ADM centre
crop is deterministic) through each backend; for each pair, the mean and max |difference| in 0..255
units of `pixels` (256 px) and `encoder_pixels` (224 px), the worst file and the max per file kind.
Prints two tables and writes DIR/loader_compare.json with them, the GPU, torch and DALI versions.
"""
import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from fae_fast.data.dali import unavailable as dali_unavailable
from fae_fast.data.images import ImageDataConfig, make_image_loader
from fae_fast.data.synthetic import write_imagenet_like, write_odd_files
from test_bench_data import BACKENDS, _cpu_seconds  # this file's folder is sys.path[0] when run as a script

WORKERS = dict(p.values for p in BACKENDS)  # {backend: workers} as the throughput benchmark chooses them
COMPARED_PLAIN = 32


def write_data(root: str, files: int) -> dict[str, str]:
    """ImageNet-like JPEGs and the odd files under root; {path relative to root: kind}."""
    paths = write_imagenet_like(root, classes=min(8, files), per_class=max(1, files // 8), noise=24.0)
    odd = write_odd_files(os.path.join(root, "odd"))
    kinds = {os.path.relpath(p, root): "plain" for p in paths}
    return kinds | {os.path.relpath(p, root): kind for kind, p in odd.items()}


def write_listing(path: str, rels: list[str], repeats: int) -> str:
    with open(path, "w") as f:
        for r in range(repeats):
            f.writelines(f"{rel} {r}\n" for rel in rels)
    return path


def make_loader(root: str, listing: str, backend: str, device: str, batch: int, *, compare: bool = False):
    cfg = ImageDataConfig(root=root, file_list=listing, batch_size=batch, image_size=256, encoder_size=224,
                          random_flip=not compare, shuffle=not compare, backend=backend, workers=WORKERS[backend])
    return make_image_loader(cfg, device=device)


def run_epoch(loader, device: str) -> int:
    images = sum(len(batch["encoder_pixels"]) for batch in loader)  # rows of skipped files are absent
    if device == "cuda":
        torch.cuda.synchronize()
    return images


def throughput(loader, device: str, epochs: int) -> dict:
    run_epoch(loader, device)  # workers started, pipeline built, resampling weights cached
    cpu0, wall0, times, images = _cpu_seconds(), time.perf_counter(), [], 0
    for _ in range(epochs):
        start = time.perf_counter()
        images = run_epoch(loader, device)
        times.append(time.perf_counter() - start)
    cores = (_cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
    return {"images_per_epoch": images, "images_per_s": images / statistics.median(times), "cores": cores,
            "epoch_s": times, "skipped": sorted(loader.skipped)}


def load_all(loader) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{relative path: (pixels (3, 256, 256), encoder_pixels (3, 224, 224)) on the CPU} of one epoch."""
    out = {}
    for batch in loader:
        for i, pix, enc in zip(batch["indices"].tolist(), batch["pixels"].cpu(), batch["encoder_pixels"].cpu()):
            out[loader.images.paths[i].decode()] = (pix, enc)
    return out


def agreement(a: dict, b: dict, kinds: dict[str, str]) -> dict:
    """Mean and max |a - b| in 0..255 units over the files both loaded, the worst file, the max per kind."""
    files = sorted(a.keys() & b.keys())
    diff = {f: [(x - y).abs().mul_(255) for x, y in zip(a[f], b[f])] for f in files}  # f: [256 px, 224 px]
    worst = max(files, key=lambda f: diff[f][0].max().item())
    per_kind = {}
    for f in files:
        per_kind[kinds[f]] = max(per_kind.get(kinds[f], 0.0), diff[f][0].max().item())
    stats = {"files": len(files), "worst_file": worst, "worst_kind": kinds[worst],
             "worst_max": diff[worst][0].max().item(), "max_by_kind": per_kind}
    for k, name in enumerate(("pixels", "encoder_pixels")):
        stats[f"{name}_mean"] = statistics.mean(diff[f][k].mean().item() for f in files)
        stats[f"{name}_max"] = max(diff[f][k].max().item() for f in files)
    return stats


def versions(device: str) -> dict:
    dali = None
    if dali_unavailable() is None:
        import nvidia.dali

        dali = nvidia.dali.__version__
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none (--device cpu)"
    return {"gpu": gpu, "torch": torch.__version__, "dali": dali}


def print_tables(report: dict) -> None:
    print(f"\n{report['versions']}\n{'backend':<16}{'workers':>8}{'images/s':>10}{'cores':>7}  skipped")
    for name, r in report["throughput"].items():
        if "unavailable" in r:
            print(f"{name:<16}  unavailable: {r['unavailable']}")
        else:
            print(f"{name:<16}{r['workers']:>8}{r['images_per_s']:>10.0f}{r['cores']:>7.1f}  {len(r['skipped'])} files")
    print(f"\n{'pair (0..255)':<26}{'256 mean':>9}{'256 max':>8}{'224 mean':>9}{'224 max':>8}  worst file (kind)")
    for pair, s in report["agreement"].items():
        print(f"{pair:<26}{s['pixels_mean']:>9.3f}{s['pixels_max']:>8.1f}{s['encoder_pixels_mean']:>9.3f}"
              f"{s['encoder_pixels_max']:>8.1f}  {s['worst_file']} ({s['worst_kind']}); max by kind "
              + ", ".join(f"{k} {v:.0f}" for k, v in sorted(s["max_by_kind"].items())))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for loader_compare.json (created if missing)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where the loaders put batches")
    parser.add_argument("--files", type=int, default=512, help="distinct plain JPEGs (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=8, help="times the files are listed (default %(default)s)")
    parser.add_argument("--batch", type=int, default=256, help="throughput batch size (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up (default %(default)s)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available, and dali and torchvision_gpu are measured on the GPU; "
                     "run on a GPU machine, or pass --device cpu for a CPU-only smoke run")
    os.makedirs(args.out, exist_ok=True)
    report = {"versions": versions(args.device), "args": vars(args), "throughput": {}, "agreement": {}}
    loaded = {}
    with tempfile.TemporaryDirectory() as root:
        kinds = write_data(root, args.files)
        bench = write_listing(os.path.join(root, "bench.txt"), sorted(kinds), args.repeats)
        plain = sorted(f for f in kinds if kinds[f] == "plain")
        compared = sorted(f for f in kinds if kinds[f] != "plain") + plain[:COMPARED_PLAIN]
        compare = write_listing(os.path.join(root, "compare.txt"), compared, 1)
        for backend in WORKERS:
            if backend == "dali" and dali_unavailable() is not None:
                report["throughput"][backend] = {"unavailable": dali_unavailable()}
                print(f"dali skipped: {dali_unavailable()}", file=sys.stderr)
                continue
            loader = make_loader(root, bench, backend, args.device, args.batch)
            report["throughput"][backend] = {"workers": WORKERS[backend]} | throughput(loader, args.device, args.epochs)
            check = make_loader(root, compare, backend, args.device, len(compared), compare=True)
            loaded[backend] = load_all(check)
            report["throughput"][backend]["compare_skipped"] = sorted(check.skipped)
            del loader  # its worker processes go before the next backend is timed
    for a, b in itertools.combinations(loaded, 2):
        report["agreement"][f"{a} vs {b}"] = agreement(loaded[a], loaded[b], kinds)
    print_tables(report)
    with open(os.path.join(args.out, "loader_compare.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {os.path.join(args.out, 'loader_compare.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
