"""Test setup: without a GPU, Triton kernels run through the CPU interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, before the
test modules import fae_fast.kernels. On a CUDA machine the kernels compile for the GPU as usual.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: a multi-process or multi-minute test")
    # pytest-xdist's load scheduling first sends each worker a run of consecutive tests a quarter of its share
    # long (15 at -n 14), so the slow tests, sorted first, all went to one worker, which did not reach 8 of
    # them within the H200 suite's time limit; runs of 2 hand them out across the workers
    if getattr(config.option, "maxschedchunk", False) is None:
        config.option.maxschedchunk = 2


def pytest_collection_modifyitems(config, items):
    # the slow tests (whole training programs, minutes each) first, so that a parallel run (-n) starts its
    # longest tests at once instead of last, which set the whole run's length on the GPU machine
    items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# training/ programs import their helpers as `training.*` from the repository root
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread, else a busy shared CPU spends most of the time in thread hand-offs.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def in_process_group():
    """For tests that run a program in-process (`main([...])`): it joins a one-rank gloo group and sets RANK
    etc.; meanwhile one intra-op thread (tiny models on a shared CPU: thread hand-offs would cost more than
    they give); afterwards the process as it was. Use with `pytestmark = pytest.mark.usefixtures(...)`."""
    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in DIST_ENV}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if dist.is_initialized():
        dist.destroy_process_group()
    restore_env(saved)


def restore_env(saved: dict) -> None:
    """Put back the variables `{k: os.environ.get(k) for k in DIST_ENV}` saved (None: was unset)."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def program_env(processes: int = 1) -> dict[str, str]:
    """Environment of a program run in a subprocess: no inherited process-group variables, one thread per
    process, and the GPUs hidden where the machine has fewer than `processes` (every run of a test that
    compares world sizes then shares one device type)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",  # fae_fast importable without install
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH")]))}
    for k in DIST_ENV:
        env.pop(k, None)
    if torch.cuda.device_count() < processes:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


class PooledPixels:
    """A stand-in for the Inception network (its weights are not on these machines): uint8 images (B, 3, H, W)
    -> 4x4 average-pooled pixels (B, 48), no logits. Constructed like InceptionExtractor(device, weights)."""

    name = "pooled-pixels"

    def __init__(self, device=None, weights_path=None):
        pass

    def __call__(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1), None


def write_random_fae(folder: Path, parts=("feature_decoder", "pixel_decoder"), *, with_config: bool = True):
    """A random FAE-tiny saved as train_fae.py writes it: `folder`/fae.safetensors with the '<part>.*' tensors of
    `parts` (built in that order, from torch's global RNG: seed before calling) and, with_config, its
    fae_config.json beside it. -> (path, FAEConfig, {part: module})."""
    import dataclasses
    import json

    from safetensors.torch import save_file

    from fae_fast.config import fae_config
    from fae_fast.fae import FAEEncoder, FeatureDecoder, PixelDecoder
    from fae_fast.train.checkpoint import FAE_CONFIG_NAME

    fcfg = fae_config("FAE-tiny")
    build = {"encoder": lambda: FAEEncoder(fcfg), "feature_decoder": lambda: FeatureDecoder(fcfg, impl="torch"),
             "pixel_decoder": lambda: PixelDecoder(fcfg, impl="torch")}
    modules = {name: build[name]() for name in parts}
    path = Path(folder) / "fae.safetensors"
    save_file({f"{name}.{k}": v.contiguous() for name, m in modules.items() for k, v in m.state_dict().items()},
              str(path))
    if with_config:
        (Path(folder) / FAE_CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(fcfg)))
    return path, fcfg, modules

