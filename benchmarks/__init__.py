"""The GPU benchmarks: the guarded cases (`pytest benchmarks/`) and the scripts they share."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NCCL_SAFE = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def child_env() -> dict[str, str]:
    """Environment of a program a benchmark launches: the repository root on PYTHONPATH (its `fae_fast` and
    `benchmarks` importable from a checkout that is not installed) and NVLink multicast off."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **NCCL_SAFE, "PYTHONPATH": path}
