"""Compiling and loading the project's own kernels: plain C++ (CPU) and CUDA C++, loaded with ctypes.

Why one helper: every kernel of the project (the rasterizer's compositing, the tri-plane encoding,
ray marching) is a source file with a C ABI and no torch headers, compiled on first use by a plain
compiler call (``c++ -O3 -shared``, ``nvcc -shared``) in seconds, cached, and loaded with ctypes.
No ninja, no torch extension headers, no torch ABI to break. A kernel that cannot be built is a
warning and the PyTorch twin, never an error.

Shared libraries are cached under ``$AVATAR_CACHE_DIR`` (default ``~/.cache/avatar``)/kernels,
keyed by the hash of the sources, flags, compiler version and machine; each is written under a
temporary name and renamed, so concurrent first uses are safe.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

CXX_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fno-math-errno")
"""Flags of every CPU kernel."""

NVCC_FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "--use_fast_math", "-arch=native")
"""Flags of every CUDA kernel (one shared library per ``.cu`` file); ``-arch=native``: built where it
runs (only once torch sees a GPU), for that GPU's own instructions."""

CUDA_SOURCE_DIR = Path(__file__).resolve().parents[2] / "cuda_ext"
"""``cuda_ext/`` of a source checkout (or an editable install), where the CUDA sources live."""


class KernelBuildError(RuntimeError):
    """A kernel could not be compiled or loaded (the message holds the compiler's last words)."""


def cache_dir() -> Path:
    root = os.environ.get("AVATAR_CACHE_DIR") or Path.home() / ".cache" / "avatar"
    return Path(root) / "kernels"


def cxx_compiler() -> str | None:
    """The C++ compiler: ``$CXX``, else the first of c++, g++, clang++ on PATH; None without one."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def nvcc_compiler() -> str | None:
    """``nvcc`` from ``$CUDA_HOME``/bin or PATH; None without one. Having it does not mean CUDA
    is usable: callers decide that with ``torch.cuda.is_available()``."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def compiler_id(compiler: str) -> str:
    """The compiler's version line, part of the cache key."""
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
        lines = [line for line in out.stdout.splitlines() if line.strip()]
        return lines[-1] if lines else compiler
    except (OSError, subprocess.SubprocessError):
        return compiler


def build_shared_library(name: str, sources: Sequence[Path], compiler: str, flags: Sequence[str],
                         include_dirs: Sequence[Path] = ()) -> Path:
    """Compile ``sources`` into a cached shared library ``{name}_{hash}.so`` and return its path.

    The key covers the sources' bytes, the headers of ``include_dirs``, the flags, the compiler's
    version and the machine, so an edited source or another compiler rebuilds.

    Raises:
        KernelBuildError: a source is missing or the compiler failed (its stderr's tail).
    """
    digest = hashlib.sha256()
    try:
        for path in sources:
            digest.update(Path(path).read_bytes())
        for folder in include_dirs:
            for header in sorted(Path(folder).glob("*.h")):
                digest.update(header.name.encode() + header.read_bytes())
    except OSError as err:
        raise KernelBuildError(f"kernel source missing ({err})") from None
    digest.update(" ".join(flags).encode() + compiler_id(compiler).encode() + platform.machine().encode())
    target = cache_dir() / f"{name}_{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        includes = [f"-I{folder}" for folder in include_dirs]
        try:
            proc = subprocess.run([compiler, *flags, *includes, *map(str, sources), "-o", tmp],
                                  capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as err:
            raise KernelBuildError(f"{compiler} could not run ({err})") from None
        if proc.returncode != 0:
            raise KernelBuildError(proc.stderr.strip()[-2000:] or f"{compiler} failed")
        os.chmod(tmp, 0o755)  # mkstemp made it private; a shared cache needs r-x
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_library(path: Path, abi_symbol: str, abi_version: int) -> ctypes.CDLL:
    """Load a built kernel and check that it exports ``abi_symbol() == abi_version``.

    Raises:
        KernelBuildError: the library does not load or reports another ABI version.
    """
    try:
        lib = ctypes.CDLL(str(path))
        found = getattr(lib, abi_symbol)()
    except (OSError, AttributeError) as err:
        raise KernelBuildError(f"{path} does not load ({err})") from None
    if found != abi_version:
        raise KernelBuildError(f"{path} has ABI version {found}, expected {abi_version}")
    return lib


def cpu_kernel(name: str, source: Path, abi_symbol: str, abi_version: int, what: str) -> ctypes.CDLL | None:
    """Build and load a C++ CPU kernel, or warn (naming ``what`` falls back) and return None.

    Callers memoise it (``functools.cache``) so that the attempt happens once per process.
    """
    cxx = cxx_compiler()
    if cxx is None:
        warnings.warn(f"no C++ compiler found (set CXX or install g++); {what} falls back to PyTorch",
                      RuntimeWarning, stacklevel=3)
        return None
    try:
        return load_library(build_shared_library(name, [source], cxx, CXX_FLAGS), abi_symbol, abi_version)
    except KernelBuildError as err:
        warnings.warn(f"could not build the C++ kernel of {what} ({err}); falling back to PyTorch",
                      RuntimeWarning, stacklevel=3)
        return None


def cuda_kernel(name: str, source: Path, abi_symbol: str, abi_version: int, what: str) -> ctypes.CDLL | None:
    """Build (``nvcc -shared``, with ``cuda_ext/`` on the include path) and load a CUDA kernel, or
    warn and return None. Only call it once ``torch.cuda.is_available()`` said yes: a compiler on
    PATH does not make a GPU."""
    nvcc = nvcc_compiler()
    if nvcc is None:
        warnings.warn(f"CUDA is available but nvcc is not (set CUDA_HOME); {what} falls back to PyTorch",
                      RuntimeWarning, stacklevel=3)
        return None
    try:
        target = build_shared_library(name, [source], nvcc, NVCC_FLAGS, include_dirs=[source.parent])
        return load_library(target, abi_symbol, abi_version)
    except KernelBuildError as err:
        warnings.warn(f"could not build the CUDA kernel of {what} ({err}); falling back to PyTorch",
                      RuntimeWarning, stacklevel=3)
        return None
