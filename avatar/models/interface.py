"""What every avatar kind offers to the code that drives, renders, evaluates, views and exports it.

Rendering new speech, evaluation, the viewer and export never name a model class: they load a
run with :func:`avatar.run.load_avatar` and use this protocol. A new kind (the NGP field) is a new
class implementing it and one entry in :data:`avatar.models.MODEL_KINDS`; nothing above the
models changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Protocol, runtime_checkable

import numpy as np
from torch import Tensor


@dataclass
class FrameCondition:
    """What drives one frame (or B frames, with a leading batch dimension)."""

    audio: Tensor
    """[C_a] (or [B, C_a]) smoothed audio code, from :meth:`AvatarModel.audio_codes`."""
    motion: Tensor
    """[C_e] (or [B, C_e]) the non-audio condition: the named tracks of ``motion_features``
    (eye blinks and brows in 0..1, head rotation)."""


@runtime_checkable
class AvatarModel(Protocol):
    """A trained talking head, whatever its kind.

    Conditions come in two parts: the audio code, which the model computes from speech features
    (:meth:`audio_codes`), and the motion tracks named by ``motion_features``, which the caller
    takes from the subject (or a blink/pose track). Cameras are world-to-camera ``viewmat`` [4, 4]
    and intrinsics ``K`` [3, 3] in pixels of the rendered size.
    """

    kind: ClassVar[str]
    """The name of this kind in ``config.json`` and on the command line (``--model``)."""

    layers: ClassVar[tuple[str, ...]]
    """Names of the parts that can be shown or hidden (``render(layers=...)``), front last."""

    @property
    def motion_features(self) -> tuple[str, ...]:
        """Names of the motion-condition tracks, in the order ``FrameCondition.motion`` holds them."""
        ...

    def audio_codes(self, features: Tensor, indices: Tensor, smooth: bool = True) -> Tensor:
        """Audio codes [B, C_a] of frames ``indices`` [B] of a sequence's features [T, W, D]."""
        ...

    def render(self, cond: Optional[FrameCondition], viewmat: Tensor, K: Tensor, width: int, height: int,
               background: Optional[Tensor] = None, layers: Optional[tuple[str, ...]] = None) -> dict[str, Any]:
        """One frame: ``rgb`` [H, W, 3] composited over ``background`` [H, W, 3] (black when None),
        ``head_alpha`` [H, W, 1], and kind-specific extras. ``cond=None``: the canonical head."""
        ...

    def render_many(self, cond: FrameCondition, viewmats: Tensor, K: Tensor, width: int, height: int,
                    backgrounds: Tensor) -> Tensor:
        """B frames at once ([B, H, W, 3]); a kind may share work across the batch."""
        ...

    def head_center(self) -> Tensor:
        """[3] the head's centre in world units: the pivot of an orbiting camera."""
        ...

    def layer_points(self, cond: FrameCondition) -> dict[str, Tensor]:
        """Points [N, 3] per layer that show the model's structure (Gaussian centres, samples)."""
        ...

    def summary(self) -> dict[str, Any]:
        """A few JSON-ready facts for people (sizes per layer)."""
        ...

    def canonical_gaussians(self) -> Optional[dict[str, np.ndarray]]:
        """The undeformed Gaussians (means, sh, opacity_logits, log_scales, quats) for export, or
        None for a kind that has none."""
        ...
