"""The assembled head: identity at initialisation, and the face layer hiding the mouth interior."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar.models.gaussians import HeadInit
from avatar.models.talking_head import FrameCondition, TalkingHead, TalkingHeadConfig


def _wall(z: float, n: int = 400, half: float = 0.05) -> np.ndarray:
    g = np.linspace(-half, half, int(np.sqrt(n)))
    xx, yy = np.meshgrid(g, g)
    return np.stack([xx.ravel(), yy.ravel(), np.full(xx.size, z)], axis=1)


def _oval(radius: float, z: float, nose_z: float, n: int = 36) -> np.ndarray:
    """A face region: a circle of ``n`` landmarks in the plane ``z``, then a nose tip at ``nose_z``
    (the camera looks along +z from z < 0, so the front is towards -z)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.concatenate([np.stack([radius * np.cos(t), radius * np.sin(t), np.full(n, z)], 1), [[0, 0, nose_z]]])


def _head(face_opacity: float, color: bool = False, sh_degree: int = 0) -> TalkingHead:
    face = _wall(0.0)
    mouth = _wall(0.02, n=100, half=0.02)
    init = HeadInit(face, np.tile([0.9, 0.1, 0.1], (len(face), 1)), mouth, np.tile([0.1, 0.1, 0.9], (len(mouth), 1)),
                    _oval(0.1, z=0.01, nose_z=-0.02))
    torch.manual_seed(0)
    config = TalkingHeadConfig(sh_degree=sh_degree)
    config.face.color = color
    model = TalkingHead.from_init(config, init)
    with torch.no_grad():
        model.face.opacity_logits.fill_(float(np.log(face_opacity / (1 - face_opacity))))
        model.mouth.opacity_logits.fill_(4.0)
    return model


def _camera() -> tuple[torch.Tensor, torch.Tensor]:
    viewmat = torch.eye(4)
    viewmat[2, 3] = 0.3  # the walls sit 0.3 in front of the camera
    K = torch.tensor([[200.0, 0, 32], [0, 200.0, 32], [0, 0, 1]])
    return viewmat, K


def test_zero_condition_is_identity_at_init():
    model = _head(0.9)
    cond = FrameCondition(torch.zeros(model.config.audio.code_dim), torch.zeros(len(model.config.motion_features)))
    deformed, mouth = model.deform(cond)
    canonical, canonical_mouth = model.deform(None)
    torch.testing.assert_close(deformed.means, canonical.means)
    torch.testing.assert_close(deformed.quats / deformed.quats.norm(dim=-1, keepdim=True),
                               canonical.quats / canonical.quats.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(deformed.scales, canonical.scales)
    torch.testing.assert_close(mouth.means, canonical_mouth.means)


def test_closed_lips_hide_the_mouth_and_open_lips_show_it():
    viewmat, K = _camera()
    closed = _head(0.99).render(None, viewmat, K, 64, 64)
    centre = closed["rgb"][32, 32]
    assert closed["mouth_alpha"][32, 32] > 0.5, "the mouth layer is there..."
    assert centre[0] > 0.8 and centre[2] < 0.2, "...but the opaque face layer covers it"
    opened = _head(0.02).render(None, viewmat, K, 64, 64)
    centre = opened["rgb"][32, 32]
    assert centre[2] > 0.6 and centre[0] < 0.4, "with the face layer transparent the mouth shows"


def test_background_shows_where_the_head_is_not():
    viewmat, K = _camera()
    viewmat[2, 3] = 1.0  # farther away: the walls cover the middle 20 pixels only
    background = torch.full((64, 64, 3), 0.5)
    out = _head(0.99).render(None, viewmat, K, 64, 64, background)
    torch.testing.assert_close(out["rgb"][0, 0], torch.full((3,), 0.5), atol=1e-3, rtol=0)
    assert out["head_alpha"][32, 32] > 0.95


@pytest.mark.parametrize("color,sh_degree", [(False, 0), (True, 0), (True, 1)])
def test_batched_rendering_equals_one_frame_at_a_time(color, sh_degree):
    model = _head(0.9, color, sh_degree)
    viewmat, K = _camera()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.face_deform.out.parameters():  # leave the identity: make conditions matter
            p.normal_(0, 0.05)
    audio = torch.randn(2, model.config.audio.code_dim)
    motion = torch.rand(2, len(model.config.motion_features))
    backgrounds = torch.rand(2, 64, 64, 3)
    views = torch.stack([viewmat, viewmat])
    batched = model.render_many(FrameCondition(audio, motion), views, K, 64, 64, backgrounds)
    for b in range(2):
        single = model.render(FrameCondition(audio[b], motion[b]), viewmat, K, 64, 64, backgrounds[b])["rgb"]
        torch.testing.assert_close(batched[b], single, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[0], batched[1])


def test_colour_offsets_start_at_zero_and_shift_the_base_colour():
    model = _head(0.9, color=True)
    cond = FrameCondition(torch.randn(model.config.audio.code_dim), torch.rand(len(model.config.motion_features)))
    torch.testing.assert_close(model.deform(cond)[0].colors, model.deform(None)[0].colors)  # zero at init
    with torch.no_grad():
        model.face_deform.out.bias[10:13] = torch.tensor([0.1, -0.05, 0.0])
    shifted = model.deform(cond)[0].colors - model.deform(None)[0].colors
    torch.testing.assert_close(shifted, torch.tensor([0.1, -0.05, 0.0]).expand_as(shifted))
    plain = _head(0.9)
    assert plain.face_deform.out.out_features == 10 and model.face_deform.out.out_features == 13


def test_the_face_region_gate_is_inside_the_oval_and_in_front_of_it():
    from avatar.models.talking_head import face_region_gate

    region = torch.from_numpy(_oval(0.1, z=0.0, nose_z=-0.03)).float()
    points = torch.tensor([[0.0, 0.0, -0.01],  # on the face: inside, in front
                           [0.05, -0.06, -0.02],  # inside, in front
                           [0.15, 0.0, -0.01],  # beside the face (hair, ears)
                           [0.0, 0.0, 0.05],  # behind the oval's plane (back of the head)
                           [0.0, 0.12, -0.01]])  # above the oval
    torch.testing.assert_close(face_region_gate(points, region), torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]))
    flipped = region.clone()
    flipped[-1, 2] = 0.03  # the nose on the other side: the front is the other way
    torch.testing.assert_close(face_region_gate(points, flipped), torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]))


def test_colour_offsets_leave_the_gaussians_outside_the_face_alone():
    model = _head(0.9, color=True)
    with torch.no_grad():
        model.face_region.copy_(torch.from_numpy(_oval(0.03, z=0.01, nose_z=-0.02)).float())  # a small face
        model.face_deform.out.bias[10:13] = 0.05
    cond = FrameCondition(torch.randn(model.config.audio.code_dim), torch.rand(len(model.config.motion_features)))
    shifted = (model.deform(cond)[0].colors - model.deform(None)[0].colors)[:, 0]
    inside = model.face.means[:, :2].norm(dim=1) < 0.03
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(shifted[inside], torch.full_like(shifted[inside], 0.05))
    assert not shifted[~inside].any()
