"""The face branch's non-audio condition: blendshape tracks and the head's rotation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from avatar.errors import InputError
from avatar.models.talking_head import MOTION_FEATURES, POSE_FEATURES
from avatar.subject_data import (
    SubjectData,
    condition_tracks,
    head_rotation_features,
    mean_head_rotation,
    pose_columns,
)


def _cam_to_world(world_to_camera: np.ndarray) -> np.ndarray:
    """Pose track [T, 4, 4] from world-to-camera rotations [T, 3, 3] (translation irrelevant here)."""
    c2w = np.tile(np.eye(4), (len(world_to_camera), 1, 1))
    c2w[:, :3, :3] = np.swapaxes(world_to_camera, -1, -2)
    c2w[:, :3, 3] = [0.0, 0.0, 0.5]
    return c2w


def test_head_rotation_is_zero_at_the_reference_and_reads_tens_of_degrees_in_camera_axes():
    reference = Rotation.from_euler("xyz", [170.0, 5.0, -3.0], degrees=True).as_matrix()
    tilt = Rotation.from_euler("z", 10.0, degrees=True).as_matrix()  # about the camera's optical axis
    nod = Rotation.from_euler("x", -25.0, degrees=True).as_matrix()
    features = head_rotation_features(_cam_to_world(np.stack([reference, tilt @ reference, nod @ reference])),
                                      reference)
    np.testing.assert_allclose(features, [[0, 0, 0], [0, 0, 1.0], [-2.5, 0, 0]], atol=1e-5)


def test_mean_head_rotation_is_the_middle_of_a_symmetric_sway():
    reference = Rotation.from_euler("xyz", [180.0, 2.0, 0.0], degrees=True).as_matrix()
    sway = [Rotation.from_euler("y", a, degrees=True).as_matrix() @ reference for a in (-8.0, 0.0, 8.0)]
    np.testing.assert_allclose(mean_head_rotation(_cam_to_world(np.stack(sway))), reference, atol=1e-6)


def test_condition_tracks_mix_blendshapes_and_head_rotation_in_the_asked_order():
    reference = np.eye(3)
    turn = Rotation.from_euler("y", 20.0, degrees=True).as_matrix()
    tracks = {
        "blendshape_names": np.array(["eye_blink_left", "jaw_open"]),
        "blendshapes": np.array([[0.1, 0.7], [0.9, 0.2]], np.float32),
        "cam_to_world": _cam_to_world(np.stack([reference, turn])),
    }
    names = ("head_rot_y", "eye_blink_left", "head_rot_x")
    out = condition_tracks(tracks, names, reference)
    np.testing.assert_allclose(out, [[0.0, 0.1, 0.0], [2.0, 0.9, 0.0]], atol=1e-5)
    assert pose_columns(names) == [(0, 1), (2, 0)]
    with pytest.raises(InputError, match="brow_raise_left"):
        condition_tracks(tracks, ("brow_raise_left",), reference)


def test_a_pose_file_changes_only_the_head_rotation_columns(small_subject):
    _, subject = small_subject
    data = SubjectData(subject, 64, MOTION_FEATURES)
    frames = [0, 1, 2]
    own = data.motion[frames]
    c2w = data.subject.tracks["cam_to_world"][frames]
    torch.testing.assert_close(data.with_pose(own, c2w), own, atol=1e-5, rtol=0)
    turned = c2w.copy()
    turned[:, :3, :3] = turned[:, :3, :3] @ Rotation.from_euler("y", 15.0, degrees=True).as_matrix()
    posed = data.with_pose(own, turned)
    n_eye = len(MOTION_FEATURES) - len(POSE_FEATURES)
    torch.testing.assert_close(posed[:, :n_eye], own[:, :n_eye])
    assert (posed[:, n_eye:] - own[:, n_eye:]).abs().max() > 1.0  # 15 degrees is 1.5 units


def test_mouth_targets_are_standardised_on_the_train_frames_and_nan_without_a_face():
    from avatar.subject_data import LIP_GAP, mouth_target_tracks

    landmarks = np.zeros((4, 478, 3), np.float32)
    landmarks[:, 263, 0] = 2.0  # eye corners 2 apart
    landmarks[:, 14, 1] = [0.2, 0.4, 0.6, 5.0]  # lip gap over eye distance: 0.1, 0.2, 0.3, 2.5
    tracks = {
        "blendshape_names": np.array(["jaw_open", "eye_blink_left"]),
        "blendshapes": np.array([[0.0], [1.0], [2.0], [9.0]], np.float32) * [1.0, 0.0],
        "landmarks": landmarks,
        "valid": np.array([True, True, True, False]),
    }
    out = mouth_target_tracks(tracks, (LIP_GAP, "jaw_open"), train=np.array([0, 1, 2]))
    np.testing.assert_allclose(out[:3], [[-1.2247, -1.2247], [0.0, 0.0], [1.2247, 1.2247]], atol=1e-4)
    assert np.isnan(out[3]).all()  # no face in frame 3: nothing to teach there
    flat = mouth_target_tracks(tracks, ("eye_blink_left",), train=np.array([0, 1, 2]))
    assert np.isnan(flat).all()  # a track without variance teaches nothing
    with pytest.raises(InputError, match="mouth_pucker"):
        mouth_target_tracks(tracks, ("mouth_pucker",), train=np.array([0, 1]))


def test_inner_lip_opening_is_the_lip_gap_over_the_eye_distance_whatever_the_scale():
    from avatar.topology import inner_lip_opening

    face = np.zeros((478, 2))
    face[263, 0], face[14, 1] = 4.0, 1.0
    np.testing.assert_allclose(inner_lip_opening(np.stack([face, face * 3.0])), [0.25, 0.25])
    assert np.isnan(inner_lip_opening(np.full((478, 2), np.nan)))[0]
    with pytest.raises(ValueError, match="478"):
        inner_lip_opening(np.zeros((10, 2)))


def test_head_feather_covers_the_head_and_fades_out_beyond_it():
    from avatar.subject_data import head_feather

    head = torch.zeros(64, 64, 1, dtype=torch.bool)
    head[20:40, 20:40] = True
    w = head_feather(head, 256)[..., 0]  # d = 2 px at 256
    assert bool((w[20:40, 20:40] == 1.0).all())  # the head: the plate composite
    assert bool((w[:16] == 0).all()) and bool((w[:, 44:] == 0).all())  # past 2 d: the frame itself
    ring = w[16:44, 16:44]
    assert bool(((ring > 0) & (ring < 1)).any()) and float(w.min()) >= 0.0 and float(w.max()) <= 1.0


def test_the_frame_composite_is_the_frame_itself_away_from_the_head(small_subject):
    from avatar.subject_data import head_feather

    _, subject = small_subject
    data = SubjectData(subject, 128, MOTION_FEATURES)
    frame = data.frame(int(data.split("val")[0]))
    head = frame.head_mask > 0.5
    w = head_feather(head, 128)
    far = (w == 0).expand_as(frame.image)
    assert bool(far.any()) and torch.equal(frame.background[far], frame.image[far])
    on_head = head.expand_as(frame.image)
    torch.testing.assert_close(frame.background[on_head], frame.plate_background[on_head])
    # Over the plate, the background region is the plate, not the frame.
    assert not torch.equal(frame.plate_background[far], frame.image[far])


def test_face_paste_weight_covers_the_face_and_room_for_the_jaw_below_it():
    from avatar.subject_data import face_paste_weight

    face = torch.zeros(64, 64, 1, dtype=torch.bool)
    face[20:30, 20:40] = True
    w = face_paste_weight(face, 256, jaw_room=0.03)[..., 0]  # 8 px of jaw room, 2 px feather at 256
    assert bool((w[24:34, 24:36] == 1.0).all())  # the face and 8 rows under it, 4 px in: the render
    assert bool((w[:20] == 0).all()) and bool((w[38:] == 0).all())  # above and below: the frame
    assert bool((w[:, :20] == 0).all()) and bool((w[:, 40:] == 0).all())  # nothing outside the sides
    assert 0.0 < float(w[20, 30]) < float(w[22, 30]) < 1.0  # the fade, inside the face's edge
    assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0


def test_the_face_composite_is_the_frame_itself_off_the_face(small_subject):
    from avatar.subject import LABEL

    _, subject = small_subject
    data = SubjectData(subject, 128, MOTION_FEATURES)
    index = int(data.split("val")[0])
    frame = data.frame(index)
    rendered = torch.zeros_like(frame.image)
    pasted = frame.paste_face(rendered)
    off = (frame.face_weight() == 0).expand_as(frame.image)
    labels = torch.from_numpy(np.asarray(data.masks[index]))
    on = ((labels == LABEL["face"]) | (labels == LABEL["mouth_interior"]))[..., None].expand_as(frame.image)
    hair = (labels == LABEL["hair"])[..., None].expand_as(frame.image)
    inner = (frame.face_weight() == 1).expand_as(frame.image)
    assert bool((inner & on).any()) and bool((pasted[inner] == 0).all())  # inside the face: the render
    assert bool((pasted[on] < frame.image[on]).any())  # ... and fading into the frame at its edge
    assert bool((off & hair).any()) and torch.equal(pasted[off], frame.image[off])  # hair above it: the frame


def _eyes(iris_dx: float, iris_dy: float, scale: float = 1.0, angle_deg: float = 0.0) -> np.ndarray:
    """One face's landmarks: eyes 1 wide, irises offset by (dx, dy) eye widths in the eye's axes,
    the whole face scaled and turned in the image plane."""
    from avatar.topology import EYE_CORNERS, IRIS_CENTRES

    face = np.zeros((478, 3))
    for side, x0 in (("right", 0.0), ("left", 2.0)):
        c0, c1 = EYE_CORNERS[side]
        face[c0, :2], face[c1, :2] = (x0, 0.0), (x0 + 1.0, 0.0)
        face[IRIS_CENTRES[side], :2] = (x0 + 0.5 + iris_dx, iris_dy)
    a = np.radians(angle_deg)
    turn = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    face[:, :2] = scale * face[:, :2] @ turn.T + 7.0
    return face


def test_iris_offset_is_in_the_eyes_own_axes_and_eye_widths():
    from avatar.topology import iris_offset

    faces = np.stack([_eyes(0.0, 0.0), _eyes(0.1, -0.05, scale=3.0, angle_deg=20.0), _eyes(-0.2, 0.0, angle_deg=-90.0)])
    np.testing.assert_allclose(iris_offset(faces), [[0, 0], [0.1, -0.05], [-0.2, 0]], atol=1e-9)
    missing = faces.copy()
    missing[1] = np.nan
    assert np.isnan(iris_offset(missing)[1]).all() and np.isfinite(iris_offset(missing)[[0, 2]]).all()


def test_gaze_tracks_are_centred_on_the_median_and_fill_frames_without_a_face():
    from avatar.subject_data import GAZE_UNIT, gaze_features

    faces = np.stack([_eyes(0.0, 0.0), _eyes(0.05, 0.0), _eyes(0.5, 0.5), _eyes(0.1, -0.1)])
    valid = np.array([True, True, False, True])
    gaze = gaze_features(faces, valid)
    # median of the valid x (0, 0.05, 0.1) is 0.05; frame 2 lies halfway between frames 1 and 3
    np.testing.assert_allclose(gaze[:, 0], np.array([-0.05, 0.0, 0.025, 0.05]) / GAZE_UNIT, atol=1e-5)
    np.testing.assert_allclose(gaze[:, 1], np.array([0.0, 0.0, -0.05, -0.1]) / GAZE_UNIT, atol=1e-5)
    assert not gaze_features(faces, np.zeros(4, bool)).any()


def test_condition_tracks_read_gaze_from_the_landmarks():
    faces = np.stack([_eyes(0.0, 0.0), _eyes(0.1, 0.0), _eyes(0.05, 0.0)])
    tracks = {
        "blendshape_names": np.array(["eye_blink_left", "eye_blink_right"]),
        "blendshapes": np.array([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]], np.float32),
        "cam_to_world": _cam_to_world(np.stack([np.eye(3)] * 3)),
        "landmarks": faces,
        "valid": np.ones(3, bool),
    }
    out = condition_tracks(tracks, ("gaze_x", "eye_blink_left", "gaze_y"), np.eye(3))
    np.testing.assert_allclose(out, [[-1.0, 0.1, 0.0], [1.0, 0.2, 0.0], [0.0, 0.3, 0.0]], atol=1e-5)
    # a blink hides the iris: that frame's gaze comes from its neighbours
    tracks["blendshapes"][1] = 0.9
    out = condition_tracks(tracks, ("gaze_x",), np.eye(3))
    np.testing.assert_allclose(out[:, 0], [-0.5, 0.0, 0.5], atol=1e-5)


def test_head_lag_is_zero_when_still_and_decays_after_a_turn():
    from avatar.subject_data import head_lag_features

    rotation = np.zeros((40, 3))
    rotation[10:, 1] = 2.0  # a sudden 20-degree turn at frame 10, then still
    lag = head_lag_features(rotation, fps=25.0, seconds=0.2)
    assert not lag[:10].any()
    keep = np.exp(-1.0 / 5.0)
    np.testing.assert_allclose(lag[10:, 1], 2.0 * keep ** np.arange(1, 31), rtol=1e-5)
    assert not lag[:, [0, 2]].any()


def test_the_head_lag_follows_the_order_the_poses_play_in(small_subject):
    from avatar.models.talking_head import LAG_FEATURES

    _, subject = small_subject
    names = POSE_FEATURES + LAG_FEATURES
    data = SubjectData(subject, 64, names)
    c2w = data.subject.tracks["cam_to_world"][:6].copy()
    turn = Rotation.from_euler("y", 3.0, degrees=True).as_matrix()
    for t in range(6):  # the head turns steadily
        c2w[t, :3, :3] = np.linalg.matrix_power(turn, t) @ c2w[0, :3, :3]
    forwards = data.with_pose(data.motion[:6], c2w)[:, 3:]
    backwards = data.with_pose(data.motion[:6], c2w[::-1].copy())[:, 3:]
    assert (forwards[1:] * backwards[1:]).sum() < 0  # turning the other way, the hair trails the other way
    assert forwards[1:].abs().max() > 0.1
