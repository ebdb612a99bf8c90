"""Audio encoder, temporal attention, neighbourhood gathering and the conditioner."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from avatar.models.audio import (
    AudioAttention,
    AudioConditioner,
    AudioEncoder,
    AudioEncoderConfig,
    gather_neighbourhoods,
)


@pytest.mark.parametrize("window, dim", [(16, 80), (4, 64), (5, 12), (1, 8)])
def test_encoder_shapes(window, dim):
    torch.manual_seed(0)
    enc = AudioEncoder(AudioEncoderConfig(window=window, dim=dim, code_dim=24))
    codes = enc(torch.rand(3, window, dim) * 2 - 1)
    assert codes.shape == (3, 24) and torch.isfinite(codes).all()
    n_convs = sum(isinstance(m, torch.nn.Conv1d) for m in enc.modules())
    assert n_convs == {16: 4, 4: 2, 5: 3, 1: 0}[window]
    with pytest.raises(ValueError, match=rf"\[B, {window}, {dim}\]"):
        enc(torch.rand(3, window + 1, dim))


def test_attention_weights_sum_to_one_and_mix_convexly():
    torch.manual_seed(0)
    cfg = AudioEncoderConfig(code_dim=6, smooth_window=5)
    att = AudioAttention(cfg)
    codes = torch.randn(4, 5, 6)
    out, weights = att(codes)
    assert out.shape == (4, 6) and weights.shape == (4, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4))
    assert (weights > 0).all()
    torch.testing.assert_close(out, (weights[..., None] * codes).sum(1))
    same = codes[:, :1].expand(4, 5, 6)
    torch.testing.assert_close(att(same)[0], codes[:, 0])
    with pytest.raises(ValueError, match=r"\[B, 5, 6\]"):
        att(torch.randn(4, 8, 6))


def test_gather_clamps_at_the_ends():
    feats = torch.arange(10.0)[:, None, None].expand(10, 2, 3)  # frame t holds the value t
    got = gather_neighbourhoods(feats, torch.tensor([0, 1, 5, 9]), 4)
    assert got.shape == (4, 4, 2, 3)
    expected = torch.tensor([[0.0, 0, 0, 1], [0, 0, 1, 2], [3, 4, 5, 6], [7, 8, 9, 9]])
    torch.testing.assert_close(got[:, :, 0, 0], expected)
    odd = gather_neighbourhoods(feats, [0, 9], 3)[:, :, 0, 0]
    torch.testing.assert_close(odd, torch.tensor([[0.0, 0, 1], [8, 9, 9]]))
    torch.testing.assert_close(gather_neighbourhoods(feats, [2, 7], 1)[:, 0], feats[[2, 7]])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        gather_neighbourhoods(feats, [10], 4)
    with pytest.raises(ValueError, match="positive integer size"):
        gather_neighbourhoods(feats, [1], 0)


def test_conditioner_smooth_and_centre_only():
    torch.manual_seed(0)
    cfg = AudioEncoderConfig(window=4, dim=32, code_dim=8, smooth_window=6)
    cond = AudioConditioner(cfg)
    feats = torch.randn(20, 4, 32)
    idx = torch.tensor([0, 7, 19])
    codes, weights = cond(feats, idx)
    assert codes.shape == (3, 8) and weights.shape == (3, 6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    centre, onehot = cond(feats, idx, smooth=False)
    torch.testing.assert_close(centre, cond.encoder(feats[idx]))
    assert (onehot.argmax(-1) == 3).all() and (onehot.sum(-1) == 1).all()
    (codes.square().sum()).backward()
    for name, p in cond.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match=r"\[T, 4, 32\]"):
        cond(torch.randn(20, 16, 80), idx)


def test_config_round_trip_and_validation():
    cfg = AudioEncoderConfig(window=4, dim=1024, attention_channels=(8, 4))
    again = AudioEncoderConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert again == cfg
    assert isinstance(cfg.setup(), AudioConditioner)
    with pytest.raises(ValueError, match="window"):
        AudioEncoderConfig(window=0)


def test_conditioner_encodes_shared_neighbours_once_with_the_same_codes():
    """Frames whose neighbourhoods overlap share encoded windows; the codes equal encoding each
    frame's neighbourhood on its own (the reference: gather, then encode every window)."""
    torch.manual_seed(0)
    cfg = AudioEncoderConfig(window=4, dim=16, code_dim=8, smooth_window=8)
    cond = AudioConditioner(cfg)
    feats = torch.randn(40, 4, 16)
    idx = torch.tensor([0, 1, 2, 3, 20, 21, 39, 2])
    windows = gather_neighbourhoods(feats, idx, 8)  # [B, S, W, D]
    reference = cond.encoder(windows.reshape(-1, 4, 16)).reshape(len(idx), 8, -1)
    expected, _ = cond.attention(reference)
    calls = []
    cond.encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    codes, _ = cond(feats, idx)
    torch.testing.assert_close(codes, expected, rtol=1e-5, atol=1e-6)
    assert calls == [7 + 9 + 5]  # frames 0..6, 16..24 and 35..39, each encoded once
