"""Video and audio in and out, through the ffmpeg binary that imageio-ffmpeg ships.

Everything streams: frames are read one at a time from an ffmpeg pipe (with ffmpeg doing the
frame-rate resampling, crop and resize), and written one at a time into an encoder, so memory
does not grow with the length of the video. Outputs are written under a temporary name and
renamed when complete, so an interrupted run never leaves a half-written file.

A user's file is opened with ffmpeg's allow-lists (:data:`SAFE_INPUT_FORMATS`, :data:`SAFE_PROTOCOLS`):
playlists and concat scripts name further paths that ffmpeg would open, so a file of a few bytes
could otherwise make the toolkit read, decode and hand back any local file (or a URL).
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Iterator, Optional, Sequence

import numpy as np

from avatar.atomic import atomic_output, scratch_dir
from avatar.errors import InputError

log = logging.getLogger(__name__)

AUDIO_RATE = 16000
"""Sample rate of all audio inside the toolkit (Hz, mono)."""

SAFE_INPUT_FORMATS: tuple[str, ...] = (
    "mov", "mp4", "m4a", "3gp", "matroska", "webm", "avi", "flv", "asf", "mpeg", "mpegts",
    "wav", "w64", "aiff", "caf", "au", "mp3", "flac", "ogg", "aac", "ac3", "eac3", "amr", "wv",
)
"""ffmpeg demuxers a user's file may be read with: ordinary audio and video containers.

Left out on purpose: playlists (hls, dash), concat scripts, image sequences, devices, network
streams and text formats, which name further paths or URLs for ffmpeg to open. The mov demuxer's
external references (``enable_drefs``) are off by default and stay off.
"""

SAFE_PROTOCOLS: tuple[str, ...] = ("file", "pipe")
"""ffmpeg protocols a user's file may be read through (no network, no ``concat:``/``subfile:``)."""

_REFUSED = re.compile(r"not on whitelist")


def _file_url(path: Path | str) -> str:
    """``file:`` and the absolute path, so that a name like ``http:x`` or ``concat:a|b`` stays a file name."""
    return "file:" + str(Path(path).absolute())


def safe_input_args(path: Path | str) -> list[str]:
    """ffmpeg arguments that open a user's file as input, with the demuxer and protocol allow-lists."""
    return ["-protocol_whitelist", ",".join(SAFE_PROTOCOLS), "-format_whitelist", ",".join(SAFE_INPUT_FORMATS),
            "-i", _file_url(path)]


def _refused(name: object, ffmpeg_text: str) -> Optional[InputError]:
    """The error to raise when ffmpeg refused the input for an allow-list (None when it did not)."""
    if _REFUSED.search(ffmpeg_text) is None:
        return None
    return InputError(f"{name} is not an audio or video file this toolkit reads (playlists, concat lists and "
                      f"other files that point at further files or URLs are refused).")


def _too_long(name: object, seconds: Optional[float], max_seconds: float) -> InputError:
    """The error for audio over ``max_seconds`` (``seconds``: its probed length; None: found while decoding)."""
    length = f"is {seconds:.0f} s long" if seconds is not None else f"is longer than {max_seconds:.0f} s"
    return InputError(f"{name} {length}; at most {max_seconds:.0f} s of audio are accepted.")


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


def probe(path: Path | str, name: Optional[str] = None) -> MediaInfo:
    """Read the container header of ``path`` (only containers of :data:`SAFE_INPUT_FORMATS`).

    Args:
        name: how error messages call the file (an upload's own name rather than its temporary path).

    Raises:
        InputError: the file does not exist, ffmpeg cannot read it as media, or it is a refused
            kind (a playlist, a concat list).
    """
    path = Path(path)
    label = name or path
    if not path.is_file():
        raise InputError(f"{label} does not exist or is not a file.")
    proc = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", *safe_input_args(path)],
        capture_output=True,
        text=True,
        errors="replace",
    )
    text = proc.stderr
    if "Input #0" not in text:
        if (refused := _refused(label, text)) is not None:
            raise refused
        reason = text.strip().splitlines()[-1] if text.strip() else "unknown format"
        raise InputError(f"{label} is not a readable video or audio file ({reason}).")
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
    *allow, _, url = safe_input_args(path)
    gen = imageio_ffmpeg.read_frames(url, input_params=allow, output_params=output_params)
    try:
        meta = next(gen)
    except (OSError, RuntimeError, StopIteration) as err:
        if (refused := _refused(path, str(err))) is not None:
            raise refused from None
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


