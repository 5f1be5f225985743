"""fae_fast.kernels: fused Triton kernels (forward and backward) for the adaLN blocks and the FAE encoder.

One file per op. Each file holds, in order: the PyTorch reference `<op>_ref`, the Triton kernels, the
launchers, the autograd wiring and `torch.library` registration, and the public functional `<op>(...)`.
"""
