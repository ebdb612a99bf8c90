"""Video -> subject directory, as a small pipeline of cached steps.

Each step has a version and a key: a hash of its parameters and of the keys of the steps it
reads from. A re-run with the same key finds the step's outputs and skips it, so an interrupted
or re-parameterised run redoes only what changed. ``subject.json`` is written last: until it
exists the directory is not a subject, whatever else is in it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from avatar import __version__, media
from avatar.atomic import atomic_output, save_npz_atomic, write_json_atomic
from avatar.errors import InputError, OutputExistsError
from avatar.preprocess.detect import CropConfig, DetectConfig, Detections, detect_faces, place_crop
from avatar.preprocess.track import TrackConfig, fill_gaps, track_video
from avatar.progress import Progress
from avatar.subject import (
    SubjectManifest,
    SubjectPaths,
    load_npz,
    split_frames,
    write_manifest,
)

log = logging.getLogger(__name__)

STEP_VERSIONS = {
    "detect": 2,
    "track": 2,
    "face_model": 2,
    "masks": 1,
    "blendshapes": 2,
    "audio": 1,
    "audio_features": 1,
    "finalize": 1,
}


@dataclass
class PreprocessConfig:
    """Everything that shapes a subject; part of each step's cache key."""

    size: int = 512
    """Side of the square crop written to frames/ (pixels)."""
    fps: float = 25.0
    """Constant frame rate the video is resampled to."""
    audio_features: str = "mel"
    """``mel`` (no weights), ``hubert:PATH_OR_NAME`` or ``wav2vec2:PATH_OR_NAME``."""
    min_duration_s: float = 5.0
    """Shorter videos are refused: too little to learn a person from."""
    max_gap_s: float = 0.5
    """Untracked runs up to this long get interpolated landmarks; longer ones stay empty."""
    min_valid_share: float = 0.5
    """Refuse videos where the face is tracked in fewer frames than this share."""
    device: str = "cpu"
    """Device for learned audio features (hubert / wav2vec2)."""
    detect: DetectConfig = field(default_factory=DetectConfig)
    crop: CropConfig = field(default_factory=CropConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    def __post_init__(self) -> None:
        if self.size < 64 or self.size % 2:
            raise ValueError(f"size must be an even number of pixels >= 64, got {self.size}")
        if not 1 <= self.fps <= 120:
            raise ValueError(f"fps must be within 1..120, got {self.fps}")


@dataclass
class PreprocessSummary:
    """What a run produced, for the command line's closing lines."""

    subject_dir: Path
    n_frames: int
    valid_share: float
    reprojection_error_px: float
    seconds: float
    step_seconds: dict[str, float]
    skipped: list[str]
    warnings: list[str]

    @property
    def frames_per_second(self) -> float:
        return self.n_frames / max(self.seconds, 1e-9)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class StepCache:
    """Remembers, in ``.work/steps.json``, the key each step last completed with."""

    def __init__(self, work_dir: Path):
        self.path = work_dir / "steps.json"
        self.state: dict[str, str] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    @staticmethod
    def key(name: str, params: Any, deps: tuple[str, ...] = ()) -> str:
        blob = json.dumps({"v": STEP_VERSIONS[name], "p": params, "d": deps}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def fresh(self, name: str, key: str, outputs: list[Path]) -> bool:
        return self.state.get(name) == key and all(p.exists() for p in outputs)

    def done(self, name: str, key: str) -> None:
        self.state[name] = key
        write_json_atomic(self.path, json.dumps(self.state, indent=1, sort_keys=True))

    def forget(self, name: str) -> None:
        if self.state.pop(name, None) is not None:
            write_json_atomic(self.path, json.dumps(self.state, indent=1, sort_keys=True))


def _check_inputs(video: Path, audio: Optional[Path], config: PreprocessConfig) -> media.MediaInfo:
    info = media.probe(video)
    if not info.has_video:
        raise InputError(f"{video} has no video stream; give a video of the person talking.")
    if info.duration_s is not None and info.duration_s < config.min_duration_s:
        raise InputError(
            f"{video} is {info.duration_s:.1f} s long; at least {config.min_duration_s:g} s of the "
            "person talking is needed (a few minutes is best)."
        )
    if audio is not None:
        if not media.probe(audio).has_audio:
            raise InputError(f"{audio} has no audio stream.")
    elif not info.has_audio:
        raise InputError(f"{video} has no audio stream; pass the speech with --audio FILE.")
    return info


def _prepare_output(out: Path, source_sha: str, force: bool) -> None:
    """Create ``out``, resume it when it holds the same source, refuse to clobber anything else."""
    paths = SubjectPaths(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory; choose another output path.")
    if out.is_dir() and any(out.iterdir()):
        ours = paths.work_dir.is_dir() or paths.manifest.is_file()
        source_file = paths.work_dir / "source.json"
        same = source_file.is_file() and json.loads(source_file.read_text()).get("sha256") == source_sha
        if not ours:
            raise OutputExistsError(
                f"{out} exists and is not a subject directory; choose a new or empty directory."
            )
        if not same and not force:
            raise OutputExistsError(
                f"{out} holds a subject of another video; pass --force to replace it or choose another directory."
            )
        if force and not same:
            shutil.rmtree(out)
        elif same:
            log.info("Resuming the subject in %s", out)
    out.mkdir(parents=True, exist_ok=True)
    paths.work_dir.mkdir(exist_ok=True)
    if paths.manifest.exists():  # about to change: no longer a complete subject until finalize
        paths.manifest.unlink()
    write_json_atomic(paths.work_dir / "source.json", json.dumps({"sha256": source_sha}))


def _tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"avatar": __version__}
    for name in ("torch", "numpy", "mediapipe", "opencv-contrib-python", "imageio-ffmpeg", "transformers"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


def preprocess(
    video: Path | str,
    out_dir: Path | str,
    config: PreprocessConfig = PreprocessConfig(),
    audio: Optional[Path | str] = None,
    force: bool = False,
    progress: Optional[Progress] = None,
) -> PreprocessSummary:
    """Turn a talking-head video into a subject directory (see ``avatar.subject``).

    Args:
        video: any video ffmpeg reads (variable frame rate is resampled to ``config.fps``).
        out_dir: the subject directory; resumed when it already holds this video's subject.
        audio: speech to use instead of the video's own audio track.
        force: replace a subject of another video in ``out_dir``.

    Raises:
        InputError: unreadable input, no face, no audio, too short.
        OutputExistsError: ``out_dir`` holds something else.
    """
    from avatar.audio import feature_shape, parse_audio_feature_spec

    start = time.perf_counter()
    video, out = Path(video), Path(out_dir)
    audio = Path(audio) if audio is not None else None
    feature_config = parse_audio_feature_spec(config.audio_features)
    info = _check_inputs(video, audio, config)
    source_sha = sha256_file(video)
    audio_sha = sha256_file(audio) if audio is not None else None
    _prepare_output(out, source_sha, force)
    paths = SubjectPaths(out)
    work = paths.work_dir
    cache = StepCache(work)
    timings: dict[str, float] = {}
    skipped: list[str] = []
    warnings: list[str] = []

    def run(name: str, key: str, outputs: list[Path], fn: Callable[[], None]) -> None:
        if cache.fresh(name, key, outputs):
            skipped.append(name)
            return
        cache.forget(name)
        t0 = time.perf_counter()
        fn()
        timings[name] = round(time.perf_counter() - t0, 3)
        cache.done(name, key)

    # 1. Sparse face detection -> fixed crop.
    detect_key = cache.key("detect", {"sha": source_sha, "fps": config.fps, "cfg": asdict(config.detect)})
    detect_file = work / "detect.npz"

    def do_detect() -> None:
        det = detect_faces(video, config.fps, info, config.detect, progress)
        save_npz_atomic(detect_file, times=det.times, boxes=det.boxes, n_faces=det.n_faces,
                        source_size=np.array(det.source_size), warnings=np.array(det.warnings, dtype=str))

    run("detect", detect_key, [detect_file], do_detect)
    d = load_npz(detect_file)
    det = Detections(d["times"], d["boxes"], d["n_faces"], tuple(int(v) for v in d["source_size"]),
                     [str(w) for w in d["warnings"]])
    warnings += det.warnings
    crop = place_crop(det, config.crop)

    # 2. Main pass: frames, raw landmarks, provisional masks, background plate.
    track_key = cache.key("track", {"crop": asdict(crop), "size": config.size, "cfg": asdict(config.track)},
                          (detect_key,))
    track_file = work / "track.npz"
    n_expected = int(round(info.duration_s * config.fps)) if info.duration_s else None

    def do_track() -> None:
        import cv2

        result = track_video(video, paths, config.fps, crop, config.size, n_expected, config.track, progress)
        if len(result.valid) == 0:
            raise InputError(f"{video} has no decodable video frames.")
        cv2.imwrite(str(paths.background), result.background[:, :, ::-1])
        cv2.imwrite(str(paths.neck_plate), result.neck_plate[:, :, ::-1])
        save_npz_atomic(track_file, landmarks=result.landmarks, valid=result.valid)

    run("track", track_key, [track_file, paths.background, paths.neck_plate], do_track)
    tracked = load_npz(track_file)
    valid = tracked["valid"]
    n_frames = len(valid)
    if n_frames / config.fps < config.min_duration_s:
        raise InputError(
            f"{video} gave only {n_frames / config.fps:.1f} s of video (truncated or too short); "
            f"at least {config.min_duration_s:g} s is needed."
        )
    valid_share = float(valid.mean())
    if valid_share < config.min_valid_share:
        raise InputError(
            f"The face was tracked in only {valid_share:.0%} of the frames of {video}; give a video "
            "where one face stays visible (or trim it to the part where it does)."
        )
    if valid_share < 0.95:
        warnings.append(f"The face was not tracked in {1 - valid_share:.0%} of the frames; they are marked invalid.")
        log.warning(warnings[-1])

    # 3. Fill short gaps, fit the face model and head pose.
    face_key = cache.key("face_model", {"gap": config.max_gap_s}, (track_key,))
    face_file = work / "face_model.npz"

    def do_face_model() -> None:
        from avatar.preprocess.face_model import fit_face_model

        filled, usable = fill_gaps(tracked["landmarks"], valid, int(round(config.max_gap_s * config.fps)))
        fit = fit_face_model(np.nan_to_num(filled), valid, (config.size, config.size), progress=progress)
        save_npz_atomic(
            face_file, landmarks=filled, usable=usable, intrinsics=fit.intrinsics,
            cam_to_world=fit.cam_to_world, face_mean=fit.face_mean, face_basis=fit.face_basis,
            expression=fit.expression, frame_error=fit.per_frame_error_px,
            error=np.float64(fit.reprojection_error_px),
        )

    run("face_model", face_key, [face_file], do_face_model)
    face = load_npz(face_file)

    # 4. Redraw face parts in the masks of frames whose landmarks were interpolated.
    masks_key = cache.key("masks", {}, (face_key,))
    masks_done = work / "masks.done"

    def do_masks() -> None:
        import cv2

        from avatar.preprocess.masks import label_map

        redo = np.flatnonzero(face["usable"] & ~valid)
        for i in redo:
            labels = cv2.imread(str(paths.mask(int(i))), cv2.IMREAD_UNCHANGED)
            cv2.imwrite(str(paths.mask(int(i))), label_map(labels > 0, face["landmarks"][i]))
        masks_done.write_text(f"{len(redo)}\n")

    run("masks", masks_key, [masks_done], do_masks)

    # 5. Blendshape tracks.
    blend_key = cache.key("blendshapes", {}, (face_key,))
    blend_file = work / "blendshapes.npz"

    def do_blendshapes() -> None:
        from avatar.preprocess.blendshapes import BLENDSHAPE_NAMES, compute_blendshapes
        from avatar.preprocess.face_model import FaceModelFit

        fit = FaceModelFit(
            intrinsics=face["intrinsics"], cam_to_world=face["cam_to_world"], face_mean=face["face_mean"],
            face_basis=face["face_basis"], expression=face["expression"], valid=valid,
            reprojection_error_px=float(face["error"]), per_frame_error_px=face["frame_error"],
            image_size=(config.size, config.size),
        )
        values = compute_blendshapes(fit, np.nan_to_num(face["landmarks"]), valid)
        save_npz_atomic(blend_file, values=values.astype(np.float32),
                        names=np.array(list(BLENDSHAPE_NAMES), dtype=str))

    run("blendshapes", blend_key, [blend_file], do_blendshapes)

    # 6. Audio: 16 kHz mono, exactly as long as the frames.
    audio_key = cache.key("audio", {"sha": audio_sha or source_sha, "fps": config.fps, "n": n_frames})

    def do_audio() -> None:
        samples = media.load_audio(audio if audio is not None else video)
        want = int(round(n_frames / config.fps * media.AUDIO_RATE))
        if len(samples) < want:
            short = (want - len(samples)) / media.AUDIO_RATE
            if short > 0.1:
                log.warning("The audio is %.1f s shorter than the video; padded with silence.", short)
            samples = np.pad(samples, (0, want - len(samples)))
        samples = samples[:want]
        if np.sqrt(np.mean(np.square(samples))) < 1e-4:
            log.warning("The audio of %s is silent; the avatar cannot learn lip motion from it.",
                        audio or video)
        media.write_wav(paths.audio, samples)

    run("audio", audio_key, [paths.audio], do_audio)

    # 7. Audio features aligned to frames.
    feat_key = cache.key("audio_features", asdict(feature_config), (audio_key,))
    feat_file = work / "audio_features.npy"

    def do_features() -> None:
        from avatar.audio import compute_audio_features

        samples, _ = media.read_wav(paths.audio)
        feats = compute_audio_features(samples, n_frames, config.fps, feature_config,
                                       device=config.device, progress=progress)
        with atomic_output(feat_file) as tmp:
            np.save(tmp, feats.astype(np.float32))

    run("audio_features", feat_key, [feat_file], do_features)

    # 8. tracks.npz, report, manifest. Training caches of an older state are dropped.
    if timings and paths.cache_dir.exists():
        shutil.rmtree(paths.cache_dir)
    blend = load_npz(blend_file)
    save_npz_atomic(
        paths.tracks,
        landmarks=face["landmarks"].astype(np.float32),
        valid=valid,
        intrinsics=face["intrinsics"].astype(np.float32),
        cam_to_world=face["cam_to_world"].astype(np.float32),
        face_mean=face["face_mean"].astype(np.float32),
        face_basis=face["face_basis"].astype(np.float32),
        expression=face["expression"].astype(np.float32),
        blendshapes=blend["values"],
        blendshape_names=blend["names"],
        audio_features=np.load(feat_file, allow_pickle=False),
    )
    _write_report(paths, config.fps, face, valid, blend)
    if any(d["n_faces"] >= 2):
        log.info("Frames with several faces: %d of %d sampled", int((d["n_faces"] >= 2).sum()), len(d["n_faces"]))
    w, dim = feature_shape(feature_config)
    elapsed = time.perf_counter() - start
    manifest = SubjectManifest(
        n_frames=n_frames,
        fps=config.fps,
        size=config.size,
        crop={**asdict(crop), "source_w": det.source_size[0], "source_h": det.source_size[1]},
        source={"path": str(video.resolve()), "sha256": source_sha, "duration_s": info.duration_s,
                "audio_path": str(audio.resolve()) if audio else None, "audio_sha256": audio_sha},
        split=split_frames(n_frames),
        audio_features={**asdict(feature_config), "window": w, "dim": dim},
        stats={
            "valid_share": valid_share,
            "reprojection_error_px": float(face["error"]),
            "max_faces_in_a_frame": int(d["n_faces"].max()),
            "warnings": warnings,
            "seconds": timings,
        },
        steps=dict(STEP_VERSIONS),
        tools=_tool_versions(),
    )
    write_manifest(out, manifest)
    return PreprocessSummary(
        subject_dir=out, n_frames=n_frames, valid_share=valid_share,
        reprojection_error_px=float(face["error"]), seconds=elapsed, step_seconds=timings,
        skipped=skipped, warnings=warnings,
    )


def _write_report(paths: SubjectPaths, fps: float, face: dict[str, np.ndarray], valid: np.ndarray,
                  blend: dict[str, np.ndarray]) -> None:
    import cv2

    from avatar.preprocess.report import contact_sheet, overlay, plot_tracks

    paths.report_dir.mkdir(exist_ok=True)
    n = len(valid)
    picks = np.unique(np.linspace(0, n - 1, num=min(16, n)).round().astype(int))
    tiles, captions = [], []
    for i in picks:
        frame = cv2.imread(str(paths.frame(int(i))))[:, :, ::-1]
        labels = cv2.imread(str(paths.mask(int(i))), cv2.IMREAD_UNCHANGED)
        lm = face["landmarks"][i] if face["usable"][i] else None
        tiles.append(overlay(frame, labels, lm, bool(valid[i])))
        captions.append(f"#{i}  {i / fps:.1f}s" + ("" if valid[i] else "  (not tracked)"))
    sheet = contact_sheet(tiles, captions)
    cv2.imwrite(str(paths.report_dir / "contact_sheet.png"), sheet[:, :, ::-1])
    plot_tracks(paths.report_dir / "tracks.png", fps, face["cam_to_world"], valid, blend["values"],
                [str(s) for s in blend["names"]], face["frame_error"])
