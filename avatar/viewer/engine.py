"""The viewer's renderer: a trained run, its subject, the speeches it can say, one frame on request.

A speech's audio codes (the audio encoder and temporal smoothing over every frame) are computed
once when the speech is added, so a frame costs only the deformation networks and the
rasterizer. Conditions come from the same speech driver as ``avatar render``
(:class:`avatar.speak.SpeechDriver`): head pose and torso walk the training frames back and forth,
and blinks follow the subject's own blink timing, so the viewer previews what a render gives.
Rendering is serialised with a lock: tabs share one model and one device, and interleaving two
renders on a CPU would only make both slower.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import threading
import time
import wave
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from avatar.atomic import clean_stale_scratch
from avatar.errors import AvatarError, InputError
from avatar.media import AUDIO_RATE, load_audio, load_audio_bytes
from avatar.models import FrameCondition
from avatar.progress import Progress
from avatar.run import load_avatar
from avatar.speak import DriveOptions, SampleSpeech, SpeechDriver
from avatar.subject_data import SubjectData, lag_columns, pose_columns, scaled_intrinsics
from avatar.viewer.state import ViewState, orbit_viewmat, project_points

log = logging.getLogger(__name__)

SUBJECT_SPEECH = "subject"
"""Id of the subject's own audio (always available)."""

FILE_SPEECH = "file"
"""Id of the speech given on the command line."""

MAX_UPLOADS = 8
"""Uploaded speeches kept; the oldest is dropped after that (bounds memory on a long session)."""

MAX_SPEECH_S = 600.0
"""Longest speech accepted, seconds (its features and codes are held in memory)."""

JPEG_QUALITY = 90

_CODE_CHUNK = 256
"""Frames per audio-encoder call for the subject's own speech (bounds the gathered windows' memory)."""

_FLAT_GREY = 0.18
"""Background when the torso/background layer is off: dark enough for the head to stand out."""

_POINT_COLORS = {"face": (60, 230, 90), "mouth": (255, 70, 200)}


@dataclass
class Speech:
    """A speech the avatar can say: its audio for the page and its per-frame conditions."""

    id: str
    name: str
    n_frames: int
    codes: Tensor
    """[T, C] smoothed audio codes, on the model's device."""
    pose: np.ndarray
    """[T] subject frame whose camera and torso go with each frame (when the view follows it)."""
    motion: Tensor
    """[T, E] motion conditions (blinks, brows, head rotation), on the model's device."""
    wav: bytes
    """16 kHz mono 16-bit wav for the page's audio element."""

    def describe(self, fps: float) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "n_frames": self.n_frames,
                "duration_s": round(self.n_frames / fps, 3)}


@dataclass
class Rendered:
    """One rendered frame and what drove it."""

    jpeg: bytes
    info: dict[str, Any]


