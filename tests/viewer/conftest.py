"""A tiny trained run and a viewer serving it, shared by the viewer tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def viewer_run(tiny_run):
    """The shared tiny run (tests/conftest.py): the viewer's mechanics do not need a good avatar."""
    return tiny_run


@pytest.fixture(scope="module")
def viewer(viewer_run):
    """A viewer of ``viewer_run`` on a free port of 127.0.0.1, stopped after the module."""
    from avatar.viewer import start

    running = start(viewer_run, host="127.0.0.1", port=0, device="cpu")
    yield running
    running.stop()
