"""fae_fast: fused GPU kernels and torchrun programs for FAE (arXiv 2512.07829).

The top-level kernels/ folder installs as the sub-package fae_fast.kernels.
"""
from setuptools import setup

setup(
    name="fae_fast",
    version="0.1.0",
    description="Fused Triton kernels and torchrun training programs for Feature Auto-Encoders and latent diffusion transformers",
    python_requires=">=3.10",
    packages=["fae_fast", "fae_fast.data", "fae_fast.eval", "fae_fast.train", "fae_fast.kernels"],
    package_dir={"fae_fast": "fae_fast", "fae_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.5",
        "triton",
        "timm>=1.0.12",  # the oldest whose registry holds every encoder in config.py (tested in .ci/run)
        "safetensors",
        "numpy",
        "pillow",
        "matplotlib",
        "tqdm",
        "lpips",  # LPIPS's learned linear weights for the perceptual loss (a 50 kB package)
        "torchdiffeq",  # adaptive ODE samplers (dopri5), as SiT and LightningDiT use
    ],
    extras_require={
        # DALI's wheels are built per CUDA major version: pick the one of your driver / torch build
        # (torch.version.cuda). cuda130 ran on the H200 machines (torch 2.11+cu130, DALI 2.2.0).
        "dali": ["nvidia-dali-cuda130"],
        "dali-cuda120": ["nvidia-dali-cuda120"],
        "eval": ["torch-fidelity"],
        "text": ["transformers>=4.49", "tokenizers"],  # the SigLIP 2 text tower (text-to-image)
        "flash": ["flash-attn"],
        "xformers": ["xformers"],
        "dev": ["pytest", "pytest-benchmark"],
    },
)
