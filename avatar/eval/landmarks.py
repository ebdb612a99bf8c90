"""Mouth metrics from face landmarks: LMD, mouth-opening correlation and lip-sync to audio.

Rendered frames and ground-truth frames are both run through the same mediapipe face mesh
(:class:`MouthTracker`), and the mouth is compared in the field's ways:

- :func:`lmd`: mean distance of the lip landmarks after removing each set's centroid (so head
  placement does not count, only mouth shape), in pixels of a 512 image;
- :func:`inner_lip_opening` + :func:`mouth_correlation`: does the rendered mouth open when the
  real one does;
- :func:`audio_envelope` + :func:`lip_sync_correlation`: for speech the subject never said
  (no ground-truth video), does the mouth open with the loudness of the speech, allowing a
  small lag.

All landmark arrays are ``[T, 478, 2]`` (or ``[T, 478, 3]``; only x, y are used) in pixels,
NaN where no face was found; every function skips such frames.
"""

from __future__ import annotations

import logging
from typing import Iterable

import numpy as np

from avatar import topology

log = logging.getLogger(__name__)

MOUTH = topology.MOUTH
"""The 40 lip landmarks LMD is measured on: the outer and inner lip loops."""
AUDIO_RATE = 16_000
"""Sample rate :func:`audio_envelope` expects by default (the subject's audio.wav)."""


class MouthTracker:
    """Runs mediapipe's face mesh (478 landmarks, refined lips and irises) over frames.

    Every :meth:`track` call builds a fresh face-mesh graph, so two sequences (ground truth and
    render) are measured by identical, independent trackers: no tracking state leaks from one
    into the other, and a comparison does not depend on which was tracked first.

    Args:
        video: True (default) for consecutive frames of one sequence: mediapipe then detects
            the face once and follows it, cropping each frame around the previous landmarks.
            That is several times faster than detecting on every frame and gives steadier
            landmarks, and since both sequences get the same treatment the comparison stays
            fair. False treats every frame on its own (use it for unrelated stills, or to keep
            one bad rendered frame from influencing the next).
        min_detection_confidence: face detection score below which a frame has no face.
        min_tracking_confidence: in video mode, landmark confidence below which the face is
            re-detected.
    """

    def __init__(self, *, video: bool = True, min_detection_confidence: float = 0.5,
                 min_tracking_confidence: float = 0.5) -> None:
        for name, value in (("min_detection_confidence", min_detection_confidence),
                            ("min_tracking_confidence", min_tracking_confidence)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.video = video
        self.min_detection_confidence = min_detection_confidence
        self.min_tracking_confidence = min_tracking_confidence

    def track(self, frames: Iterable[np.ndarray]) -> np.ndarray:
        """Landmarks of the (largest-scoring) face in each frame.

        Args:
            frames: RGB uint8 images [H, W, 3], any iterable (a list, or
                :func:`avatar.media.iter_frames` streaming from a video).

        Returns:
            float32 [T, 478, 2]: x, y in pixels of each frame, NaN rows where no face was found.

        Raises:
            ValueError: a frame is not RGB uint8 [H, W, 3].
        """
        with self.session() as session:
            for frame in frames:
                session.add(frame)
            return session.landmarks()

    def session(self) -> "MouthTrackingSession":
        """A fresh tracker fed one frame at a time, for callers that produce frames in a loop
        and cannot keep them all (evaluation of long subjects tracks its renders and the
        ground truth side by side without holding either sequence). Use it as a context manager."""
        return MouthTrackingSession(self)


class MouthTrackingSession:
    """One face-mesh graph over one sequence; see :meth:`MouthTracker.session`."""

    def __init__(self, tracker: MouthTracker) -> None:
        import mediapipe as mp

        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=not tracker.video,
            max_num_faces=1,
            refine_landmarks=True,
            min_detection_confidence=tracker.min_detection_confidence,
            min_tracking_confidence=tracker.min_tracking_confidence,
        )
        self._out: list[np.ndarray] = []

    def __enter__(self) -> "MouthTrackingSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._mesh.close()

    def add(self, frame: np.ndarray) -> np.ndarray:
        """Track the next frame (RGB uint8 [H, W, 3]); its float32 [478, 2] landmarks, NaN if no face."""
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"frame {len(self._out)} must be RGB uint8 [H, W, 3], got {frame.dtype} {frame.shape}")
        result = self._mesh.process(np.ascontiguousarray(frame))
        if not result.multi_face_landmarks:
            xy = np.full((topology.N_LANDMARKS, 2), np.nan, np.float32)
        else:
            h, w = frame.shape[:2]
            xy = np.array([(p.x * w, p.y * h) for p in result.multi_face_landmarks[0].landmark], np.float32)
        self._out.append(xy)
        return xy

    def landmarks(self) -> np.ndarray:
        """float32 [T, 478, 2] of the frames added so far (logs how many had no face)."""
        if not self._out:
            return np.zeros((0, topology.N_LANDMARKS, 2), np.float32)
        found = sum(not np.isnan(o[0, 0]) for o in self._out)
        if found < len(self._out):
            log.info("face mesh found a face in %d of %d frames", found, len(self._out))
        return np.stack(self._out)


