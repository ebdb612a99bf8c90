"""avatar eval: a split re-rendered with its true conditions and compared."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from avatar import media
from avatar.cli import main
from avatar.subject import MASK_LEGEND



def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_eval_writes_json_and_video(tiny_run, tmp_path):
    js = tmp_path / "m.json"
    video = tmp_path / "side.mp4"
    result = _invoke("eval", tiny_run, "--json", js, "--video", video)
    assert result.exit_code == 0, result.output
    metrics = json.loads(js.read_text())
    for key in ("psnr", "psnr_head", "ssim", "lpips", "lmd", "mouth_corr", "n_frames", "render_fps",
                "resolution", "device"):
        assert key in metrics
    assert metrics["n_frames"] > 0 and metrics["psnr"] > 5
    # The per-region breakdown covers every label and its shares add up to the whole error.
    assert set(metrics["region_psnr"]) == set(MASK_LEGEND.values())
    assert sum(metrics["region_error_share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert metrics["region_psnr"]["face"] is not None and metrics["region_psnr"]["face"] > 5
    info = media.probe(video)
    assert info.width == 2 * metrics["resolution"] and info.has_audio
