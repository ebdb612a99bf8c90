"""Every CUDA source of cuda_ext/ compiles standalone with nvcc (no torch headers, no GPU needed).

Why: the CUDA kernels only run on a machine with a GPU, which most test runs lack; compiling them
here (``nvcc -c``, what avatar.render._build does at first use, minus linking) catches a broken
source on every machine that has the CUDA toolkit.
"""

from __future__ import annotations

import subprocess

import pytest

from avatar.render._build import CUDA_SOURCE_DIR, nvcc_compiler

SOURCES = sorted(CUDA_SOURCE_DIR.glob("*.cu"))


def test_there_are_cuda_sources():
    assert SOURCES, f"no .cu files in {CUDA_SOURCE_DIR}"


@pytest.mark.skipif(nvcc_compiler() is None, reason="nvcc not found (set CUDA_HOME or put it on PATH)")
@pytest.mark.parametrize("source", SOURCES, ids=[p.name for p in SOURCES])
def test_compiles_standalone(source, tmp_path):
    nvcc = nvcc_compiler()
    assert nvcc is not None
    cmd = [nvcc, "-std=c++17", "-c", str(source), "-I", str(CUDA_SOURCE_DIR), "-o", str(tmp_path / "kernel.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}"
