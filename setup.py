"""Build script: package metadata lives in pyproject.toml; this file compiles nothing.

The project's kernels (``avatar/render/csrc/*.cpp`` for the CPU, ``cuda_ext/*.cu`` for CUDA) are
plain C++/CUDA sources with a C ABI and no torch headers. They are not torch extensions and are
not built at install time: :mod:`avatar.render._build` compiles each one on first use (``c++`` or
``nvcc``, a few seconds), caches the shared library under ``$AVATAR_CACHE_DIR`` and loads it with
ctypes; without a compiler (or, for CUDA, without a usable GPU) the PyTorch twins run instead.
So ``pip install -e .`` is a pure-Python install on every machine.
"""

from setuptools import setup

setup()