def wav_bytes(samples: np.ndarray, rate: int = AUDIO_RATE) -> bytes:
    """Mono float samples in [-1, 1] as an in-memory 16-bit PCM wav."""
    pcm = (np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wf:
        wf.setnchannels(1)
        wf.setsampwidth(2)
        wf.setframerate(rate)
        wf.writeframes(pcm.tobytes())
    return buffer.getvalue()


class ViewerEngine:
    """A trained run ready to render frames of any speech from any camera around the head.

    Args:
        run_dir: a run written by ``avatar train``.
        audio: a speech file (any format ffmpeg reads) offered besides the subject's own audio,
            and the default one when given.
        device: ``auto``, ``cpu`` or ``cuda``.
        size: side of the rendered frames in pixels; None: the training resolution.
        progress: reports building the subject's frame cache and the speech features.

    Raises:
        AvatarError: not a run, a missing subject, an unreadable audio file, a bad size.
    """

    def __init__(self, run_dir: Path | str, audio: Optional[Path | str] = None, device: str = "auto",
                 size: Optional[int] = None, progress: Optional[Progress] = None,
                 subject: Optional[Path | str] = None):
        self.run_dir = Path(run_dir)
        clean_stale_scratch()  # uploads a killed viewer was decoding
        avatar = load_avatar(run_dir, device, subject=subject)
        self.model, self.step = avatar.model, avatar.step
        self.model.requires_grad_(False)
        self.size = int(size or avatar.resolution)
        if not 16 <= self.size <= 4096:
            raise AvatarError(f"the viewer size must be between 16 and 4096 pixels, got {self.size}.")
        self.target = self.model.head_center()  # the orbit's pivot
        self.device = self.target.device
        self.data = SubjectData(avatar.subject_dir, avatar.resolution, self.model.motion_features, self.device,
                                progress)
        self.driver = SpeechDriver(self.model, self.data)
        self.fps = self.driver.fps
        self.K = torch.from_numpy(
            scaled_intrinsics(self.data.K.double().cpu().numpy(), avatar.resolution, self.size)
        ).float().to(self.device)
        self.motion_names = [str(n) for n in self.model.motion_features]
        self.pose_columns = pose_columns(self.motion_names)
        self.lag_columns = lag_columns(self.motion_names)
        self.blink_index = self.driver.blink_columns
        self._render_lock = threading.Lock()
        self._speech_lock = threading.Lock()
        self._speeches: OrderedDict[str, Speech] = OrderedDict()
        self._upload_ids = itertools.count(1)
        self._progress = progress
        subject_wav = self.data.subject.paths.audio
        self._add(Speech(SUBJECT_SPEECH, f"own audio ({self.data.subject.paths.root.name})", self.data.n_frames,
                         self._subject_codes(), np.arange(self.data.n_frames), self.data.motion,
                         self._subject_wav(subject_wav)))
        self.default_speech = SUBJECT_SPEECH
        if audio is not None:
            path = Path(audio)
            self.add_speech(load_audio(path), path.name, speech_id=FILE_SPEECH)
            self.default_speech = FILE_SPEECH
        self._progress = None  # loading is reported; uploads later must not draw over the terminal

    # -- speeches ------------------------------------------------------------------------------

    def _subject_wav(self, path: Path) -> bytes:
        if not path.is_file():
            log.warning("%s is missing; the subject's speech plays silently.", path)
            return wav_bytes(np.zeros(int(self.data.n_frames / self.fps * AUDIO_RATE), np.float32))
        return path.read_bytes()

    @torch.no_grad()
    def _subject_codes(self) -> Tensor:  # [T, C]
        """Smoothed audio codes of every subject frame, as the trainer and evaluation compute them."""
        n = self.data.n_frames
        with self._render_lock:
            parts = [self.driver.subject_condition(np.arange(s, min(s + _CODE_CHUNK, n))).audio
                     for s in range(0, n, _CODE_CHUNK)]
        return torch.cat(parts)

    def _add(self, speech: Speech) -> None:
        with self._speech_lock:
            self._speeches[speech.id] = speech
            uploads = [k for k in self._speeches if k not in (SUBJECT_SPEECH, FILE_SPEECH)]
            for old in uploads[:-MAX_UPLOADS]:
                del self._speeches[old]

    def add_speech(self, samples: np.ndarray, name: str, speech_id: Optional[str] = None) -> Speech:
        """Make new speech sayable: features with the subject's feature config, then audio codes.

        Args:
            samples: 16 kHz mono float audio. [N]
            name: shown in the page.
            speech_id: None gives a fresh ``upload-N`` id.

        Raises:
            InputError: empty or too long audio.
        """
        samples = np.asarray(samples, dtype=np.float32)
        seconds = samples.shape[0] / AUDIO_RATE
        if samples.ndim != 1 or samples.shape[0] < AUDIO_RATE // 10:
            raise InputError(f"{name} holds less than 0.1 s of audio.")
        if seconds > MAX_SPEECH_S:
            raise InputError(f"{name} is {seconds:.0f} s long; the viewer takes speech up to {MAX_SPEECH_S:.0f} s.")
        source = SampleSpeech(samples)
        n_frames = self.driver.n_frames(source)  # as avatar render counts them
        start = time.perf_counter()
        with self._render_lock:
            codes = self.driver.audio_codes(source, n_frames)
        plan = self.driver.plan(n_frames, DriveOptions())
        speech = Speech(speech_id or f"upload-{next(self._upload_ids)}", name, n_frames, codes,
                        plan.subject_frames, plan.motion, wav_bytes(samples))
        self._add(speech)
        log.info("Speech %s (%s): %.1f s, %d frames, codes in %.2f s", speech.id, name, seconds, n_frames,
                 time.perf_counter() - start)
        return speech

    def add_speech_bytes(self, data: bytes, name: str) -> Speech:
        """Decode an uploaded file and add it; see :meth:`add_speech`.

        Only ordinary audio/video containers are read (a playlist would make ffmpeg read other local files),
        and speech longer than ``MAX_SPEECH_S`` is refused before and while decoding (a small file can hold hours).
        """
        return self.add_speech(load_audio_bytes(data, name, max_seconds=MAX_SPEECH_S), name)

    def speech(self, speech_id: str) -> Speech:
        """The speech with this id; the default one for an empty or dropped id."""
        with self._speech_lock:
            return self._speeches.get(speech_id) or self._speeches[self.default_speech]

    def speeches(self) -> list[dict[str, Any]]:
        with self._speech_lock:
            return [s.describe(self.fps) for s in self._speeches.values()]

    # -- rendering -----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What the page needs to set itself up."""
        return {
            "run": self.run_dir.name, "step": self.step, "size": self.size, "fps": self.fps,
            "device": str(self.device), "n_subject_frames": self.data.n_frames,
            **self.model.summary(),
            "motion_features": self.motion_names, "blink": bool(self.blink_index),
            "focal_px": float(self.K[0, 0]), "default_speech": self.default_speech,
            "speeches": self.speeches(),
        }

    def _background(self, frame_bg: Tensor, state: ViewState, viewmat: Tensor) -> Tensor:  # -> [S, S, 3]
        """The torso and background plate at the view size, zoomed and panned with the head.

        The plate is an image, not 3D: zoom and pan move it as they move points at the head's
        depth (a scaling about the head's pixel and a shift), so the head stays on its
        shoulders; an orbit leaves it where it is (the head turns on the neck).
        """
        if not state.background:
            return torch.full((self.size, self.size, 3), _FLAT_GREY, device=self.device)
        chw = frame_bg.permute(2, 0, 1)[None]  # [1, 3, H, W]
        if state.zoom == 1.0 and state.pan_x == 0.0 and state.pan_y == 0.0:
            if frame_bg.shape[0] == self.size:
                return frame_bg
            resized = torch.nn.functional.interpolate(chw, size=(self.size, self.size), mode="bilinear",
                                                      align_corners=False, antialias=True)
            return resized[0].permute(1, 2, 0)
        centre = viewmat[:3, :3] @ self.target + viewmat[:3, 3]
        head_px = (self.K @ (centre / centre[2]))[:2]  # [2] pixel of the head's centre
        shift = torch.stack([state.pan_x * self.K[0, 0], state.pan_y * self.K[1, 1]])
        pixels = torch.arange(self.size, device=self.device, dtype=torch.float32) + 0.5
        grid = torch.stack(torch.meshgrid(pixels, pixels, indexing="xy"), dim=-1)  # [S, S, 2] (x, y)
        source = head_px + (grid - head_px - shift) / state.zoom  # view pixel -> plate pixel (view scale)
        normalised = source / self.size * 2.0 - 1.0
        with_cover = torch.cat([chw, torch.ones_like(chw[:, :1])], dim=1)  # 4th channel: inside the plate
        warped = torch.nn.functional.grid_sample(with_cover, normalised[None], mode="bilinear", padding_mode="zeros",
                                                 align_corners=False)[0].permute(1, 2, 0)
        return warped[..., :3] + (1.0 - warped[..., 3:]) * _FLAT_GREY  # outside the plate: flat grey

    @torch.no_grad()
    def render(self, state: ViewState) -> Rendered:
        """Render the frame ``state`` asks for, as a JPEG, with the conditions that drove it."""
        speech = self.speech(state.speech)
        n_subject = self.data.n_frames
        index = min(max(int(math.floor(state.t * self.fps + 1e-6)), 0), speech.n_frames - 1)
        pose = int(speech.pose[index]) if state.follow else min(state.frame, n_subject - 1)
        layers = tuple(name for name in self.model.layers if getattr(state, name, True))
        with self._render_lock:
            start = time.perf_counter()
            frame = self.data.frame(pose)
            motion = speech.motion[index].clone()
            if not state.follow:  # the held frame's head rotation, not the speech's pose track's
                for column, _ in self.pose_columns:
                    motion[column] = self.data.motion[pose, column]
                for column, _ in self.lag_columns:  # a held head has caught up with itself
                    motion[column] = 0.0
            if state.blink is not None and self.blink_index:
                motion[self.blink_index] = state.blink
            cond = FrameCondition(speech.codes[index], motion)
            viewmat = orbit_viewmat(frame.viewmat, self.target, state.yaw, state.pitch, state.zoom,
                                    state.pan_x, state.pan_y)
            background = self._background(frame.background, state, frame.viewmat)
            out = self.model.render(cond, viewmat, self.K, self.size, self.size, background, layers=layers)
            image = (out["rgb"].clamp(0, 1) * 255).round().byte().cpu().numpy()
            if state.points:
                image = self._draw_centres(image, cond, viewmat, layers)
            render_ms = (time.perf_counter() - start) * 1000.0
        import cv2

        ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(image[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        assert ok, "cv2.imencode failed on a uint8 image"
        info = {
            "speech": speech.id, "frame": index, "n_frames": speech.n_frames, "t": index / self.fps,
            "pose_frame": pose, "render_ms": round(render_ms, 2),
            "size": self.size, "layers": list(layers),
            "motion": {n: round(float(v), 3) for n, v in zip(self.motion_names, motion.tolist())},
            "audio_code": [round(float(v), 3) for v in cond.audio.tolist()],
        }
        return Rendered(jpeg.tobytes(), info)

    def _draw_centres(self, image: np.ndarray, cond: FrameCondition, viewmat: Tensor,
                      layers: tuple[str, ...]) -> np.ndarray:
        """Mark the model's structure points (Gaussian centres) of the shown layers, one pixel each."""
        image = image.copy()
        for name, points in self.model.layer_points(cond).items():
            if name not in layers:
                continue
            px = project_points(points, viewmat, self.K, self.size, self.size).cpu().numpy()
            image[px[:, 1], px[:, 0]] = _POINT_COLORS.get(name, (255, 255, 255))
        return image
