"""Audio condition of the avatar: per-frame audio encoder and temporal attention smoothing.

The subject stores one window of audio features per video frame, ``[T, W, D]`` (see
:mod:`avatar.audio_features`: mel ``W=16, D=80``; hubert/wav2vec2 ``W=4, D=hidden``). The avatar
turns frame ``t``'s window into a small code with :class:`AudioEncoder`, then smooths the codes of
the ``S`` frames around ``t`` with :class:`AudioAttention` (learned softmax weights over time,
the anchors' AudioAttNet idea), because single-frame codes jitter and mouth shapes depend on
neighbouring phonemes. :class:`AudioConditioner` chains both for a batch of frame indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from avatar.configs import Config


@dataclass
class AudioEncoderConfig(Config):
    """Options of :class:`AudioEncoder`, :class:`AudioAttention` and :class:`AudioConditioner`.

    Set ``window`` and ``dim`` from the subject's ``audio_features.shape[1:]``; the defaults fit
    the default mel features.
    """

    window: int = 16
    """W, feature frames per video frame (mel 16, hubert/wav2vec2 4)."""

    dim: int = 80
    """D, channels per feature frame (mel bands, or the speech model's hidden size)."""

    code_dim: int = 32
    """C, size of the audio code passed to the deformation networks (ER-NeRF's 32: enough for
    visemes, small enough not to overfit a few minutes of speech)."""

    hidden: int = 64
    """Channels of the convolutions over the W axis and of the hidden linear layer."""

    smooth_window: int = 8
    """S, frames whose codes :class:`AudioAttention` mixes: ``t - S // 2 .. t + (S - 1) // 2``
    (8 frames = 320 ms at 25 fps, the anchors' choice, about one syllable)."""

    attention_channels: tuple[int, ...] = (16, 8, 4, 2)
    """Channels of the 1D convolutions over the S axis in :class:`AudioAttention`, before the
    last one that outputs one score per frame."""

    negative_slope: float = 0.02
    """Slope of the LeakyReLUs (small: mel inputs are mostly negative log energies, which a
    plain ReLU would silence at the first layer)."""

    def __post_init__(self) -> None:
        for name in ("window", "dim", "code_dim", "hidden", "smooth_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"AudioEncoderConfig.{name}: expected a positive integer, got {value!r}"
                )
        self.attention_channels = tuple(self.attention_channels)
        if not all(isinstance(c, int) and c >= 1 for c in self.attention_channels):
            raise ValueError(
                f"AudioEncoderConfig.attention_channels: expected positive integers, got "
                f"{self.attention_channels!r}"
            )
        if not self.negative_slope >= 0:
            raise ValueError(
                f"AudioEncoderConfig.negative_slope: expected >= 0, got {self.negative_slope!r}"
            )

    def setup(self) -> "AudioConditioner":
        return AudioConditioner(self)


class AudioEncoder(nn.Module):
    """One frame's feature window to an audio code: ``[B, W, D] -> [B, C]``.

    Stride-2 convolutions over the W axis (D as channels) halve the window until one step is
    left (``ceil(log2 W)`` layers: 4 for mel, 2 for hubert), then two linear layers. Time is
    convolved, not flattened, so that a phoneme shifted by a feature frame gives a similar code.
    """

    def __init__(self, config: AudioEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else AudioEncoderConfig()
        layers: list[nn.Module] = []
        channels, length = config.dim, config.window
        while length > 1:
            layers += [
                nn.Conv1d(channels, config.hidden, kernel_size=3, stride=2, padding=1),
                nn.LeakyReLU(config.negative_slope),
            ]
            channels, length = config.hidden, (length + 1) // 2
        self.convs = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Linear(channels, config.hidden),
            nn.LeakyReLU(config.negative_slope),
            nn.Linear(config.hidden, config.code_dim),
        )

    @property
    def out_dim(self) -> int:
        """C, the code size."""
        return self.config.code_dim

    def forward(self, windows: Tensor) -> Tensor:
        """Encode feature windows.

        Args:
            windows: one feature window per frame. [B, W, D]

        Returns:
            Audio codes. [B, C]

        Raises:
            ValueError: ``windows`` is not ``[B, W, D]`` with the configured W and D.
        """
        c = self.config
        if windows.ndim != 3 or windows.shape[1:] != (c.window, c.dim):
            raise ValueError(
                f"AudioEncoder: expected windows of shape [B, {c.window}, {c.dim}], got "
                f"{tuple(windows.shape)}"
            )
        h = self.convs(windows.transpose(1, 2))  # [B, hidden, 1]
        return self.head(h[:, :, 0])  # [B, C]


class AudioAttention(nn.Module):
    """Temporal smoothing of S neighbouring codes by learned weights: ``[B, S, C] -> [B, C]``.

    1D convolutions over the S axis (C as input channels) score each frame from its context, a
    linear layer over S mixes the scores (so the weights can depend on position in the window),
    and a softmax over S turns them into weights that sum to 1; the output is the weighted mean
    of the codes. A convex combination keeps the output in the span of real codes, so smoothing
    never invents an audio code the deformation nets have not seen.
    """

    def __init__(self, config: AudioEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else AudioEncoderConfig()
        layers: list[nn.Module] = []
        channels = config.code_dim
        for out in (*config.attention_channels, 1):
            layers += [
                nn.Conv1d(channels, out, kernel_size=3, padding=1),
                nn.LeakyReLU(config.negative_slope),
            ]
            channels = out
        self.convs = nn.Sequential(*layers)
        self.mix = nn.Linear(config.smooth_window, config.smooth_window)

    def forward(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        """Smooth codes over time.

        Args:
            codes: codes of the S frames around each frame, in time order. [B, S, C]

        Returns:
            smoothed: weighted mean of the codes. [B, C]
            weights: softmax weights over the S frames; each row sums to 1. [B, S]

        Raises:
            ValueError: ``codes`` is not ``[B, S, C]`` with the configured S and C.
        """
        c = self.config
        if codes.ndim != 3 or codes.shape[1:] != (c.smooth_window, c.code_dim):
            raise ValueError(
                f"AudioAttention: expected codes of shape [B, {c.smooth_window}, {c.code_dim}], got "
                f"{tuple(codes.shape)}"
            )
        scores = self.convs(codes.transpose(1, 2))[:, 0]  # [B, S]
        weights = torch.softmax(self.mix(scores), dim=-1)  # [B, S]
        return torch.einsum("bs,bsc->bc", weights, codes), weights


def neighbourhood_indices(
    n_frames: int,
    indices: Tensor | Sequence[int],  # [B]
    size: int,
    device: torch.device | str | None = None,
) -> Tensor:  # [B, S]
    """Frame indices of the ``size`` frames around each index, clamped at the ends of the sequence.

    Frame ``t``'s neighbourhood is ``t - size // 2 .. t + (size - 1) // 2`` (so ``t`` sits at
    position ``size // 2``); indices before the first or past the last frame repeat the edge
    frame, which keeps the window full and its centre at ``t``.

    Args:
        n_frames: T, frames in the sequence.
        indices: frame indices in ``[0, T)``. [B]
        size: S, frames per neighbourhood.

    Returns:
        int64 frame indices in time order. [B, S]

    Raises:
        ValueError: ``size < 1``, ``n_frames < 1`` or an index is out of range.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"neighbourhood_indices: expected a positive integer size, got {size!r}")
    if n_frames < 1:
        raise ValueError(f"neighbourhood_indices: expected a sequence of T >= 1 frames, got T = {n_frames}")
    index = torch.as_tensor(indices, device=device).long().reshape(-1)  # [B]
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n_frames):
        raise ValueError(
            f"neighbourhood_indices: expected indices in [0, {n_frames}), got "
            f"{int(index.min())}..{int(index.max())}"
        )
    offsets = torch.arange(size, device=index.device) - size // 2  # [S]
    return (index[:, None] + offsets).clamp(0, n_frames - 1)  # [B, S]


def gather_neighbourhoods(
    features: Tensor,  # [T, ...]
    indices: Tensor | Sequence[int],  # [B]
    size: int,
) -> Tensor:  # [B, S, ...]
    """The ``size`` frames around each index (see :func:`neighbourhood_indices`).

    Args:
        features: per-frame features, e.g. audio windows. [T, ...]
        indices: frame indices in ``[0, T)``. [B]
        size: S, frames per neighbourhood.

    Returns:
        Neighbourhoods in time order. [B, S, ...]

    Raises:
        ValueError: ``size < 1``, ``features`` is empty or an index is out of range.
    """
    n_frames = features.shape[0] if features.ndim > 0 else 0
    return features[neighbourhood_indices(n_frames, indices, size, features.device)]


class AudioConditioner(nn.Module):
    """Frame indices to smoothed audio codes: gather, encode, attend.

    ``forward(features [T, W, D], indices [B]) -> (codes [B, C], weights [B, S])``. With
    ``smooth=False`` only the centre frames are encoded and the weights are one-hot at the
    centre: the anchors train the encoder alone first and switch the smoothing on later, so the
    attention does not learn from codes that still mean nothing.
    """

    def __init__(self, config: AudioEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else AudioEncoderConfig()
        self.encoder = AudioEncoder(config)
        self.attention = AudioAttention(config)

    @property
    def out_dim(self) -> int:
        """C, the code size."""
        return self.config.code_dim

    def forward(
        self,
        features: Tensor,  # [T, W, D]
        indices: Tensor | Sequence[int],  # [B]
        *,
        smooth: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Audio codes of frames.

        Args:
            features: the sequence's per-frame feature windows. [T, W, D]
            indices: frames to encode. [B]
            smooth: mix the codes of the S frames around each index with :class:`AudioAttention`;
                False encodes the indexed frames alone.

        Returns:
            codes: one audio code per index. [B, C]
            weights: the temporal weights used, rows summing to 1. [B, S]

        Raises:
            ValueError: ``features`` has the wrong shape or an index is out of range.
        """
        c = self.config
        if features.ndim != 3 or features.shape[1:] != (c.window, c.dim):
            raise ValueError(
                f"AudioConditioner: expected features of shape [T, {c.window}, {c.dim}], got "
                f"{tuple(features.shape)}"
            )
        size = c.smooth_window if smooth else 1
        frames = neighbourhood_indices(features.shape[0], indices, size, features.device)  # [B, S or 1]
        b = frames.shape[0]
        # Neighbouring frames share most of their neighbourhoods (a block of consecutive frames
        # when rendering, segments when training): encode each frame's window once.
        unique, inverse = torch.unique(frames, return_inverse=True)
        codes = self.encoder(features[unique])[inverse]  # [B, S or 1, C]
        if smooth:
            return self.attention(codes)
        weights = torch.zeros(b, c.smooth_window, dtype=codes.dtype, device=codes.device)
        weights[:, c.smooth_window // 2] = 1.0
        return codes[:, 0], weights
