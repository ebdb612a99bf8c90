"""Video and audio in and out, through the ffmpeg binary that imageio-ffmpeg ships.

Everything streams: frames are read one at a time from an ffmpeg pipe (with ffmpeg doing the
frame-rate resampling, crop and resize), and written one at a time into an encoder, so memory
does not grow with the length of the video. Outputs are written under a temporary name and
renamed when complete, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import logging
import re
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from avatar.atomic import atomic_output
from avatar.errors import InputError

log = logging.getLogger(__name__)

AUDIO_RATE = 16000
"""Sample rate of all audio inside the toolkit (Hz, mono)."""


def ffmpeg_exe() -> str:
    """Path of the bundled ffmpeg binary (``IMAGEIO_FFMPEG_EXE`` overrides it)."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@dataclass(frozen=True)
class MediaInfo:
    """What ffmpeg reports about a media file."""

    path: Path
    duration_s: Optional[float]
    has_video: bool
    has_audio: bool
    width: int = 0
    height: int = 0
    fps: Optional[float] = None
    video_codec: str = ""
    audio_codec: str = ""
    rotation: int = 0

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the decoded frames (rotation applied)."""
        if self.rotation % 180 == 90:
            return self.height, self.width
        return self.width, self.height


_DURATION = re.compile(r"Duration:\s*(\d+):(\d+):(\d+(?:\.\d+)?)")
_VIDEO = re.compile(r"Stream #\S+.*?: Video: (\w+).*?, (\d{2,5})x(\d{2,5})")
_FPS = re.compile(r"([\d.]+)\s*(?:fps|tbr)")
_AUDIO = re.compile(r"Stream #\S+.*?: Audio: (\w+)")
_ROTATE = re.compile(r"(?:rotate\s*:\s*|rotation of\s*)(-?[\d.]+)")


def probe(path: Path | str) -> MediaInfo:
    """Read the container header of ``path``.

    Raises:
        InputError: the file does not exist or ffmpeg cannot read it as media.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file.")
    proc = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)],
        capture_output=True,
        text=True,
        errors="replace",
    )
    text = proc.stderr
    if "Input #0" not in text:
        reason = text.strip().splitlines()[-1] if text.strip() else "unknown format"
        raise InputError(f"{path} is not a readable video or audio file ({reason}).")
    duration = None
    if (m := _DURATION.search(text)) is not None:
        h, mi, s = m.groups()
        duration = int(h) * 3600 + int(mi) * 60 + float(s)
    video = _VIDEO.search(text)
    audio = _AUDIO.search(text)
    fps = None
    width = height = 0
    codec = ""
    if video is not None:
        codec, width, height = video.group(1), int(video.group(2)), int(video.group(3))
        line = text[video.start() : text.find("\n", video.start())]
        if (f := _FPS.search(line)) is not None:
            fps = float(f.group(1))
    rotation = 0
    if (r := _ROTATE.search(text)) is not None:
        rotation = int(round(float(r.group(1)))) % 360
    return MediaInfo(
        path=path,
        duration_s=duration,
        has_video=video is not None,
        has_audio=audio is not None,
        width=width,
        height=height,
        fps=fps,
        video_codec=codec,
        audio_codec=audio.group(1) if audio else "",
        rotation=rotation,
    )


@dataclass(frozen=True)
class Crop:
    """A pixel rectangle of the decoded frame: top-left corner and size."""

    x: int
    y: int
    w: int
    h: int


