"""A tiny trained run and a viewer serving it, shared by the viewer tests."""

from __future__ import annotations

import pytest

TINY_RUN = {
    "resolution": 64,
    "iterations": 6,
    "static_iterations": 2,
    "smooth_audio_after": 4,
    "checkpoint_every": 6,
    "preview_every": 6,
    "model": {"init": {"n_face": 300, "n_head": 300, "n_mouth": 60}},
    "strategy": {"refine_start_iter": 2, "refine_every": 2, "refine_stop_iter": 100, "max_gaussians": 2000},
}
"""A few iterations: enough for a loadable run; the viewer's mechanics do not need a good avatar."""


@pytest.fixture(scope="session")
def viewer_run(small_subject, tmp_path_factory):
    """A run directory trained for a few iterations on the small synthetic subject."""
    from avatar.train.trainer import train

    _, subject = small_subject
    run = tmp_path_factory.mktemp("viewer") / "run"
    train(subject, run, overrides=TINY_RUN, device="cpu", evaluate=False)
    return run


@pytest.fixture(scope="module")
def viewer(viewer_run):
    """A viewer of ``viewer_run`` on a free port of 127.0.0.1, stopped after the module."""
    from avatar.viewer import start

    running = start(viewer_run, host="127.0.0.1", port=0, device="cpu")
    yield running
    running.stop()
