"""The page in a real browser: headless Chromium loads it and draws a rendered frame."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

CHROMIUM = shutil.which("chromium")


def _screenshot(url: str, shot: Path, profile: Path, budget_ms: int) -> tuple[np.ndarray | None, str]:
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--mute-audio", f"--user-data-dir={profile}", "--window-size=800,600",
        f"--virtual-time-budget={budget_ms}", f"--screenshot={shot}", url,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    image = cv2.imread(str(shot), cv2.IMREAD_COLOR) if shot.is_file() else None
    return image, f"exit {proc.returncode}: {proc.stderr[-2000:]}"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_headless_chromium_shows_the_avatar(viewer, tmp_path):
    # The canvas sits at the top left under the header; the page around it is flat dark grey.
    # Virtual time does not wait for the JPEG's decode, so on a busy machine the first screenshot
    # can come before the frame is drawn: one retry with more time.
    for attempt, budget in enumerate((5000, 15000)):
        image, log = _screenshot(viewer.url, tmp_path / f"viewer{attempt}.png", tmp_path / f"profile{attempt}", budget)
        assert image is not None, f"no screenshot ({log})"
        assert image.shape[:2] == (600, 800)
        canvas = image[60:440, 20:440].astype(np.float32)
        if canvas.std() > 10.0:
            break
    assert canvas.std() > 10.0, f"the canvas is blank: no frame was drawn ({log})"
    panel = image[60:440, 500:780].astype(np.float32)
    assert panel.std() > 3.0, "the control panel is missing"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_page_works_with_a_token(viewer, tmp_path):
    """Opened by its ?token= URL once, the page's own requests carry the cookie and draw frames."""
    from avatar.viewer import start
    from avatar.viewer.security import new_token

    with start(viewer.engine.run_dir, engine=viewer.engine, token=new_token()) as guarded:
        assert "?token=" in guarded.url
        for attempt, budget in enumerate((5000, 15000)):
            image, log = _screenshot(guarded.url, tmp_path / f"token{attempt}.png", tmp_path / f"p{attempt}", budget)
            assert image is not None, f"no screenshot ({log})"
            canvas = image[60:440, 20:440].astype(np.float32)
            if canvas.std() > 10.0:
                break
        assert canvas.std() > 10.0, f"no frame was drawn with the token cookie ({log})"
