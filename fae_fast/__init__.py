"""fae_fast: fused GPU kernels and torchrun programs for Feature Auto-Encoders (arXiv 2512.07829)."""
import os as _os

# setup.py installs the top-level kernels/ folder as fae_fast.kernels. When the package is used straight
# from a source checkout (no install, or an editable install whose finder is not active), let the
# repository root serve as a second search path so that `fae_fast.kernels` still resolves to kernels/.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")) and _os.path.isfile(
        _os.path.join(_root, "kernels", "__init__.py")):
    __path__.append(_root)  # noqa: F821 (package __path__)
