"""What the preprocessing steps hand each other, by name: where each artifact lives and how it is stored.

Steps never spell a file name: they load and save artifacts by name through a :class:`Workspace`,
so the layout of the subject directory (``avatar.subject.SubjectPaths``) and of its ``.work/``
cache is written down here once. Every save is atomic (``avatar.atomic``): an interrupted run
leaves an artifact whole or absent, never half written, which is what lets the step cache trust
that an existing output is a finished one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from avatar import media
from avatar.atomic import atomic_output, save_npz_atomic, write_bytes_atomic
from avatar.subject import SubjectPaths, load_npz


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    save_npz_atomic(path, **arrays)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_output(path) as tmp:
        np.save(tmp, array)


def _load_npy(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def _save_rgb_png(path: Path, image: np.ndarray) -> None:
    import cv2

    with atomic_output(path) as tmp:  # the temporary name keeps the suffix: cv2 still writes PNG
        if not cv2.imwrite(str(tmp), image[:, :, ::-1]):
            raise OSError(f"could not write {path}")


def _load_rgb_png(path: Path) -> np.ndarray:
    import cv2

    return cv2.imread(str(path))[:, :, ::-1]


def _save_text(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def _load_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _load_wav(path: Path) -> np.ndarray:
    samples, _ = media.read_wav(path)
    return samples


FORMATS: dict[str, tuple[Callable[[Path, Any], Any], Callable[[Path], Any]]] = {
    "npz": (_save_npz, load_npz),  # dict of arrays, no pickles
    "npy": (_save_npy, _load_npy),  # one array
    "png": (_save_rgb_png, _load_rgb_png),  # RGB uint8 image
    "wav": (media.write_wav, _load_wav),  # mono float samples at media.AUDIO_RATE
    "text": (_save_text, _load_text),
}
"""How each storage format is saved and loaded: ``format -> (save(path, value), load(path))``."""


@dataclass(frozen=True)
class Artifact:
    """One named thing a step writes and later steps read."""

    name: str
    locate: Callable[[SubjectPaths], Path]
    """Where it lives in the subject directory."""
    format: Optional[str]
    """A key of :data:`FORMATS`, or None for what its step writes in place (directories, the manifest)."""
    doc: str


ARTIFACTS: dict[str, Artifact] = {a.name: a for a in (
    Artifact("detections", lambda p: p.work_dir / "detect.npz", "npz",
             "sparse face boxes over time: times, boxes, n_faces, source_size, warnings"),
    Artifact("tracking", lambda p: p.work_dir / "track.npz", "npz",
             "raw face-mesh landmarks [T, 478, 3] and the frames where the mesh tracked (valid [T])"),
    Artifact("frames", lambda p: p.frames_dir, None, "frames/: the RGB crops, one JPEG per frame"),
    Artifact("masks", lambda p: p.masks_dir, None, "masks/: label maps, one PNG per frame"),
    Artifact("background", lambda p: p.background, "png", "background plate"),
    Artifact("neck_plate", lambda p: p.neck_plate, "png", "what lies behind the head"),
    Artifact("face_model", lambda p: p.work_dir / "face_model.npz", "npz",
             "gap-filled landmarks, usable frames, camera, head poses, face model and expressions"),
    Artifact("masks_redrawn", lambda p: p.work_dir / "masks.done", "text",
             "marker: masks of interpolated frames were redrawn (holds their count)"),
    Artifact("blendshapes", lambda p: p.work_dir / "blendshapes.npz", "npz", "values [T, B] and names [B]"),
    Artifact("audio", lambda p: p.audio, "wav", "the speech, 16 kHz mono, exactly as long as the frames"),
    Artifact("audio_features", lambda p: p.work_dir / "audio_features.npy", "npy",
             "speech features aligned to frames [T, window, dim] float32"),
    Artifact("tracks", lambda p: p.tracks, "npz", "tracks.npz, the subject's tracks (avatar.subject.TRACK_KEYS)"),
    Artifact("report", lambda p: p.report_dir, None, "report/: QC images"),
    Artifact("manifest", lambda p: p.manifest, None, "subject.json, written last"),
)}
"""Every artifact of the pipeline, by name."""


class Workspace:
    """Artifacts of one subject directory: their paths, and loading and saving them by name."""

    def __init__(self, root: Path | str):
        self.paths = SubjectPaths(root)

    @property
    def work_dir(self) -> Path:
        """``.work/``: the step cache's state and the artifacts that are not part of the subject."""
        return self.paths.work_dir

    def path(self, name: str) -> Path:
        return ARTIFACTS[name].locate(self.paths)

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def load(self, name: str) -> Any:
        return FORMATS[self._format(name)][1](self.path(name))

    def save(self, name: str, value: Any) -> Path:
        path = self.path(name)
        FORMATS[self._format(name)][0](path, value)
        return path

    @staticmethod
    def _format(name: str) -> str:
        fmt = ARTIFACTS[name].format
        if fmt is None:
            raise TypeError(f"The artifact {name!r} is written in place by its step; use its path.")
        return fmt
