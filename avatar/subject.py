"""The subject directory: the one place that knows its on-disk layout.

A subject is what preprocessing makes of one video and what training, rendering and evaluation
read. Layout (see ARCHITECTURE.md)::

    SUBJECT/
      subject.json     manifest (written last: its presence means the subject is complete)
      frames/          000000.jpg ... RGB crops (JPEG quality 95, 4:4:4)
      masks/           000000.png ... uint8 label maps, legend in subject.json
      background.png   background plate
      neck_plate.png   what lies behind the head (torso + neck median, filled upwards)
      audio.wav        16 kHz mono
      tracks.npz       landmarks, pose, camera, face model, expression, blendshapes, audio features
      report/          QC images
      .work/           preprocessing cache (step state), safe to delete once complete
      .cache/          uint8 frame/mask arrays at training resolutions (raw, read frame by frame)
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from avatar.atomic import atomic_output, write_json_atomic
from avatar.errors import InputError

FORMAT_VERSION = 1

MASK_LEGEND: dict[int, str] = {
    0: "background",
    1: "torso_neck",
    2: "face",
    3: "mouth_interior",
    4: "hair",
}
"""Label values of ``masks/*.png``. ``hair`` also holds ears and the rest of the head outside the face."""

LABEL = {name: value for value, name in MASK_LEGEND.items()}

TRACK_KEYS = (
    "landmarks",
    "valid",
    "intrinsics",
    "cam_to_world",
    "face_mean",
    "face_basis",
    "expression",
    "blendshapes",
    "blendshape_names",
    "audio_features",
)
"""The exact keys of ``tracks.npz``."""

VAL_FRACTION = 1.0 / 11.0
"""The field's convention: the last 1/11 of the frames is the validation split."""


def split_frames(n_frames: int) -> dict[str, list[int]]:
    """Train/val split as [start, stop) frame ranges: the val split is the last 1/11."""
    n_val = max(1, int(round(n_frames * VAL_FRACTION))) if n_frames > 1 else 0
    n_train = n_frames - n_val
    return {"train": [0, n_train], "val": [n_train, n_frames]}


@dataclass
class SubjectManifest:
    """Contents of ``subject.json``."""

    n_frames: int
    fps: float
    size: int
    """Side of the square crop in pixels (frames are size x size)."""
    crop: dict[str, int]
    """Crop box in source pixels after frame-rate resampling: x, y, w, h, source_w, source_h."""
    source: dict[str, Any]
    """path, sha256, duration_s of the source video (and of --audio when given)."""
    split: dict[str, list[int]]
    audio_features: dict[str, Any]
    """kind, model, window, dim: how ``tracks.npz['audio_features']`` was computed."""
    stats: dict[str, Any] = field(default_factory=dict)
    """valid_share, reprojection_error_px, faces_found, warnings, seconds per step."""
    steps: dict[str, int] = field(default_factory=dict)
    """Version of each preprocessing step that produced this subject."""
    tools: dict[str, str] = field(default_factory=dict)
    mask_legend: dict[str, str] = field(default_factory=lambda: {str(k): v for k, v in MASK_LEGEND.items()})
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SubjectManifest":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


class SubjectPaths:
    """Paths inside one subject directory."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    @property
    def manifest(self) -> Path:
        return self.root / "subject.json"

    @property
    def frames_dir(self) -> Path:
        return self.root / "frames"

    @property
    def masks_dir(self) -> Path:
        return self.root / "masks"

    @property
    def background(self) -> Path:
        return self.root / "background.png"

    @property
    def neck_plate(self) -> Path:
        return self.root / "neck_plate.png"

    @property
    def audio(self) -> Path:
        return self.root / "audio.wav"

    @property
    def tracks(self) -> Path:
        return self.root / "tracks.npz"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def work_dir(self) -> Path:
        return self.root / ".work"

    @property
    def cache_dir(self) -> Path:
        return self.root / ".cache"

    def frame(self, index: int) -> Path:
        return self.frames_dir / f"{index:06d}.jpg"

    def inputs(self) -> list[Path]:
        """What the commands read from a subject and must never write over (see ``refuse_overwrite``)."""
        return [self.manifest, self.frames_dir, self.masks_dir, self.background, self.neck_plate, self.audio,
                self.tracks, self.report_dir, self.work_dir, self.cache_dir]

    def mask(self, index: int) -> Path:
        return self.masks_dir / f"{index:06d}.png"


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Load every array of an npz without allowing pickles."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def write_manifest(root: Path | str, manifest: SubjectManifest) -> Path:
    paths = SubjectPaths(root)
    write_json_atomic(paths.manifest, manifest.to_json())
    return paths.manifest


def read_manifest(root: Path | str) -> SubjectManifest:
    """Read and check ``subject.json``.

    Raises:
        InputError: not a complete subject directory, or a format this version cannot read.
    """
    paths = SubjectPaths(root)
    if not paths.manifest.is_file():
        raise InputError(
            f"{paths.root} is not a complete subject directory (no subject.json); "
            "run `avatar preprocess VIDEO -o DIR` first."
        )
    try:
        data = json.loads(paths.manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise InputError(f"{paths.manifest} is unreadable ({err}); preprocess the video again.") from None
    if not isinstance(data, dict):
        raise InputError(f"{paths.manifest} does not hold a subject's manifest; preprocess the video again.")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(
            f"{paths.root} has subject format {version}, this avatar reads {FORMAT_VERSION}; "
            "preprocess the video again."
        )
    try:
        manifest = SubjectManifest.from_dict(data)
    except TypeError as err:  # a required field is missing
        raise InputError(f"{paths.manifest} is incomplete ({err}); preprocess the video again.") from None
    _check_manifest_types(paths, manifest)
    return manifest


def _check_manifest_types(paths: SubjectPaths, manifest: SubjectManifest) -> None:
    """Refuse a hand-edited or corrupted manifest here, not as a TypeError deep in training."""
    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    split = manifest.split
    ok = (whole(manifest.n_frames) and whole(manifest.size) and isinstance(manifest.fps, (int, float))
          and not isinstance(manifest.fps, bool) and manifest.fps > 0 and isinstance(split, dict)
          and all(isinstance(v, list) and len(v) == 2 and all(isinstance(i, int) for i in v) for v in split.values()))
    if not ok:
        raise InputError(f"{paths.manifest} holds values of the wrong kind (n_frames, size, fps or split); "
                         "preprocess the video again.")


class Subject:
    """Read access to a complete subject directory.

    Frames and masks are decoded on demand; tracks are loaded once.
    """

    def __init__(self, root: Path | str):
        self.paths = SubjectPaths(root)
        self.manifest = read_manifest(root)
        self._tracks: Optional[dict[str, np.ndarray]] = None

    @property
    def n_frames(self) -> int:
        return self.manifest.n_frames

    @property
    def tracks(self) -> dict[str, np.ndarray]:
        if self._tracks is None:
            if not self.paths.tracks.is_file():
                raise InputError(f"{self.paths.tracks} is missing; preprocess the video again.")
            try:
                self._tracks = load_npz(self.paths.tracks)
            except ValueError as err:  # numpy refuses pickled objects with a ValueError
                raise InputError(f"{self.paths.tracks} cannot be loaded safely ({err}); preprocess the video "
                                 "again.") from None
            except Exception as err:  # noqa: BLE001 - a damaged file fails in zipfile, zlib or numpy's header parser
                raise InputError(f"{self.paths.tracks} is unreadable ({type(err).__name__}); preprocess the video "
                                 "again.") from None
        return self._tracks

    def frame_indices(self, split: str) -> np.ndarray:
        """Frame indices of a split ("train", "val" or "all")."""
        if split == "all":
            return np.arange(self.n_frames)
        if split not in self.manifest.split:
            raise ValueError(f"split must be one of {sorted(self.manifest.split) + ['all']}, got {split!r}")
        start, stop = self.manifest.split[split]
        return np.arange(start, stop)

    def frame(self, index: int) -> np.ndarray:
        """RGB uint8 [size, size, 3]."""
        import cv2

        bgr = cv2.imread(str(self.paths.frame(index)), cv2.IMREAD_COLOR)
        if bgr is None:
            raise InputError(f"{self.paths.frame(index)} is missing or unreadable; preprocess again.")
        return bgr[:, :, ::-1].copy()

    def mask(self, index: int) -> np.ndarray:
        """uint8 label map [size, size] (legend: ``MASK_LEGEND``)."""
        import cv2

        labels = cv2.imread(str(self.paths.mask(index)), cv2.IMREAD_UNCHANGED)
        if labels is None:
            raise InputError(f"{self.paths.mask(index)} is missing or unreadable; preprocess again.")
        return labels

    def image_cache(self, size: Optional[int] = None, progress=None) -> tuple["FrameFile", "FrameFile"]:
        """All frames and masks at ``size`` as read-only uint8 arrays on disk, read frame by frame.

        Training samples random frames thousands of times: decoding JPEGs each time would
        dominate, and a float copy of the video would not fit in memory for long subjects. The
        arrays are built once (``.cache/frames_{size}.u8`` and ``masks_{size}.u8``) and shared
        through the OS page cache afterwards (see :class:`FrameFile` for why not a memmap).

        Returns:
            frames [T, size, size, 3] uint8 (RGB), masks [T, size, size] uint8 labels.
        """
        import cv2

        from avatar.progress import track

        size = size or self.manifest.size
        t = self.n_frames
        self.paths.cache_dir.mkdir(exist_ok=True)
        frames_path = self.paths.cache_dir / f"frames_{size}.u8"
        masks_path = self.paths.cache_dir / f"masks_{size}.u8"
        frames_shape, masks_shape = (t, size, size, 3), (t, size, size)
        want = (int(np.prod(frames_shape)), int(np.prod(masks_shape)))
        have = tuple(p.stat().st_size if p.is_file() else -1 for p in (frames_path, masks_path))
        if have != want:
            resize = size != self.manifest.size
            # Written with plain sequential writes, not through a writable memmap: its dirty pages
            # count in this process's resident memory until the end (4.6 GB for 3 minutes at 512).
            with atomic_output(frames_path) as tmp_f, atomic_output(masks_path) as tmp_m:
                with open(tmp_f, "wb") as fw, open(tmp_m, "wb") as mw:
                    for i in track(range(t), f"cache frames at {size}px", t, progress):
                        img, lab = self.frame(i), self.mask(i)
                        if resize:
                            img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
                            lab = cv2.resize(lab, (size, size), interpolation=cv2.INTER_NEAREST)
                        if img.shape != frames_shape[1:] or lab.shape != masks_shape[1:]:
                            raise InputError(f"frame {i} of {self.paths.root} is {img.shape[:2]}, not "
                                             f"{size}x{size}; preprocess again.")
                        fw.write(np.ascontiguousarray(img, np.uint8).tobytes())
                        mw.write(np.ascontiguousarray(lab, np.uint8).tobytes())
        return FrameFile(frames_path, frames_shape), FrameFile(masks_path, masks_shape)

    def background(self) -> np.ndarray:
        """RGB uint8 [size, size, 3]: the background plate."""
        return self._image(self.paths.background)

    def neck_plate(self) -> np.ndarray:
        """RGB uint8 [size, size, 3]: what the compositor shows behind the head."""
        return self._image(self.paths.neck_plate)

    def _image(self, path: Path) -> np.ndarray:
        import cv2

        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise InputError(f"{path} is missing; preprocess the video again.")
        return bgr[:, :, ::-1].copy()


def validate_subject(root: Path | str) -> SubjectManifest:
    """Check that a subject directory is complete and self-consistent.

    Raises:
        InputError: with the first problem found.
    """
    subject = Subject(root)
    m = subject.manifest
    tracks = subject.tracks
    missing = [k for k in TRACK_KEYS if k not in tracks]
    if missing:
        raise InputError(f"{subject.paths.tracks} lacks {', '.join(missing)}; preprocess again.")
    t = m.n_frames
    shapes = {
        "landmarks": (t, 478, 3),
        "valid": (t,),
        "intrinsics": (3, 3),
        "cam_to_world": (t, 4, 4),
    }
    for key, shape in shapes.items():
        if tracks[key].shape != shape:
            raise InputError(f"tracks.npz[{key!r}] has shape {tracks[key].shape}, expected {shape}.")
    for key in ("expression", "blendshapes", "audio_features"):
        if tracks[key].shape[0] != t:
            raise InputError(f"tracks.npz[{key!r}] has {tracks[key].shape[0]} frames, expected {t}.")
    n_frames = len(list(subject.paths.frames_dir.glob("*.jpg")))
    n_masks = len(list(subject.paths.masks_dir.glob("*.png")))
    if n_frames != t or n_masks != t:
        raise InputError(f"{subject.paths.root} has {n_frames} frames and {n_masks} masks, expected {t}.")
    for p in (subject.paths.audio, subject.paths.background, subject.paths.neck_plate):
        if not p.is_file():
            raise InputError(f"{p} is missing; preprocess again.")
    return m


class FrameFile:
    """A read-only uint8 array [T, ...] stored raw in a file; ``ff[i]`` reads item ``i``.

    Reads are positional (one ``readinto`` per item) rather than through a memory map: pages of
    a map stay counted in the process's resident memory once touched, so a long run at 512 that
    samples every frame would appear to hold the whole 4.7 GB cache of a 3-minute subject. With
    plain reads the bytes live in the OS page cache, shared and evictable, and the process holds
    one frame at a time.
    """

    def __init__(self, path: Path | str, shape: tuple[int, ...]):
        self.path = Path(path)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(np.uint8)
        self._item_shape = self.shape[1:]
        self._item_bytes = int(np.prod(self._item_shape))
        size = self.path.stat().st_size
        if size != self.shape[0] * self._item_bytes:
            raise InputError(f"{self.path} holds {size} bytes, not {self.shape}; delete it to rebuild the cache.")
        self._file = open(self.path, "rb", buffering=0)
        self._lock = threading.Lock()  # seek + read is one operation (the viewer reads from its server thread)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> np.ndarray:
        i = int(index)
        if i < 0:
            i += self.shape[0]
        if not 0 <= i < self.shape[0]:
            raise IndexError(f"index {index} out of range for {self.shape[0]} items")
        out = np.empty(self._item_shape, np.uint8)
        with self._lock:
            self._file.seek(i * self._item_bytes)
            n = self._file.readinto(memoryview(out).cast("B"))
        if n != self._item_bytes:
            raise InputError(f"{self.path} ended early at item {i}; delete it to rebuild the cache.")
        return out

    def close(self) -> None:
        self._file.close()

    def __del__(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()
