"""The page in a real browser: headless Chromium loads it and draws a rendered frame."""

from __future__ import annotations

import shutil
import subprocess

import cv2
import numpy as np
import pytest

CHROMIUM = shutil.which("chromium")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_headless_chromium_shows_the_avatar(viewer, tmp_path):
    shot = tmp_path / "viewer.png"
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--mute-audio", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=800,600",
        "--virtual-time-budget=5000", f"--screenshot={shot}", viewer.url,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    image = cv2.imread(str(shot), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[:2] == (600, 800)
    # The canvas sits at the top left under the header; the page around it is flat dark grey.
    canvas = image[60:440, 20:440].astype(np.float32)
    assert canvas.std() > 10.0, "the canvas is blank: no frame was drawn"
    panel = image[60:440, 500:780].astype(np.float32)
    assert panel.std() > 3.0, "the control panel is missing"
