"""gsplat that imports but whose CUDA kernels do not build: CUDA renders fall back to the PyTorch
rasterizer with a warning that says why, instead of crashing in the middle of a render. Runs
without gsplat or CUDA: the package is faked in ``sys.modules``."""

from __future__ import annotations

import importlib
import sys
import types
from types import SimpleNamespace

import pytest

from avatar.render._gsplat import gsplat_available, gsplat_problem

rasterize_module = importlib.import_module("avatar.render.rasterize")  # the package exports a function of that name


@pytest.fixture
def fake_gsplat(monkeypatch):
    """Install a fake ``gsplat`` whose ``gsplat.cuda._backend`` is set by the test."""
    gsplat_problem.cache_clear()
    package = types.ModuleType("gsplat")
    package.__path__ = []
    cuda = types.ModuleType("gsplat.cuda")
    cuda.__path__ = []
    monkeypatch.setitem(sys.modules, "gsplat", package)
    monkeypatch.setitem(sys.modules, "gsplat.cuda", cuda)

    def set_backend(backend):
        monkeypatch.setitem(sys.modules, "gsplat.cuda._backend", backend)
        gsplat_problem.cache_clear()

    yield set_backend
    gsplat_problem.cache_clear()


CUDA_MEANS = SimpleNamespace(device=SimpleNamespace(type="cuda"))  # all _choose_backend reads


def test_kernels_that_do_not_build_are_a_reason_not_a_crash(fake_gsplat):
    fake_gsplat(None)  # None in sys.modules: importing the backend raises ImportError
    assert gsplat_available()  # the package itself imports
    problem = gsplat_problem()
    assert problem is not None and "did not build" in problem
    with pytest.warns(RuntimeWarning, match="did not build.*pure-PyTorch"):
        assert rasterize_module._choose_backend("auto", CUDA_MEANS) == "torch"
    with pytest.raises(ValueError, match="cannot run: gsplat's CUDA kernels did not build"):
        rasterize_module._choose_backend("gsplat", CUDA_MEANS)


def test_no_toolkit_and_a_built_backend(fake_gsplat):
    fake_gsplat(SimpleNamespace(_C=None))  # gsplat found no CUDA toolkit
    assert "no CUDA toolkit" in gsplat_problem()
    fake_gsplat(SimpleNamespace(_C=object()))
    assert gsplat_problem() is None
    assert rasterize_module._choose_backend("auto", CUDA_MEANS) == "gsplat"


def test_the_answer_is_kept_so_a_failed_build_is_not_retried(fake_gsplat):
    fake_gsplat(None)
    first = gsplat_problem()
    sys.modules["gsplat.cuda._backend"] = SimpleNamespace(_C=object())  # without clearing the cache
    assert gsplat_problem() == first
