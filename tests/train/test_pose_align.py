"""Held-out head poses aligned to the trained avatar: the correction's algebra, a fit that finds
a known misalignment, the run that stores it and the composites that use it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from avatar.errors import AvatarError
from avatar.eval.evaluate import render_split
from avatar.run import load_avatar
from avatar.subject_data import SubjectData, pose_correction_matrices
from avatar.train.pose_align import PoseAlignConfig, align_poses
from avatar.train.trainer import scene_scale_of


def test_a_zero_correction_is_the_identity_and_any_other_a_rigid_motion():
    assert torch.allclose(pose_correction_matrices(torch.zeros(2, 6)), torch.eye(4).expand(2, 4, 4))
    angle = 0.3
    m = pose_correction_matrices(torch.tensor([[0.0, 0.0, angle, 0.1, -0.2, 0.05]]))[0]
    expected = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0],
                             [0.0, 0.0, 1.0]])
    assert torch.allclose(m[:3, :3], expected, atol=1e-6)
    assert torch.allclose(m[:3, 3], torch.tensor([0.1, -0.2, 0.05]))
    assert torch.equal(m[3], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    delta = torch.randn(3, 6, requires_grad=True)
    rotations = pose_correction_matrices(delta)[:, :3, :3]
    assert torch.allclose(rotations @ rotations.transpose(1, 2), torch.eye(3).expand(3, 3, 3), atol=1e-5)
    rotations.sum().backward()
    assert delta.grad is not None and torch.isfinite(delta.grad).all()


def _subject_data(run, **kwargs) -> tuple:
    avatar = load_avatar(run, "cpu")
    return avatar, SubjectData(avatar.subject_dir, avatar.resolution, avatar.model.motion_features, "cpu", **kwargs)


def _rendered_frames(avatar, data, true: torch.Tensor):
    """``data.frame`` replaced by the avatar's own render of each frame at its tracked pose moved by ``true``."""
    model, original = avatar.model, data.frame

    def shifted(index: int):
        frame = original(index)
        with torch.no_grad():
            cond = model.conditions(data.audio_features, torch.tensor([index]), frame.motion[None])[0]
            out = model.render(cond, frame.viewmat @ pose_correction_matrices(true[None])[0], frame.K,
                               data.resolution, data.resolution, frame.over("plate"))
        return dataclasses.replace(frame, image=out["rgb"].clamp(0, 1))

    data.frame = shifted


@pytest.mark.parametrize("n_frames, max_frames", [(3, 0), (5, 2)])
def test_the_fit_finds_a_known_misalignment_of_the_head(tiny_run, n_frames, max_frames):
    """Frames re-rendered by the avatar itself at a pose turned by 3 degrees: the fit turns the
    tracked pose most of the way back, where the untouched pose leaves the whole error. With
    fewer keyframes than frames, the frames between take the keyframes' interpolation (it fits
    them better than the tracked pose), and no frame is left worse than the tracker left it."""
    avatar, data = _subject_data(tiny_run)
    model = avatar.model
    true = torch.tensor([0.0, 0.05, 0.02, 0.0, 0.0, 0.0])
    indices = data.split("train")[:n_frames]
    _rendered_frames(avatar, data, true)
    config = PoseAlignConfig(steps=60, lr=3e-3, face_weight=1.0, max_frames=max_frames)
    found = align_poses(model, data, indices, config, "plate", scene_scale_of(model))
    assert found.shape == (n_frames, 6)
    error_before = float(true[:3].norm())
    for row in found:
        assert float((row[:3] - true[:3]).norm()) < 0.5 * error_before
    assert all(not p.requires_grad or p.grad is None for p in model.parameters()), "the model is left untouched"


def test_a_frame_that_the_tracked_pose_fits_exactly_keeps_it(tiny_run):
    """The fit keeps its best iterate, the tracked pose included: it never returns a pose that
    fits the frame worse than the tracker's (Adam's steps overshoot an optimum it starts on)."""
    avatar, data = _subject_data(tiny_run)
    _rendered_frames(avatar, data, torch.zeros(6))
    found = align_poses(avatar.model, data, data.split("val")[:3], PoseAlignConfig(steps=5), "plate",
                        scene_scale_of(avatar.model))
    assert torch.count_nonzero(found) == 0


def test_no_steps_keep_the_tracked_poses(tiny_run):
    avatar, data = _subject_data(tiny_run)
    found = align_poses(avatar.model, data, data.split("val"), PoseAlignConfig(steps=0), "plate", 1.0)
    assert torch.count_nonzero(found) == 0


def test_a_run_stores_corrections_for_its_held_out_frames_only(tiny_run):
    avatar, data = _subject_data(tiny_run)
    corrections = avatar.pose_corrections
    assert corrections is not None and corrections.shape == (data.n_frames, 6)
    held_out = np.zeros(data.n_frames, bool)
    held_out[data.split("val")] = True
    assert torch.count_nonzero(corrections[torch.from_numpy(~held_out)]) == 0
    assert torch.count_nonzero(corrections[torch.from_numpy(held_out)]) > 0


