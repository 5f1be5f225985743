"""The DALI decoder: JPEG decode on the GPU (device='mixed', nvJPEG and the hardware decoder where the GPU
has one) or on the CPU (device_id=None, for CI), then ADM's centre crop with DALI's resize.

nvidia-dali is optional and imported only here, when this backend is built. Our reader threads feed the
file bytes through an external source (so sharding, shuffling, resuming and exclusion are the same code
for every backend), together with the per-image geometry of decode.adm_plan, read from the file header:
  - up to MAX_HALVINGS halvings: linear resampling at exactly 2x samples the midpoint of each pixel pair,
    which is PIL's BOX halving for even sides (odd sides are approximated); a stage an image does not
    need resizes it to its own size, which is the identity;
  - the bicubic resize (antialiased when shrinking) of just the region that becomes the crop, so the
    output is the size x size crop itself.
Images needing more halvings (shorter side >= 16x the target) go to the PIL fallback.
"""
import numpy as np
import torch

from fae_fast.data.decode import Sniff, adm_plan

MAX_HALVINGS = 4


def unavailable() -> str | None:
    """None when DALI and its PyTorch plugin import, else why not."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken install counts as missing
        return f"{type(e).__name__}: {e}"
    return None


def build_pipeline(*, size: int, batch_size: int, threads: int, device_id: int | None):
    """Decode + ADM crop of up to batch_size files per run; HWC uint8 (n, size, size, 3) output."""
    from nvidia.dali import Pipeline, fn, types

    # prefetch_queue_depth=1: each run() consumes exactly the inputs fed to it
    pipe = Pipeline(batch_size=batch_size, num_threads=max(1, threads), device_id=device_id, prefetch_queue_depth=1)
    with pipe:
        data = fn.external_source(name="data", dtype=types.UINT8)
        image = fn.decoders.image(data, device="cpu" if device_id is None else "mixed", output_type=types.RGB,
                                  adjust_orientation=False)  # PIL and ADM ignore EXIF orientation
        for k in range(MAX_HALVINGS):
            image = fn.resize(image, size=fn.external_source(name=f"halve{k}", dtype=types.FLOAT),
                              interp_type=types.INTERP_LINEAR, antialias=False)
        image = fn.resize(image, size=[size, size], roi_relative=False,
                          roi_start=fn.external_source(name="roi_start", dtype=types.FLOAT),
                          roi_end=fn.external_source(name="roi_end", dtype=types.FLOAT),
                          interp_type=types.INTERP_CUBIC, antialias=True)
        pipe.set_outputs(image)
    pipe.build()
    return pipe


def geometry_inputs(sniffs: list[Sniff], size: int) -> dict[str, list[np.ndarray]]:
    """Per-image (y, x) arguments of the pipeline's resizes, from the sizes in the file headers."""
    inputs = {f"halve{k}": [] for k in range(MAX_HALVINGS)} | {"roi_start": [], "roi_end": []}
    for s in sniffs:
        plan = adm_plan(s.height, s.width, size)
        h, w = s.height, s.width
        for k in range(MAX_HALVINGS):
            if k < len(plan.halvings):
                h, w = plan.halvings[k]
            inputs[f"halve{k}"].append(np.array([h, w], np.float32))
        (rh, rw), (top, left) = plan.resized, plan.top_left
        sy, sx = h / rh, w / rw  # resized pixel -> source pixel
        inputs["roi_start"].append(np.array([top * sy, left * sx], np.float32))
        inputs["roi_end"].append(np.array([(top + size) * sy, (left + size) * sx], np.float32))
    return inputs


class DaliDecoder:
    """The batched decoder of the 'dali' backend (see backends.AcceleratedBackend)."""

    name = "dali"

    def __init__(self, *, size: int, batch_size: int, threads: int, device: torch.device):
        problem = unavailable()
        if problem is not None:
            raise ImportError(f"backend='dali' needs nvidia-dali ({problem}); pip install nvidia-dali-cuda130 "
                              f"(CUDA 13 drivers and torch builds; nvidia-dali-cuda120 for CUDA 12: the extras "
                              f"fae_fast[dali] and fae_fast[dali-cuda120]), or set backend='torchvision_gpu' or 'pil'")
        self.size, self.device = size, device
        self.args = dict(size=size, batch_size=batch_size, threads=threads,
                         device_id=device.index if device.type == "cuda" else None)
        self.pipe = build_pipeline(**self.args)

    def accepts(self, s: Sniff) -> bool:
        return s.plain_jpeg and len(adm_plan(s.height, s.width, self.size).halvings) <= MAX_HALVINGS

    def decode(self, datas: list[np.ndarray], sniffs: list[Sniff]) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        (out,) = self.pipe.run(stream, data=datas, **geometry_inputs(sniffs, self.size))
        hwc = torch.empty((len(datas), self.size, self.size, 3), dtype=torch.uint8, device=self.device)
        feed_ndarray(out.as_tensor(), hwc, cuda_stream=stream)
        return hwc.permute(0, 3, 1, 2)

    def reset(self) -> None:
        """A pipeline that raised may hold a broken state: build a fresh one."""
        self.pipe = build_pipeline(**self.args)