def _as_sequence(landmarks: np.ndarray, name: str) -> np.ndarray:
    """[478, D] or [T, 478, D] (D >= 2) -> float64 [T, 478, 2]."""
    a = np.asarray(landmarks, dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[1] != topology.N_LANDMARKS or a.shape[2] < 2:
        raise ValueError(
            f"{name} must be [T, {topology.N_LANDMARKS}, 2] (or 3) landmarks, got shape {a.shape}"
        )
    return a[..., :2]


def lmd(pred_landmarks: np.ndarray, gt_landmarks: np.ndarray, size: int) -> float:
    """Mouth landmark distance: mean lip-landmark error after centring, in pixels at 512.

    Each frame's 40 lip landmarks (:data:`MOUTH`) are centred on their own mean, for the
    prediction and the ground truth separately, so a shifted head costs nothing and only the
    mouth's shape and opening count; the Euclidean distances are averaged over landmarks and
    frames and rescaled by ``512 / size`` so that figures at different resolutions compare.

    Args:
        pred_landmarks: from the rendered frames. [T, 478, 2] (or [478, 2])
        gt_landmarks: from the ground-truth frames, same shape.
        size: side of the frames the landmarks were measured on, in pixels.

    Returns:
        The LMD; NaN (with a warning) when no frame has a face in both.

    Raises:
        ValueError: shapes differ or ``size`` is not positive.
    """
    p, g = _as_sequence(pred_landmarks, "pred_landmarks"), _as_sequence(gt_landmarks, "gt_landmarks")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt landmarks must have the same shape, got {p.shape} and {g.shape}")
    if size <= 0:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    p, g = p[:, MOUTH], g[:, MOUTH]
    ok = np.isfinite(p).all(axis=(1, 2)) & np.isfinite(g).all(axis=(1, 2))
    if not ok.any():
        log.warning("lmd: no frame has a face in both sequences; returning NaN")
        return float("nan")
    p, g = p[ok], g[ok]
    p = p - p.mean(axis=1, keepdims=True)
    g = g - g.mean(axis=1, keepdims=True)
    return float(np.linalg.norm(p - g, axis=-1).mean() * 512.0 / size)


def inner_lip_opening(landmarks: np.ndarray) -> np.ndarray:
    """Mouth opening per frame (see :func:`avatar.topology.inner_lip_opening`); float64 [T], NaN
    where the face is missing."""
    return topology.inner_lip_opening(_as_sequence(landmarks, "landmarks"))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation over the entries finite in both; NaN with < 3 of them or no variance."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    x, y = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


def _as_series(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1D series [T], got shape {a.shape}")
    return a


def mouth_correlation(pred_open: np.ndarray, gt_open: np.ndarray) -> float:
    """Pearson correlation of rendered vs. true mouth opening over frames (NaN frames skipped).

    Args:
        pred_open, gt_open: e.g. :func:`inner_lip_opening` of each sequence. [T]

    Returns:
        Correlation in [-1, 1]; NaN when fewer than 3 frames are valid in both or one series
        is constant (a frozen mouth has no defined correlation, and must not score 0 by luck).

    Raises:
        ValueError: the series are not 1D of the same length.
    """
    a, b = _as_series(pred_open, "pred_open"), _as_series(gt_open, "gt_open")
    if a.shape != b.shape:
        raise ValueError(f"pred_open and gt_open must have the same length, got {a.shape[0]} and {b.shape[0]}")
    return _pearson(a, b)


def lip_sync_correlation(opening: np.ndarray, audio_envelope: np.ndarray, max_lag: int = 4) -> tuple[float, int]:
    """Best correlation of mouth opening with the speech envelope over small time shifts.

    The mouth leads or trails the sound by a frame or two (articulation starts before voicing,
    and a model may add latency), so the correlation is taken at every lag in
    ``[-max_lag, max_lag]`` and the highest is reported.

    Args:
        opening: mouth opening per frame, e.g. :func:`inner_lip_opening`. [T]
        audio_envelope: loudness per frame, e.g. :func:`audio_envelope`. [T]
        max_lag: largest shift tried, in frames.

    Returns:
        ``(best_corr, lag)``: the highest Pearson correlation (signed: a mouth that closes when
        the speech is loud scores below 0) and its lag; a positive lag means the mouth trails
        the audio by that many frames (``opening[t + lag]`` pairs with ``envelope[t]``).
        ``(nan, 0)`` when no lag gives a defined correlation.

    Raises:
        ValueError: the series differ in length or ``max_lag`` is negative.
    """
    a, b = _as_series(opening, "opening"), _as_series(audio_envelope, "audio_envelope")
    if a.shape != b.shape:
        raise ValueError(f"opening and audio_envelope must have the same length, got {a.shape[0]} and {b.shape[0]}")
    if max_lag < 0:
        raise ValueError(f"max_lag must be >= 0, got {max_lag}")
    n = a.shape[0]
    best, best_lag = float("nan"), 0
    for lag in range(-max_lag, max_lag + 1):
        if abs(lag) >= n:
            continue
        if lag >= 0:
            c = _pearson(a[lag:], b[: n - lag])
        else:
            c = _pearson(a[: n + lag], b[-lag:])
        if np.isfinite(c) and (not np.isfinite(best) or c > best):
            best, best_lag = c, lag
    return best, best_lag


def audio_envelope(
    samples: np.ndarray,
    fps: float,
    n_frames: int,
    *,
    rate: int = AUDIO_RATE,
    smooth_frames: float = 1.0,
) -> np.ndarray:
    """Loudness of speech per video frame: windowed RMS, lightly smoothed, peak scaled to 1.

    Frame ``k`` shows time ``k / fps``; its value is the RMS of the samples in a window of one
    frame period centred there (40 ms at 25 fps: long enough to span a pitch period, short
    enough to follow syllables). A Gaussian over ``smooth_frames`` frames then removes the
    flicker that the mouth, a slow articulator, cannot follow.

    Args:
        samples: mono audio. [S]
        fps: video frame rate.
        n_frames: frames to produce (the video's length; windows past the audio are silent).
        rate: sample rate of ``samples`` (16 kHz, the subject's audio).
        smooth_frames: standard deviation of the smoothing, in frames; 0 for none.

    Returns:
        float64 [n_frames] in [0, 1] (all zero for silence).

    Raises:
        ValueError: ``samples`` is not 1D, or a rate or count is not positive.
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"samples must be mono [S], got shape {x.shape}")
    if fps <= 0 or rate <= 0 or n_frames < 0 or smooth_frames < 0:
        raise ValueError(
            f"fps and rate must be positive, n_frames and smooth_frames >= 0; got fps={fps}, "
            f"rate={rate}, n_frames={n_frames}, smooth_frames={smooth_frames}"
        )
    half = max(1, int(round(rate / fps / 2)))
    cumsum = np.concatenate([[0.0], np.cumsum(x * x)])
    centre = np.round(np.arange(n_frames) * rate / fps).astype(np.int64)
    lo = np.clip(centre - half, 0, len(x))
    hi = np.clip(centre + half, 0, len(x))
    rms = np.sqrt(np.maximum(cumsum[hi] - cumsum[lo], 0.0) / (2 * half))
    if smooth_frames > 0 and n_frames > 1:
        radius = int(np.ceil(3 * smooth_frames))
        k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / smooth_frames) ** 2)
        # Zero-pad, and divide by the weight that falls inside the sequence so the ends do not sag.
        weight = np.convolve(np.pad(np.ones(n_frames), radius), k, mode="valid")
        rms = np.convolve(np.pad(rms, radius), k, mode="valid") / weight
    top = float(rms.max()) if rms.size else 0.0
    return rms / top if top > 0 else rms


__all__ = [
    "MOUTH",
    "MouthTracker",
    "audio_envelope",
    "inner_lip_opening",
    "lip_sync_correlation",
    "lmd",
    "mouth_correlation",
]
