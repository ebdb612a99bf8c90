"""End to end on the synthetic sample: preprocessing is checked against the sample's ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from avatar.preprocess.pipeline import PreprocessConfig, preprocess
from avatar.sample import SampleConfig, make_sample
from avatar.subject import Subject, validate_subject

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sample_subject(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    paths = make_sample(root / "sample", SampleConfig(seed=0, duration_s=24.0))
    summary = preprocess(paths.video, root / "subject", PreprocessConfig(size=512))
    return paths, summary, Subject(root / "subject")


def _project(tracks, t):
    shape = tracks["face_mean"] + np.einsum("k,kvc->vc", tracks["expression"][t], tracks["face_basis"])
    w2c = np.linalg.inv(tracks["cam_to_world"][t])
    cam = shape @ w2c[:3, :3].T + w2c[:3, 3]
    uv = cam @ tracks["intrinsics"].T
    return uv[:, :2] / uv[:, 2:3]


def test_subject_is_complete_and_tracked(sample_subject):
    _, summary, subject = sample_subject
    validate_subject(subject.paths.root)
    assert summary.valid_share >= 0.95
    assert summary.reprojection_error_px <= 1.5
    tracks = subject.tracks
    valid = np.flatnonzero(tracks["valid"])
    errors = [np.linalg.norm(_project(tracks, t) - tracks["landmarks"][t, :, :2], axis=1).mean() for t in valid[::10]]
    assert np.mean(errors) <= 1.5
    assert (subject.paths.report_dir / "contact_sheet.png").is_file()
    assert (subject.paths.report_dir / "tracks.png").is_file()


def test_tracks_follow_the_ground_truth(sample_subject):
    paths, _, subject = sample_subject
    truth = np.load(paths.truth)
    tracks = subject.tracks
    names = [str(n) for n in tracks["blendshape_names"]]
    n = min(len(truth["mouth_open"]), subject.n_frames)
    jaw = tracks["blendshapes"][:n, names.index("jaw_open")]
    assert np.corrcoef(jaw, truth["mouth_open"][:n])[0, 1] > 0.9
    blink = tracks["blendshapes"][:n, names.index("eye_blink_left")] + tracks["blendshapes"][:n, names.index("eye_blink_right")]
    assert np.corrcoef(blink, truth["blink"][:n])[0, 1] > 0.6


def test_masks_and_background(sample_subject):
    _, _, subject = sample_subject
    labels = subject.mask(subject.n_frames // 2)
    lm = subject.tracks["landmarks"][subject.n_frames // 2]
    nose = np.round(lm[1, :2]).astype(int)
    assert labels[nose[1], nose[0]] == 2  # face
    assert labels[5, 5] == 0 or labels[5, -5] == 0  # background in a top corner
    bg = subject.background()
    assert bg.shape == (512, 512, 3) and bg.std() > 5
