"""What every kernel test shares: the per-dtype tolerance table and the torch.compile backend."""
import torch

# Output and gradients against the fp32 (or fp64) reference; bf16/fp16 tests also apply the 2x rule
# (error at most twice that of PyTorch computing in the same dtype).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
}
# On CPU the compile tests use aot_eager: it traces forward and backward through AOTAutograd and the fake
# impls (what fullgraph needs), without Inductor's C++ build, which adds nothing around an opaque op.
COMPILE_BACKEND = "inductor" if torch.cuda.is_available() else "aot_eager"
