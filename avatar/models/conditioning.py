"""What every avatar kind shares on the speech side: the audio code, its mouth read-out and the
per-frame conditions built from them.

Each kind subclasses :class:`SpeechConditioned` and reads the conditions its own way (the
Gaussian kind moves points with them, the NGP kind gates a field); the drivers, the evaluation
and the trainers only use the methods here.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from avatar.models.audio import AudioConditioner, AudioEncoderConfig
from avatar.models.interface import FrameCondition


class SpeechConditioned(nn.Module):
    """An audio conditioner (``audio``) and a linear mouth read-out of its code (``mouth_readout``).

    The read-out is trained against the tracked mouth, so that the code carries mouth shape rather
    than the features that tell one voice's frames apart (see
    :data:`avatar.models.talking_head.MOUTH_TARGETS`). Subclasses hold ``config.motion_features``.
    """

    def __init__(self, audio: AudioEncoderConfig, mouth_targets: Sequence[str]):
        super().__init__()
        self.audio = AudioConditioner(audio)
        self.mouth_readout = nn.Linear(audio.code_dim, len(mouth_targets)) if mouth_targets else None

    @property
    def motion_features(self) -> tuple[str, ...]:
        return tuple(self.config.motion_features)  # type: ignore[attr-defined]

    def audio_codes(self, features: Tensor, indices: Tensor, smooth: bool = True) -> Tensor:
        return self.audio(features, indices, smooth=smooth)[0]

    def predict_mouth(self, codes: Tensor) -> Tensor:
        """The mouth tracks (standardised, in ``config.mouth_targets`` order) that audio codes [B, C]
        predict: [B, K].

        Raises:
            ValueError: the model has no read-out (``mouth_targets`` is empty).
        """
        if self.mouth_readout is None:
            raise ValueError("this avatar has no mouth read-out (its config lists no mouth_targets)")
        return self.mouth_readout(codes)

    def conditions(self, features: Tensor, indices: Tensor, motion: Tensor, smooth: bool = True) -> list[FrameCondition]:
        """Conditions of B frames from the sequence's audio features [T, W, D] and motion tracks [B, E]."""
        codes, _ = self.audio(features, indices, smooth=smooth)
        return [FrameCondition(codes[b], motion[b]) for b in range(len(indices))]
