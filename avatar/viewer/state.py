"""What one viewer tab looks at, and the camera maths that turns it into a view matrix.

Everything here is pure (no model, no server): :class:`ViewState` parses and validates the
settings a page sends, :func:`orbit_viewmat` moves a training camera around the head, and
:func:`project_points` places Gaussian centres on the image.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

_TRUE = {"1", "true", "on", "yes"}
_FALSE = {"0", "false", "off", "no", ""}


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name}: expected a boolean (1/0, true/false), got {value!r}")


def _as_float(name: str, value: Any, lo: float, hi: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return min(max(number, lo), hi)


@dataclass(frozen=True)
class ViewState:
    """One tab's view: which speech, when, from where, and which layers.

    Camera offsets are relative to a training camera (``frame``'s, or the current frame's when
    ``follow`` is on), so "reset" is just zero offsets and the default view is the one the avatar
    was trained to reproduce.
    """

    speech: str = ""
    """Speech id (see the engine's speech list); empty: the default speech."""
    t: float = 0.0
    """Time in the speech, seconds; the frame shown is ``floor(t * fps)``."""
    frame: int = 0
    """Training frame whose camera (and torso) is used when ``follow`` is off."""
    follow: bool = True
    """Use the camera and torso of the training frame at the current time (the head moves as in
    the video) instead of the fixed ``frame``."""
    yaw: float = 0.0
    """Orbit about the head, degrees, around the camera's vertical axis."""
    pitch: float = 0.0
    """Orbit about the head, degrees, around the camera's horizontal axis."""
    zoom: float = 1.0
    """Magnification: the camera moves to ``1 / zoom`` of its distance to the head."""
    pan_x: float = 0.0
    """Head shift to the right, in units of its depth (``pan_x * fx`` pixels)."""
    pan_y: float = 0.0
    """Head shift downwards, in units of its depth."""
    face: bool = True
    """Draw the face branch."""
    mouth: bool = True
    """Draw the inside-of-mouth branch."""
    background: bool = True
    """Composite over the subject's torso and background plate (else over flat grey)."""
    points: bool = False
    """Draw the deformed Gaussian centres over the frame."""
    blink: Optional[float] = None
    """Override both eye-blink conditions with this value in [0, 1]; None: the subject's track."""

    def update(self, values: Mapping[str, Any]) -> "ViewState":
        """A copy with ``values`` applied (strings from a query string or JSON values).

        Raises:
            ValueError: an unknown name or a value that does not parse; the message names it.
        """
        changes: dict[str, Any] = {}
        for name, value in values.items():
            if name == "speech":
                changes[name] = str(value)[:64]
            elif name == "t":
                changes[name] = _as_float(name, value, 0.0, 1e6)
            elif name == "frame":
                changes[name] = int(_as_float(name, value, 0, 1e9))
            elif name in ("follow", "face", "mouth", "background", "points"):
                changes[name] = _as_bool(name, value)
            elif name == "yaw":
                yaw = _as_float(name, value, -1e6, 1e6)
                changes[name] = (yaw + 180.0) % 360.0 - 180.0
            elif name == "pitch":
                changes[name] = _as_float(name, value, -89.0, 89.0)
            elif name == "zoom":
                changes[name] = _as_float(name, value, 0.1, 20.0)
            elif name in ("pan_x", "pan_y"):
                changes[name] = _as_float(name, value, -5.0, 5.0)
            elif name == "blink":
                off = value is None or str(value).strip().lower() in ("", "none", "null", "off")
                changes[name] = None if off else _as_float(name, value, 0.0, 1.0)
            else:
                known = ", ".join(f.name for f in dataclasses.fields(self))
                raise ValueError(f"unknown view setting {name!r}; known: {known}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _rotation(yaw_deg: float, pitch_deg: float, dtype: torch.dtype, device: torch.device) -> Tensor:  # [3, 3]
    """Yaw about camera y (down), then pitch about camera x (right), OpenCV camera axes."""
    y, p = math.radians(yaw_deg), math.radians(pitch_deg)
    cy, sy, cp, sp = math.cos(y), math.sin(y), math.cos(p), math.sin(p)
    ry = torch.tensor([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]], dtype=dtype, device=device)
    rx = torch.tensor([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]], dtype=dtype, device=device)
    return rx @ ry


def orbit_viewmat(
    viewmat: Tensor,  # [4, 4]
    target: Tensor,  # [3]
    yaw: float = 0.0,
    pitch: float = 0.0,
    zoom: float = 1.0,
    pan_x: float = 0.0,
    pan_y: float = 0.0,
) -> Tensor:  # [4, 4]
    """A training camera moved around a target point (the head's centre).

    The world is turned about ``target`` in the camera's own axes (so "left/right" means the
    image's left/right whatever the training pose), the camera is brought ``zoom`` times closer
    along the line to the target (which keeps the target on the same pixel), and the target is
    shifted by ``pan`` times its depth in the image plane.

    Args:
        viewmat: world-to-camera of the training frame (OpenCV axes: x right, y down, z forward). [4, 4]
        target: the point to orbit, in world coordinates. [3]
        yaw, pitch: degrees.
        zoom: > 0; 1 keeps the training distance.
        pan_x, pan_y: image-plane shift of the target, in units of its depth.

    Returns:
        The new world-to-camera matrix. [4, 4]
    """
    rot = _rotation(yaw, pitch, viewmat.dtype, viewmat.device)
    c = viewmat[:3, :3] @ target + viewmat[:3, 3]  # target in camera coordinates [3]
    moved = c / zoom
    moved = moved + torch.stack([pan_x * moved[2], pan_y * moved[2], torch.zeros_like(moved[2])])
    adjust = torch.eye(4, dtype=viewmat.dtype, device=viewmat.device)
    adjust[:3, :3] = rot
    adjust[:3, 3] = moved - rot @ c
    return adjust @ viewmat


def project_points(
    points: Tensor,  # [N, 3]
    viewmat: Tensor,  # [4, 4]
    K: Tensor,  # [3, 3]
    width: int,
    height: int,
) -> Tensor:  # [M, 2]
    """Integer pixel positions of the points in front of the camera that land inside the image.

    Args:
        points: world coordinates. [N, 3]
        viewmat: world-to-camera. [4, 4]
        K: intrinsics. [3, 3]

    Returns:
        Pixel (x, y) of the visible points, long. [M, 2]
    """
    cam = points @ viewmat[:3, :3].T + viewmat[:3, 3]  # [N, 3]
    front = cam[:, 2] > 1e-6
    cam = cam[front]
    uv = cam[:, :2] / cam[:, 2:3] * torch.stack([K[0, 0], K[1, 1]]) + torch.stack([K[0, 2], K[1, 2]])
    px = torch.floor(uv).long()
    inside = (px[:, 0] >= 0) & (px[:, 0] < width) & (px[:, 1] >= 0) & (px[:, 1] < height)
    return px[inside]

