"""The one speech driver: blocks equal an unbroken pass, plans fill in what speech cannot say."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar.models import AvatarModel
from avatar.run import load_avatar
from avatar.speak import BLINK_NAMES, DriveOptions, SampleSpeech, SpeechDriver
from avatar.subject_data import SubjectData
from tests.conftest import tone


@pytest.fixture(scope="module")
def driver(tiny_run) -> SpeechDriver:
    avatar = load_avatar(tiny_run, "cpu")
    data = SubjectData(avatar.subject_dir, avatar.resolution, avatar.model.motion_features)
    return SpeechDriver(avatar.model, data)


def test_the_loaded_model_implements_the_interface(driver):
    assert isinstance(driver.model, AvatarModel)


def test_codes_in_small_blocks_equal_one_long_block(driver):
    speech = SampleSpeech(tone(3.0, freq=220.0))
    n = driver.n_frames(speech)
    assert n == 75
    whole = driver.audio_codes(speech, n, block=256)
    pieces = driver.audio_codes(speech, n, block=7)
    assert whole.shape == (n, driver.model.audio.config.code_dim)
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=1e-4)
    # and the codes follow the speech: silence and a tone give different codes
    silent = driver.audio_codes(SampleSpeech(np.zeros(48000, np.float32)), n)
    assert (silent - whole).abs().max() > 1e-3


def test_plan_fills_pose_blinks_and_cameras(driver, tmp_path):
    data = driver.data
    n = 40
    loop = driver.plan(n, DriveOptions(pose="loop", blink="none"))
    assert loop.viewmats is None and len(loop.subject_frames) == n
    assert np.abs(np.diff(loop.subject_frames)).max() == 1
    blink = [list(driver.model.motion_features).index(b) for b in BLINK_NAMES]
    assert torch.allclose(loop.motion[:, blink], loop.motion[:1, blink].expand(n, -1)), "--blink none holds the eyes"
    # A pose file: its cameras are used, and the head-rotation condition follows them.
    c2w = np.linalg.inv(data.viewmats[:5].double().numpy())
    turned = c2w.copy()
    angle = np.radians(20.0)
    turn = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    turned[:, :3, :3] = turn @ c2w[:, :3, :3]
    poses = tmp_path / "poses.npz"
    np.savez(poses, cam_to_world=turned)
    posed = driver.plan(n, DriveOptions(pose=str(poses), blink="none"))
    assert posed.viewmats is not None and posed.viewmats.shape == (n, 4, 4)
    torch.testing.assert_close(posed.viewmats[0], torch.linalg.inv(torch.from_numpy(turned[0])).float())
    rotation = [list(driver.model.motion_features).index("head_rot_y")]
    assert (posed.motion[:, rotation] - loop.motion[:, rotation]).abs().max() > 0.5  # 20 degrees = 2 units


def test_frames_cover_the_speech_in_order(driver):
    speech = SampleSpeech(tone(1.3))
    batches = list(driver.frames(speech, DriveOptions(block=9), batch=4))
    starts = [b.start for b in batches]
    assert starts == sorted(starts) and starts[0] == 0
    total = sum(len(b.subject_frames) for b in batches)
    assert total == driver.n_frames(speech) == 32
    for b in batches:
        assert b.condition.audio.shape[0] == b.condition.motion.shape[0] == b.viewmats.shape[0]


def test_subject_condition_is_the_training_condition(driver):
    idx = np.array([3, 7])
    cond = driver.subject_condition(idx)
    expected = driver.model.conditions(driver.data.audio_features, torch.as_tensor(idx), driver.data.motion[idx])
    for b, c in enumerate(expected):
        torch.testing.assert_close(cond.audio[b], c.audio)
        torch.testing.assert_close(cond.motion[b], c.motion)
