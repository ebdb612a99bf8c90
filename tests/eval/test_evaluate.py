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
    assert metrics["composite"] == "face"
    for key in ("psnr", "psnr_frame", "psnr_plate", "psnr_head", "psnr_head_tracked", "ssim", "lpips", "lmd",
                "mouth_corr", "n_frames", "render_fps", "resolution", "device"):
        assert key in metrics
    # An empty head scores psnr 17.7 / psnr_head 11.2 on this fixture, the 6-step run 22.9 / 19.4.
    assert metrics["n_frames"] > 0 and metrics["psnr"] > 20.0 and metrics["psnr_head"] > 16.0, metrics
    # The per-region breakdown covers every label and its shares add up to the whole error.
    assert set(metrics["region_psnr"]) == set(MASK_LEGEND.values())
    assert sum(metrics["region_error_share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert metrics["region_psnr"]["face"] is not None and metrics["region_psnr"]["face"] > 16.0
    info = media.probe(video)
    assert info.width == 2 * metrics["resolution"] and info.has_audio


def test_eval_scores_a_trained_head_above_an_empty_one(tiny_run):
    """A model that renders nothing leaves the torso and plate: the head region must then score far lower."""
    import torch

    from avatar.eval import evaluate_model
    from avatar.run import load_avatar
    from avatar.subject_data import SubjectData

    avatar = load_avatar(tiny_run, "cpu")
    data = SubjectData(avatar.subject_dir, avatar.resolution, avatar.model.motion_features)
    trained = evaluate_model(avatar.model, data, "val", landmarks=False)
    with torch.no_grad():
        for layer in (avatar.model.face, avatar.model.mouth):
            layer.opacity_logits.fill_(-30.0)
    empty = evaluate_model(avatar.model, data, "val", landmarks=False)
    # Measured on this fixture: trained head 19.4 dB, empty 11.2 dB (face 20.6 vs 10.5).
    assert trained["psnr_head"] > empty["psnr_head"] + 5.0, (trained, empty)
    assert trained["region_psnr"]["face"] > empty["region_psnr"]["face"] + 5.0
    assert trained["psnr"] > empty["psnr"] + 2.0
    # Outside the head the frame composite is the frame itself, and on its rim a mix of the frame
    # and the plate composite: never further from the truth than the plate composite alone.
    assert empty["psnr_frame"] >= empty["psnr_plate"], empty
    # The face composite shows the frame itself beyond the face: the empty head's hair is the truth.
    assert empty["psnr"] > empty["psnr_frame"] and empty["region_psnr"]["hair"] < 20.0, empty