ON_VIDEO_CLOCK = ("-af", "aresample=first_pts=0")
"""Decode audio on the clock the video frames are read on (:func:`iter_frames`): sample 0 is
time 0 of the container. A video's audio stream may start later than its video (a camera, a
cut, a remux): ffmpeg's frame-rate filter then repeats the first video frame from time 0, and
without this the speech would start early by the same amount, in the features the mouth is
trained on and in the sound a driving video is judged by. ffmpeg pads the gap with silence (and
trims audio that starts before 0, an encoder's priming)."""


def load_audio(path: Path | str, rate: int = AUDIO_RATE, max_seconds: Optional[float] = None,
               name: Optional[str] = None) -> np.ndarray:
    """Decode the first audio stream of an audio or video file to mono float32 in [-1, 1].

    Args:
        max_seconds: refuse longer audio. The container's duration is checked before decoding
            and the decoded samples are counted while decoding (a header can lie), so a small
            file of hours of silence costs neither the time nor the memory of decoding it.
        name: how error messages call the file (an upload's own name rather than its temporary path).

    Raises:
        InputError: no audio stream, undecodable, a refused kind of file, or longer than ``max_seconds``.
    """
    path = Path(path)
    label = name or path
    info = probe(path, name=name)
    if not info.has_audio:
        raise InputError(f"{label} has no audio stream.")
    if max_seconds is not None and info.duration_s is not None and info.duration_s > max_seconds:
        raise _too_long(label, info.duration_s, max_seconds)
    max_bytes = None if max_seconds is None else 2 * int(max_seconds * rate)
    command = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", *safe_input_args(path),
               "-vn", *ON_VIDEO_CLOCK, "-ac", "1", "-ar", str(rate), "-f", "s16le", "-acodec", "pcm_s16le", "-"]
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: ffmpeg never blocks on its messages
        with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors) as proc:
            assert proc.stdout is not None
            pcm = _read_at_most(proc.stdout, max_bytes)
            if pcm is None:
                proc.kill()
                raise _too_long(label, None, float(max_seconds or 0))
            returncode = proc.wait()
        errors.seek(0)
        text = errors.read().decode(errors="replace")
    if returncode != 0 and not pcm:
        if (refused := _refused(label, text)) is not None:
            raise refused
        msg = text.strip().splitlines()
        raise InputError(f"{label}: audio could not be decoded ({msg[-1] if msg else 'ffmpeg failed'}).")
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def _read_at_most(stream: IO[bytes], max_bytes: Optional[int], chunk: int = 1 << 20) -> Optional[bytearray]:
    """Everything ``stream`` gives until its end, or None as soon as that exceeds ``max_bytes``."""
    data = bytearray()
    while block := stream.read(chunk):
        data += block
        if max_bytes is not None and len(data) > max_bytes:
            return None
    return data