def test_corrections_move_the_whole_head_composites_and_leave_the_face_one(tiny_run):
    avatar, plain = _subject_data(tiny_run)
    corrections = torch.zeros(plain.n_frames, 6)
    index = int(plain.split("val")[0])
    corrections[index] = torch.tensor([0.0, 0.08, 0.0, 0.0, 0.0, 0.0])
    _, aligned = _subject_data(tiny_run, pose_corrections=corrections)
    assert torch.equal(aligned.viewmats, plain.viewmats), "the tracked poses stay"
    moved = [i for i in range(plain.n_frames) if not torch.equal(aligned.head_viewmats[i], plain.head_viewmats[i])]
    assert moved == [index]
    (_, before, _, _), = render_split(avatar.model, plain, np.array([index]))
    (_, after, _, _), = render_split(avatar.model, aligned, np.array([index]))
    assert np.array_equal(before["face"], after["face"])
    assert not np.array_equal(before["frame"], after["frame"])
    assert not np.array_equal(before["plate"], after["plate"])


def test_corrections_for_another_subject_are_refused(tiny_run):
    with pytest.raises(AvatarError, match="pose corrections"):
        _subject_data(tiny_run, pose_corrections=torch.zeros(3, 6))


def test_render_puts_the_whole_head_at_the_aligned_pose_and_pastes_the_face_at_the_tracked_one(tiny_run, tmp_path):
    from avatar import media
    from avatar.speak.driver import DriveOptions, SpeechDriver, WavSpeech
    from avatar.speak.render import rendered_batches
    from tests.conftest import tone

    wav = media.write_wav(tmp_path / "speech.wav", tone(0.2))
    avatar, plain = _subject_data(tiny_run)
    index = int(plain.split("val")[0])
    corrections = torch.zeros(plain.n_frames, 6)
    corrections[index] = torch.tensor([0.0, 0.08, 0.0, 0.0, 0.0, 0.0])
    _, aligned = _subject_data(tiny_run, pose_corrections=corrections)

    def frames(data, background: str) -> np.ndarray:
        driver = SpeechDriver(avatar.model, data)
        plan = driver.plan(3, DriveOptions(pose=f"static:{index}", blink="none"))
        return np.concatenate([images for images, _ in rendered_batches(driver, WavSpeech(wav), plan,
                                                                          background=background)])

    assert np.array_equal(frames(plain, "face"), frames(aligned, "face"))
    assert not np.array_equal(frames(plain, "frame"), frames(aligned, "frame"))


def test_keyframes_spread_evenly_over_a_long_split_with_both_ends():
    from avatar.train.pose_align import _keyframes

    assert np.array_equal(_keyframes(5, 0), np.arange(5))
    assert np.array_equal(_keyframes(5, 60), np.arange(5))
    keys = _keyframes(115, 60)
    assert len(keys) == 60 and keys[0] == 0 and keys[-1] == 114
    assert np.all(np.diff(keys) >= 1) and np.diff(keys).max() <= 2
    assert np.array_equal(_keyframes(10, 1), np.array([0, 9]))


def test_corrections_between_keyframes_are_interpolated_in_time():
    from avatar.train.pose_align import _interpolated

    fitted = torch.zeros(5, 6)
    fitted[0, 1], fitted[4, 1] = 0.1, 0.3
    guess = _interpolated(fitted, np.array([0, 4]))
    assert torch.allclose(guess[:, 1], torch.tensor([0.1, 0.15, 0.2, 0.25, 0.3]))
    assert torch.count_nonzero(guess[:, [0, 2, 3, 4, 5]]) == 0


def test_an_interpolation_that_fits_worse_than_the_tracked_pose_is_not_taken(tiny_run):
    """Keyframes moved by a turn, the frames between them not moved at all: they keep the tracked pose."""
    avatar, data = _subject_data(tiny_run)
    model = avatar.model
    indices = data.split("train")[:3]
    _rendered_frames(avatar, data, torch.tensor([0.0, 0.05, 0.02, 0.0, 0.0, 0.0]))
    moved, middle = data.frame, int(indices[1])
    _rendered_frames(avatar, data, torch.zeros(6))
    still = data.frame
    data.frame = lambda index: still(index) if index == middle else moved(index)
    config = PoseAlignConfig(steps=60, lr=3e-3, face_weight=1.0, max_frames=2)
    found = align_poses(model, data, indices, config, "plate", scene_scale_of(model))
    assert torch.count_nonzero(found[0]) > 0 and torch.count_nonzero(found[2]) > 0
    assert torch.count_nonzero(found[1]) == 0
