"""Face and mouth deformation networks: identity at init, gradients, shapes, determinism."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from avatar.models.deformation import (
    FaceDeformation,
    FaceDeformationConfig,
    MouthDeformation,
    MouthDeformationConfig,
    apply_deformation,
    quaternion_multiply,
)
from avatar.models.encodings import TriPlaneConfig

BOX = dict(center=(0.0, 0.02, 0.05), half_extent=(0.1, 0.12, 0.1))


def face(seed: int = 0, **kw) -> FaceDeformation:
    torch.manual_seed(seed)
    return FaceDeformation(FaceDeformationConfig(encoding=TriPlaneConfig(**BOX), **kw))


def mouth(seed: int = 0) -> MouthDeformation:
    torch.manual_seed(seed)
    encoding = TriPlaneConfig(n_levels=4, max_resolution=64, **BOX)
    return MouthDeformation(MouthDeformationConfig(encoding=encoding))


def points(n: int = 200, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    unit = torch.rand(n, 3, generator=g) * 2 - 1
    return torch.tensor(BOX["center"]) + unit * torch.tensor(BOX["half_extent"])


def canonical(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return points(n), torch.randn(n, 4, generator=g) * 1.7, torch.randn(n, 3, generator=g) - 4


@pytest.mark.parametrize("zero", [False, True])
def test_identity_at_init(zero):
    model, x = face(), points()
    audio, motion = torch.randn(32), torch.rand(5)
    if zero:
        audio, motion = torch.zeros(32), torch.zeros(5)
    out = model(x, audio, motion)
    assert out.d_xyz.shape == (200, 3) and out.d_rot.shape == (200, 4) and out.d_scale.shape == (200, 3)
    for t in (out.d_xyz, out.d_rot, out.d_scale):
        assert torch.equal(t, torch.zeros_like(t))
    means, quats, log_scales = canonical(200)
    got = apply_deformation(means, quats, log_scales, out.d_xyz, out.d_rot, out.d_scale)
    for a, b in zip(got, (means, quats, log_scales)):
        assert torch.equal(a, b)
    d = mouth()(x, audio)
    assert d.shape == (200, 3) and torch.equal(d, torch.zeros_like(d))


def test_attention_and_batched_condition():
    model, x = face(), points(50)
    audio, motion = torch.randn(3, 32), torch.rand(3, 5)
    with torch.no_grad():
        model.out.bias.normal_()
        model.out.weight.normal_(std=0.1)
    out = model(x, audio, motion)
    assert out.d_xyz.shape == (3, 50, 3) and out.d_rot.shape == (3, 50, 4)
    assert out.d_scale.shape == (3, 50, 3)
    assert out.attention.shape == (50, 2)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(50))
    for b in range(3):  # batched frames == one frame at a time
        single = model(x, audio[b], motion[b])
        torch.testing.assert_close(out.d_xyz[b], single.d_xyz)
        torch.testing.assert_close(out.d_rot[b], single.d_rot)
    assert mouth()(x, audio).shape == (3, 50, 3)
    empty = model(x[:0], audio, motion)  # all Gaussians pruned
    assert empty.d_xyz.shape == (3, 0, 3) and empty.attention.shape == (0, 2)
    with pytest.raises(ValueError, match="same batch dims"):
        model(x, audio, motion[0])
    with pytest.raises(ValueError, match=r"\[5\] or \[B, 5\]"):
        model(x, audio[0], torch.rand(4))
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        model(x[None], audio[0], motion[0])


def test_offsets_are_in_world_units():
    """The network predicts box units: a constant raw output becomes raw * half_extent."""
    model = face()
    with torch.no_grad():
        model.out.bias.copy_(torch.arange(1.0, 11.0))
    out = model(points(5), torch.zeros(32), torch.zeros(5))
    expected = torch.tensor([1.0, 2.0, 3.0]) * torch.tensor(BOX["half_extent"])
    torch.testing.assert_close(out.d_xyz, expected.expand(5, 3))
    torch.testing.assert_close(out.d_rot, torch.tensor([4.0, 5, 6, 7]).expand(5, 4))
    torch.testing.assert_close(out.d_scale, torch.tensor([8.0, 9, 10]).expand(5, 3))


@pytest.mark.parametrize("which", ["face", "mouth"])
def test_gradients_reach_every_parameter(which):
    model = face() if which == "face" else mouth()
    with torch.no_grad():  # zero output weights block the gradient upstream: perturb them
        model.out.weight.normal_(std=0.1)
    x = points(300).requires_grad_(True)
    if which == "face":
        out = model(x, torch.randn(32), torch.rand(5))
        loss = out.d_xyz.square().sum() + out.d_rot.square().sum() + out.d_scale.square().sum()
    else:
        loss = model(x, torch.randn(32)).square().sum()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_determinism_under_seed():
    a, b = face(seed=7), face(seed=7)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    for m in (a, b):
        with torch.no_grad():
            m.out.weight.copy_(torch.linspace(-0.1, 0.1, m.out.weight.numel()).view_as(m.out.weight))
    x, audio, motion = points(), torch.randn(32), torch.rand(5)
    for ta, tb in zip(a(x, audio, motion), b(x, audio, motion)):
        assert (ta is None and tb is None) or torch.equal(ta, tb)
    assert not torch.equal(face(seed=8).encoding.embeddings, a.encoding.embeddings)


def test_config_round_trip_rebuilds_the_model():
    for cfg, cls in (
        (
            FaceDeformationConfig(encoding=TriPlaneConfig(**BOX), motion_dim=3, n_layers=2),
            FaceDeformationConfig,
        ),
        (MouthDeformationConfig(hidden=16), MouthDeformationConfig),
    ):
        data = json.loads(json.dumps(dataclasses.asdict(cfg)))
        again = cls.from_dict(data)
        assert again == cfg and isinstance(again.encoding, TriPlaneConfig)
        original, rebuilt = cfg.setup(), again.setup()
        rebuilt.load_state_dict(original.state_dict())  # same parameter names and shapes
    assert MouthDeformationConfig().encoding.max_resolution == 128
    with pytest.raises(ValueError, match="n_layers"):
        FaceDeformationConfig(n_layers=1)
    with pytest.raises(ValueError, match="unknown fields"):
        FaceDeformationConfig.from_dict({"encoding": {"levels": 3}})


def _matrix(q: torch.Tensor) -> torch.Tensor:
    w, x, y, z = (q / q.norm(dim=-1, keepdim=True)).unbind(-1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def test_rotation_delta_composes():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(10, 4, generator=g, dtype=torch.float64)
    b = torch.randn(10, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(_matrix(quaternion_multiply(a, b)), _matrix(a) @ _matrix(b))
    # r for a rotation by 90 degrees about z: q_d = (cos 45, 0, 0, sin 45) = (1, 0, 0, 0) + r
    half = math.pi / 4
    r = torch.tensor([math.cos(half) - 1, 0, 0, math.sin(half)], dtype=torch.float64).expand(10, 4)
    means, _, log_scales = canonical(10)
    _, quats, _ = apply_deformation(means.double(), b, log_scales.double(), d_rot=r)
    rz = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(_matrix(quats), rz @ _matrix(b))
    torch.testing.assert_close(quats.norm(dim=-1), b.norm(dim=-1))