def load_audio_bytes(data: bytes, name: str, rate: int = AUDIO_RATE, max_seconds: Optional[float] = None) -> np.ndarray:
    """:func:`load_audio` of a file received as bytes (an upload); messages call it ``name``.

    The bytes go to a private temporary file (ffmpeg probes files by their content and suffix;
    the suffix of ``name`` is kept) in a scratch directory of this process, removed before
    returning (or, after a kill, by the next command's clean-up).
    """
    suffix = Path(name).suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,11}", Path(name).suffix) else ""
    with scratch_dir("upload") as scratch:
        tmp = scratch / f"upload{suffix}"
        tmp.write_bytes(data)
        return load_audio(tmp, rate, max_seconds=max_seconds, name=name)


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

    The audio may be a user's file, so it is opened with the allow-lists of
    :func:`safe_input_args`; that is why the ffmpeg command is built here rather than by
    imageio-ffmpeg, which cannot give options to a second input.

    Raises:
        InputError: (on entering) the audio file is missing, unreadable or a refused kind.
    """

    def __init__(self, path: Path | str, fps: float, audio: Optional[Path | str] = None,
                 crf: int = 18, preset: str = "medium", shortest: bool = False):
        self.path = Path(path)
        self.fps = fps
        self.audio = Path(audio) if audio is not None else None
        self.crf = crf
        self.preset = preset
        self.shortest = shortest
        self._proc: Optional[subprocess.Popen] = None
        self._errors: Optional[IO[bytes]] = None
        self._shape: tuple[int, ...] = ()
        self._tmp: Optional[Path] = None
        self._ctx = None
        self.n_frames = 0

    def __enter__(self) -> "VideoWriter":
        if self.audio is not None:
            probe(self.audio)  # a missing, unreadable or refused audio file fails before any encoding
        self._ctx = atomic_output(self.path)
        self._tmp = self._ctx.__enter__()
        return self

    def _command(self, width: int, height: int) -> list[str]:
        fps = Fraction(self.fps).limit_denominator()  # a rational: 24000/1001 is not rounded
        cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-"]
        if self.audio is not None:
            cmd += [*safe_input_args(self.audio), "-map", "0:v:0", "-map", "1:a:0", "-c:a", "aac"]
        cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(self.crf), "-preset", self.preset,
                "-movflags", "+faststart"]
        if self.audio is not None and self.shortest:
            cmd += ["-shortest"]
        return cmd + [str(self._tmp)]

    def write(self, frame: np.ndarray) -> None:
        """Append one uint8 RGB frame [H, W, 3]; all frames must share one even size."""
        frame = np.ascontiguousarray(frame, dtype=np.uint8)
        if self._proc is None:
            h, w = frame.shape[:2]
            if h % 2 or w % 2:
                raise ValueError(f"yuv420p needs even frame sizes, got {w}x{h}")
            self._shape = (h, w, 3)
            # stderr goes to a file: a pipe nobody reads could fill up and stall ffmpeg
            self._errors = tempfile.TemporaryFile()
            # its own session: Ctrl-C reaches Python only, which then kills ffmpeg and removes the partial file
            self._proc = subprocess.Popen(self._command(w, h), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          stderr=self._errors, start_new_session=True)
        if frame.shape != self._shape:
            raise ValueError(f"all frames must be {self._shape}, got {frame.shape}")
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(frame.data)
        except BrokenPipeError:
            raise self._failure() from None
        self.n_frames += 1

    def _failure(self) -> Exception:
        """Why ffmpeg stopped, from its messages (it has exited or is about to)."""
        assert self._proc is not None and self._errors is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=10)
        self._errors.seek(0)
        text = self._errors.read().decode(errors="replace")
        if (refused := _refused(self.audio, text)) is not None:
            return refused
        lines = text.strip().splitlines()
        return OSError(f"ffmpeg could not encode {self.path} ({lines[-1] if lines else 'no message'}).")

    def _close_encoder(self, failed: bool) -> None:
        """Let ffmpeg finish the file (or kill it when the block failed); raise if it failed."""
        proc = self._proc
        if proc is None:
            return
        try:
            if failed:
                proc.kill()
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            if proc.wait() != 0 and not failed:
                raise self._failure()
        finally:
            self._proc = None
            if self._errors is not None:
                self._errors.close()

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self._close_encoder(failed=exc_type is not None)
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
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *safe_input_args(src),
         "-vn", *ON_VIDEO_CLOCK, "-ac", "1", "-ar", str(rate), "-acodec", "pcm_s16le", "-f", "wav", str(dst)],
        capture_output=True,
    )
    if proc.returncode != 0 or not dst.is_file():
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        if (refused := _refused(src, "\n".join(msg))) is not None:
            raise refused
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
