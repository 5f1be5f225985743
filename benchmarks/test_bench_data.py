"""Image loading throughput: images/s and CPU cores used per backend, batch 256, 256 px crops and their
224 px encoder resize, on generated ImageNet-shaped JPEGs (500x375 and friends, quality 90, ~110 kB).

    pytest benchmarks/test_bench_data.py --benchmark-json=data.json

512 files are written once per session and listed 8 times in a file list, so an epoch is 4096 images
(16 batches) read from the page cache: the numbers measure decoding and cropping, not the disk.
Cores = CPU seconds of this process and its worker processes / wall seconds over the timed rounds.
"""
import os
import time

import pytest
import torch

from fae_fast.data.dali import unavailable as dali_unavailable
from fae_fast.data.images import ImageDataConfig, make_image_loader
from fae_fast.data.synthetic import write_imagenet_like

FILES, REPEATS, BATCH = 512, 8, 256


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return found + [g for c in found for g in _children(c)]


def _cpu_seconds() -> float:
    """CPU time of this process, its finished children and its live children (DataLoader workers)."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    for pid in _children(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # fields from the 3rd (state) on
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        except OSError:
            pass
    return total


@pytest.fixture(scope="session")
def imagenet_like(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("imagenet_like"))
    paths = write_imagenet_like(root, classes=8, per_class=FILES // 8, noise=24.0)
    listing = os.path.join(root, "files.txt")
    with open(listing, "w") as f:
        for r in range(REPEATS):
            f.writelines(f"{os.path.relpath(p, root)} {r}\n" for p in paths)
    mean_kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1e3
    return root, listing, mean_kb


NO_DALI = pytest.mark.skipif(dali_unavailable() is not None, reason="nvidia-dali not installed")
BACKENDS = [
    pytest.param("dali", 4, marks=NO_DALI),
    pytest.param("torchvision_gpu", 4),
    pytest.param("pil", min(16, os.cpu_count() or 1)),
]


@pytest.mark.parametrize("backend,workers", BACKENDS)
def test_loader_throughput(benchmark, gpu_ceilings, imagenet_like, backend, workers):
    root, listing, mean_kb = imagenet_like
    cfg = ImageDataConfig(root=root, file_list=listing, batch_size=BATCH, image_size=256, encoder_size=224,
                          random_flip=True, backend=backend, workers=workers)
    loader = make_image_loader(cfg, device="cuda")
    images = len(loader) * BATCH

    def epoch():
        for batch in loader:
            assert batch["encoder_pixels"].shape == (BATCH, 3, 224, 224)
        torch.cuda.synchronize()

    epoch()  # workers started, pipeline built, resampling weights cached
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    benchmark.pedantic(epoch, rounds=3, iterations=1)
    cores = (_cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
    benchmark.extra_info.update({
        "gpu": gpu_ceilings["gpu"], "git": gpu_ceilings["git"], "backend": backend, "workers": workers,
        "images_per_s": images / benchmark.stats.stats.median, "cores": cores,
        "mean_file_kB": mean_kb, "batch": BATCH, "outputs": "256 + 224",
    })