def iter_frames(
    path: Path | str,
    fps: Optional[float] = None,
    crop: Optional[Crop] = None,
    size: Optional[tuple[int, int]] = None,
) -> Iterator[np.ndarray]:
    """Decode ``path`` frame by frame as uint8 RGB arrays [H, W, 3].

    Args:
        fps: resample to this constant frame rate (ffmpeg's ``fps`` filter: frames are
            duplicated or dropped by timestamp, which also regularises variable frame rate).
        crop: cut this rectangle out of each frame first.
        size: then resize to (width, height) with area averaging.

    Raises:
        InputError: ffmpeg fails before delivering any frame.
    """
    import imageio_ffmpeg

    filters = []
    if fps is not None:
        filters.append(f"fps={fps:g}")
    if crop is not None:
        filters.append(f"crop={crop.w}:{crop.h}:{crop.x}:{crop.y}")
    if size is not None:
        filters.append(f"scale={size[0]}:{size[1]}:flags=area")
    output_params = ["-vf", ",".join(filters)] if filters else None
    gen = imageio_ffmpeg.read_frames(str(path), output_params=output_params)
    try:
        meta = next(gen)
    except (OSError, RuntimeError, StopIteration) as err:
        raise InputError(f"{path} could not be decoded as video ({_last_line(err)}).") from None
    w, h = meta["size"]
    n = 0
    try:
        for raw in gen:
            n += 1
            yield np.frombuffer(raw, dtype=np.uint8).reshape(h, w, 3)
    except (OSError, RuntimeError) as err:
        if n == 0:
            raise InputError(f"{path} could not be decoded as video ({_last_line(err)}).") from None
        log.warning("%s: decoding stopped after %d frames (%s); the file may be truncated.",
                    path, n, _last_line(err))
    finally:
        gen.close()


def _last_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def load_audio(path: Path | str, rate: int = AUDIO_RATE) -> np.ndarray:
    """Decode the first audio stream of any file ffmpeg reads to mono float32 in [-1, 1].

    Raises:
        InputError: the file has no audio stream or cannot be decoded.
    """
    path = Path(path)
    info = probe(path)
    if not info.has_audio:
        raise InputError(f"{path} has no audio stream.")
    proc = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path),
         "-vn", "-ac", "1", "-ar", str(rate), "-f", "s16le", "-acodec", "pcm_s16le", "-"],
        capture_output=True,
    )
    if proc.returncode != 0 and not proc.stdout:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise InputError(f"{path}: audio could not be decoded ({msg[-1] if msg else 'ffmpeg failed'}).")
    samples = np.frombuffer(proc.stdout, dtype="<i2").astype(np.float32) / 32768.0
    return samples


