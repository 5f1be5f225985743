"""A whole training step (forward, backward, gradient clipping, optimizer) captured once as one CUDA graph and
replayed, for steps where the GPU waits on the host: the FP8 step launches about 1,500 kernels and custom ops
a step, and on an H200 its host time (Python, dispatch, cuBLASLt set-up) exceeds its kernel time.

    batch = StaticInputs(latents=x, condition=y)           # the step reads these tensors, always the same ones
    step = GraphedStep(lambda: train_step(model, opt, batch.latents, batch.condition))
    for x, y in loader:
        batch.load(latents=x, condition=y)                 # copies into the static tensors
        loss = step()                                      # replays the graph; returns the static loss tensor

What capture needs (PyTorch's whole-network capture): an optimizer built with `capturable=True` (its step
count lives on the device) whose learning rate is a device tensor changed in place (a float is recorded
once; `make_capturable`), random numbers drawn outside the step and loaded with the batch (train_gen
draws each step's from its own seeded generator) or from the default CUDA generator (capture records its
Philox offsets), no host synchronisation inside the step (no `.item()`, no data-dependent
shapes), and autocast with `cache_enabled=False` (a cached weight cast would be freed outside the graph).
Every call trains one step: the first `warmup` calls run it eagerly on a side stream (compilation,
cuBLAS workspaces, optimizer state), the next captures it and replays it, and every later call replays
it; `GraphedStep.eager_steps` says how many ran eagerly. So a graphed run trains the same steps on the
same batches as an eager one.

Gradients are allocated once, inside the graph's memory pool, and written in place on every replay; the
captured step's own `zero_grad(set_to_none=True)` leaves `.grad` None between replays, so nothing outside
the graph sees or frees them.
"""
from typing import Callable

import torch


class StaticInputs:
    """Named tensors a captured step reads; `load` copies new values into them (same shapes and dtypes)."""

    def __init__(self, **tensors: torch.Tensor):
        self._names = tuple(tensors)
        for name, tensor in tensors.items():
            setattr(self, name, tensor.clone())

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._names}

    def load(self, **tensors: torch.Tensor) -> None:
        if set(tensors) != set(self._names):
            raise ValueError(f"StaticInputs.load needs exactly {', '.join(self._names)}; got {', '.join(tensors)}")
        for name, tensor in tensors.items():
            static = getattr(self, name)
            if tensor.shape != static.shape:
                raise ValueError(f"a captured step's {name} is {tuple(static.shape)}; got {tuple(tensor.shape)} "
                                 f"(a captured graph replays one shape: keep the batch size fixed)")
            static.copy_(tensor, non_blocking=True)


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
    """Set what a captured optimizer step needs on every parameter group, where a checkpoint load (which takes
    every hyperparameter from the saved groups) or the constructor left something else: `capturable=True`
    (the step count stays on the device) and the learning rate as a 0-d fp32 tensor on `device`, same value,
    which set_lr then writes in place. True if anything changed: a graph captured before reads the old
    tensors and settings, so capture again."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    changed = False
    for group in optimizer.param_groups:
        if not group.get("capturable", False):
            group["capturable"] = changed = True
        lr = group["lr"]
        if not (isinstance(lr, torch.Tensor) and lr.device == device):
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
            changed = True
    return changed


def check_capturable(optimizer: torch.optim.Optimizer) -> None:
    if not all(group.get("capturable", False) for group in optimizer.param_groups):
        raise ValueError(f"{type(optimizer).__name__} must be built with capturable=True to run inside a captured "
                         f"training step (its step count then stays on the GPU)")


class GraphedStep:
    """`step()` (no arguments, returns the loss tensor), one training step per call: eager for the first
    `warmup` calls, then captured and replayed. The returned loss is the graph's own output tensor, which the
    next call overwrites: clone it to keep it. CUDA only."""

    def __init__(self, step: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, warmup: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedStep captures a CUDA graph; no CUDA device is visible")
        check_capturable(optimizer)
        self.step, self.optimizer, self.warmup = step, optimizer, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None
        self.eager_steps = 0

    def _eager(self) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss = self.step()
        torch.cuda.current_stream().wait_stream(side)
        self.eager_steps += 1
        return loss

    def _capture(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # gradients are then allocated inside the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a data loader's prefetch thread may pin host memory meanwhile, which a global-mode
        # capture would count as an unsafe call and fail on
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.loss = self.step()

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            if self.eager_steps < self.warmup:
                return self._eager()
            self._capture()  # capture records the step without running it
        self.graph.replay()
        return self.loss
