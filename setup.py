"""Build script: package metadata lives in pyproject.toml.

The project's own CUDA kernels (``cuda_ext/``) are compiled here only when a CUDA device is
actually usable (``torch.cuda.is_available()``), never because a compiler happens to be on
PATH. Everywhere else (CPU machines, CI, pip's isolated build environment where torch is not
importable) the package installs as pure Python and the PyTorch reference paths are used.
Set ``AVATAR_BUILD_CUDA=0`` to skip the build on a GPU machine as well.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _cuda_extensions() -> tuple[list, dict]:
    if os.environ.get("AVATAR_BUILD_CUDA", "1") == "0":
        return [], {}
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "cuda_ext").glob("*.cu"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "cuda_ext").glob("*.cpp"))
    if not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:  # isolated build env: install pure Python, use the torch reference paths
        return [], {}
    if not torch.cuda.is_available():
        return [], {}
    ext = CUDAExtension(
        name="avatar._cuda_ext",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