def write_wav(path: Path | str, samples: np.ndarray, rate: int = AUDIO_RATE) -> Path:
    """Write mono float samples in [-1, 1] as 16-bit PCM, atomically."""
    path = Path(path)
    pcm = (np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2")
    with atomic_output(path) as tmp:
        with wave.open(str(tmp), "wb") as wf:
            wf.setnchannels(1)
            wf.setsampwidth(2)
            wf.setframerate(rate)
            wf.writeframes(pcm.tobytes())
    return path


def read_wav(path: Path | str) -> tuple[np.ndarray, int]:
    """Read a 16-bit PCM wav written by :func:`write_wav`: (mono float32 samples, rate)."""
    with wave.open(str(path), "rb") as wf:
        rate = wf.getframerate()
        channels = wf.getnchannels()
        if wf.getsampwidth() != 2:
            raise InputError(f"{path} is not 16-bit PCM; decode it with load_audio instead.")
        data = np.frombuffer(wf.readframes(wf.getnframes()), dtype="<i2").astype(np.float32)
    if channels > 1:
        data = data.reshape(-1, channels).mean(axis=1)
    return data / 32768.0, rate


class VideoWriter:
    """Streams RGB frames into an H.264 (yuv420p) mp4, optionally muxing an audio file as AAC.

    ``shortest`` ends the file with the shorter of video and audio. Use as a context manager;
    the mp4 appears at ``path`` only when the block exits cleanly::

        with VideoWriter(out, fps=25, audio=wav) as writer:
            for frame in frames:
                writer.write(frame)
    """

    def __init__(self, path: Path | str, fps: float, audio: Optional[Path | str] = None,
                 crf: int = 18, preset: str = "medium", shortest: bool = False):
        self.path = Path(path)
        self.fps = fps
        self.audio = Path(audio) if audio is not None else None
        self.crf = crf
        self.preset = preset
        self.shortest = shortest
        self._gen = None
        self._tmp: Optional[Path] = None
        self._ctx = None
        self.n_frames = 0

    def __enter__(self) -> "VideoWriter":
        self._ctx = atomic_output(self.path)
        self._tmp = self._ctx.__enter__()
        return self

    def write(self, frame: np.ndarray) -> None:
        """Append one uint8 RGB frame [H, W, 3]; all frames must share one even size."""
        import imageio_ffmpeg

        frame = np.ascontiguousarray(frame, dtype=np.uint8)
        if self._gen is None:
            h, w = frame.shape[:2]
            if h % 2 or w % 2:
                raise ValueError(f"yuv420p needs even frame sizes, got {w}x{h}")
            out_params = ["-crf", str(self.crf), "-preset", self.preset, "-movflags", "+faststart"]
            if self.audio is not None and self.shortest:
                out_params += ["-shortest"]
            self._gen = imageio_ffmpeg.write_frames(
                str(self._tmp), (w, h), fps=self.fps, codec="libx264", pix_fmt_out="yuv420p",
                quality=None, macro_block_size=1, output_params=out_params,
                audio_path=str(self.audio) if self.audio else None,
                audio_codec="aac" if self.audio else None, ffmpeg_log_level="error",
            )
            self._gen.send(None)
        self._gen.send(frame)
        self.n_frames += 1

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if self._gen is not None:
                self._gen.close()
            if exc_type is None and self.n_frames == 0:
                raise ValueError("no frames were written")
        except BaseException as err:
            self._ctx.__exit__(type(err), err, err.__traceback__)
            raise
        self._ctx.__exit__(exc_type, exc, tb)
        return False


def write_video(path: Path | str, frames: Sequence[np.ndarray] | Iterator[np.ndarray], fps: float,
                audio: Optional[Path | str] = None) -> Path:
    """Encode frames (any iterable) to an mp4 with :class:`VideoWriter`."""
    with VideoWriter(path, fps=fps, audio=audio) as writer:
        for frame in frames:
            writer.write(frame)
    return Path(path)


def decode_audio_to_wav(src: Path | str, dst: Path | str, rate: int = AUDIO_RATE) -> float:
    """Decode the first audio stream of ``src`` to a 16-bit mono wav at ``rate``; return seconds.

    Long speech is decoded to disk rather than into memory, so that an hour of audio costs
    no more memory than a minute; :func:`read_wav_segment` then reads pieces of it.

    Raises:
        InputError: no audio stream, undecodable, or no samples at all.
    """
    src, dst = Path(src), Path(dst)
    if not probe(src).has_audio:
        raise InputError(f"{src} has no audio stream.")
    proc = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", str(src),
         "-vn", "-ac", "1", "-ar", str(rate), "-acodec", "pcm_s16le", "-f", "wav", str(dst)],
        capture_output=True,
    )
    if proc.returncode != 0 or not dst.is_file():
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise InputError(f"{src}: audio could not be decoded ({msg[-1] if msg else 'ffmpeg failed'}).")
    with wave.open(str(dst), "rb") as wf:
        n = wf.getnframes()
    if n == 0:
        raise InputError(f"{src} has an audio stream of zero length.")
    return n / rate


def read_wav_segment(path: Path | str, start: int, count: int) -> np.ndarray:
    """Samples ``[start, start + count)`` of a mono 16-bit wav as float32, zeros outside the file."""
    out = np.zeros(count, np.float32)
    with wave.open(str(path), "rb") as wf:
        n = wf.getnframes()
        lo, hi = max(start, 0), min(start + count, n)
        if hi > lo:
            wf.setpos(lo)
            data = np.frombuffer(wf.readframes(hi - lo), dtype="<i2").astype(np.float32) / 32768.0
            out[lo - start:lo - start + len(data)] = data
    return out
