"""Video -> subject directory: the table of preprocessing steps, and ``preprocess`` that runs it.

Each step below is a plain function ``step(ctx, params)`` with typed parameters; the :data:`STEPS`
table gives it a version and the named artifacts it reads and writes (their files are known only
to :mod:`avatar.preprocess.artifacts`). :func:`avatar.preprocess.steps.run_steps` runs the table
and skips every step whose cache key (version, parameters, keys of the steps it reads from) is
unchanged and whose outputs exist, so an interrupted or re-parameterised run redoes only what
changed. ``subject.json`` is written last: until it exists the directory is not a subject,
whatever else is in it.

The cache keys hash the same parameters, under the same names, as before the steps were a table,
so the caches of subjects made then stay valid (each params class's ``cache_params`` says how).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from avatar import __version__, media
from avatar.atomic import write_json_atomic
from avatar.errors import InputError, OutputExistsError
from avatar.preprocess.artifacts import Workspace
from avatar.preprocess.detect import CropConfig, DetectConfig, Detections, detect_faces, place_crop
from avatar.preprocess.steps import Source, Step, StepCache, StepContext, StepParams, run_steps
from avatar.preprocess.track import TrackConfig, fill_gaps, track_video
from avatar.progress import Progress
from avatar.subject import SubjectManifest, SubjectPaths, read_manifest, split_frames, write_manifest

if TYPE_CHECKING:
    from avatar.audio import AudioFeatureConfig
    from avatar.preprocess.face_model import FaceModelFit

__all__ = ["PreprocessConfig", "PreprocessSummary", "STEPS", "STEP_VERSIONS", "StepCache", "preprocess"]

log = logging.getLogger(__name__)


MIN_SIZE, MAX_SIZE = 64, 4096
"""Bounds of the crop side: below 64 px a face has too few pixels to track; above 4096 the
frames of one second outgrow memory, and no camera in use delivers such a head crop."""

SILENCE_PEAK = 1e-3
"""Speech whose peak stays below this (-60 dBFS) is silence: refused, as ``avatar render`` does."""


DEFAULT_AUDIO_FEATURES = "whisper"
"""Whisper's encoder carries what is said, not who says it: on a 50 s French clip it took the
self-driven val mouth_corr from -0.28 (mel) to 0.76 and the cross-speaker one from 0.10 to 0.36,
and the demo's val PSNR from 34.0 to 36.3 dB (benchmarks/RESULTS.md, lip sync)."""


@dataclass
class PreprocessConfig:
    """Everything that shapes a subject; part of each step's cache key."""

    size: int = 512
    """Side of the square crop written to frames/ (pixels)."""
    fps: float = 25.0
    """Constant frame rate the video is resampled to."""
    audio_features: str = DEFAULT_AUDIO_FEATURES
    """``whisper`` (bundled, the default), ``mel`` (no weights), ``hubert:PATH_OR_NAME`` or
    ``wav2vec2:PATH_OR_NAME``."""
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
        if not MIN_SIZE <= self.size <= MAX_SIZE or self.size % 2:
            raise ValueError(f"size must be an even number of pixels within {MIN_SIZE}..{MAX_SIZE}, got {self.size}")
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


# --- the steps -------------------------------------------------------------------------------
# Each params class holds what shapes its step's outputs besides the step's inputs. Fields left
# out of ``cache_params`` either reach the key through the keys of the inputs (fps and size
# through detect's and track's) or do not change the outputs (the device, the progress bar).


@dataclass(frozen=True)
class DetectParams(StepParams):
    source_sha256: str
    fps: float
    detect: DetectConfig

    def cache_params(self) -> Any:
        return {"sha": self.source_sha256, "fps": self.fps, "cfg": asdict(self.detect)}


def detect_params(config: PreprocessConfig, ctx: StepContext) -> DetectParams:
    return DetectParams(ctx.source.sha256, config.fps, config.detect)


def detect(ctx: StepContext, params: DetectParams) -> None:
    """Sparse face detection: where the head is over the video, to place the fixed crop before decoding it."""
    det = detect_faces(ctx.source.video, params.fps, ctx.source.info, params.detect, ctx.progress)
    ctx.save("detections", det.to_arrays())


def pass_on_detection_warnings(ctx: StepContext, params: DetectParams) -> None:
    """Several faces in the video: the user hears about it on every run, not only the first."""
    for warning in ctx.load("detections")["warnings"]:
        ctx.warn(str(warning))


@dataclass(frozen=True)
class TrackParams(StepParams):
    crop: media.Crop
    size: int
    fps: float
    n_expected: Optional[int]
    """Frames the video should give (for progress and the background sampling), None if unknown."""
    track: TrackConfig
    min_duration_s: float
    min_valid_share: float
    """Thresholds of the check after tracking, not part of the key: a stricter one refuses without retracking."""

    def cache_params(self) -> Any:
        return {"crop": asdict(self.crop), "size": self.size, "cfg": asdict(self.track)}


def track_params(config: PreprocessConfig, ctx: StepContext) -> TrackParams:
    """The crop is placed here, from the detections, so that a new crop config retracks."""
    crop = place_crop(Detections.from_arrays(ctx.load("detections")), config.crop)
    duration = ctx.source.info.duration_s
    n_expected = int(round(duration * config.fps)) if duration else None
    return TrackParams(crop, config.size, config.fps, n_expected, config.track, config.min_duration_s,
                       config.min_valid_share)


def track(ctx: StepContext, params: TrackParams) -> None:
    """The main pass: frames, raw face-mesh landmarks, provisional masks and the background plates."""
    video = ctx.source.video
    result = track_video(video, ctx.paths, params.fps, params.crop, params.size, params.n_expected, params.track,
                         ctx.progress)
    if len(result.valid) == 0:
        raise InputError(f"{video} has no decodable video frames.")
    ctx.save("background", result.background)
    ctx.save("neck_plate", result.neck_plate)
    ctx.save("tracking", {"landmarks": result.landmarks, "valid": result.valid})


def check_tracking(ctx: StepContext, params: TrackParams) -> None:
    """Refuse videos too short, or where the face is lost too often, to learn a person from.

    Raises:
        InputError: too few frames, or too few of them tracked.
    """
    video = ctx.source.video
    valid = ctx.load("tracking")["valid"]
    n_frames = len(valid)
    if n_frames / params.fps < params.min_duration_s:
        raise InputError(
            f"{video} gave only {n_frames / params.fps:.1f} s of video (truncated or too short); "
            f"at least {params.min_duration_s:g} s is needed."
        )
    valid_share = float(valid.mean())
    if valid_share < params.min_valid_share:
        raise InputError(
            f"The face was tracked in only {valid_share:.0%} of the frames of {video}; give a video "
            "where one face stays visible (or trim it to the part where it does)."
        )
    if valid_share < 0.95:
        ctx.warn(f"The face was not tracked in {1 - valid_share:.0%} of the frames; they are marked invalid.")
        log.warning(ctx.log.warnings[-1])


@dataclass(frozen=True)
class FaceModelParams(StepParams):
    max_gap_s: float
    fps: float
    size: int

    def cache_params(self) -> Any:
        return {"gap": self.max_gap_s}


def face_model_params(config: PreprocessConfig, ctx: StepContext) -> FaceModelParams:
    return FaceModelParams(config.max_gap_s, config.fps, config.size)


def face_model(ctx: StepContext, params: FaceModelParams) -> None:
    """Fill short tracking gaps, then fit the camera, head poses, face shape and expressions."""
    from avatar.preprocess.face_model import fit_face_model

    tracked = ctx.load("tracking")
    valid = tracked["valid"]
    filled, usable = fill_gaps(tracked["landmarks"], valid, int(round(params.max_gap_s * params.fps)))
    fit = fit_face_model(np.nan_to_num(filled), valid, (params.size, params.size), progress=ctx.progress)
    ctx.save("face_model", dict(
        landmarks=filled, usable=usable, intrinsics=fit.intrinsics, cam_to_world=fit.cam_to_world,
        face_mean=fit.face_mean, face_basis=fit.face_basis, expression=fit.expression,
        frame_error=fit.per_frame_error_px, error=np.float64(fit.reprojection_error_px),
    ))


def face_model_fit(face: dict[str, np.ndarray], valid: np.ndarray, size: int) -> FaceModelFit:
    """The :class:`FaceModelFit` back from the ``face_model`` artifact."""
    from avatar.preprocess.face_model import FaceModelFit

    return FaceModelFit(
        intrinsics=face["intrinsics"], cam_to_world=face["cam_to_world"], face_mean=face["face_mean"],
        face_basis=face["face_basis"], expression=face["expression"], valid=valid,
        reprojection_error_px=float(face["error"]), per_frame_error_px=face["frame_error"],
        image_size=(size, size),
    )


@dataclass(frozen=True)
class NoParams(StepParams):
    """For a step that its inputs determine entirely."""


def no_params(config: PreprocessConfig, ctx: StepContext) -> NoParams:
    return NoParams()


def redraw_masks(ctx: StepContext, params: NoParams) -> None:
    """Draw the face parts into the masks of frames whose landmarks were interpolated.

    Tracking drew only person/background there; the masks are redrawn in place, and the marker
    output records that it was done (and for how many frames).
    """
    import cv2

    from avatar.preprocess.masks import label_map

    face = ctx.load("face_model")
    valid = ctx.load("tracking")["valid"]
    redo = np.flatnonzero(face["usable"] & ~valid)
    for i in redo:
        path = str(ctx.paths.mask(int(i)))
        labels = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        cv2.imwrite(path, label_map(labels > 0, face["landmarks"][i]))
    ctx.save("masks_redrawn", f"{len(redo)}\n")


@dataclass(frozen=True)
class BlendshapeParams(StepParams):
    size: int

    def cache_params(self) -> Any:
        return {}


def blendshape_params(config: PreprocessConfig, ctx: StepContext) -> BlendshapeParams:
    return BlendshapeParams(config.size)


def blendshapes(ctx: StepContext, params: BlendshapeParams) -> None:
    """Per-frame blendshape values (jaw open, blinks, ...) measured on the fitted face model."""
    from avatar.preprocess.blendshapes import BLENDSHAPE_NAMES, compute_blendshapes

    face = ctx.load("face_model")
    valid = ctx.load("tracking")["valid"]
    values = compute_blendshapes(face_model_fit(face, valid, params.size), np.nan_to_num(face["landmarks"]), valid)
    ctx.save("blendshapes", {"values": values.astype(np.float32), "names": np.array(list(BLENDSHAPE_NAMES), dtype=str)})


@dataclass(frozen=True)
class AudioParams(StepParams):
    speech_sha256: str
    fps: float
    n_frames: int

    def cache_params(self) -> Any:
        return {"sha": self.speech_sha256, "fps": self.fps, "n": self.n_frames}


def audio_params(config: PreprocessConfig, ctx: StepContext) -> AudioParams:
    """The frame count is all the audio takes from tracking, so it is a parameter, not a dependency."""
    return AudioParams(ctx.source.speech_sha256, config.fps, len(ctx.load("tracking")["valid"]))


def extract_audio(ctx: StepContext, params: AudioParams) -> None:
    """The speech as 16 kHz mono, cut or padded with silence to exactly the length of the frames."""
    speech = ctx.source.speech
    samples = media.load_audio(speech)
    if len(samples) == 0:
        raise InputError(f"{speech} holds no audio samples; give a recording of the person's speech.")
    want = int(round(params.n_frames / params.fps * media.AUDIO_RATE))
    if len(samples) < want:
        short = (want - len(samples)) / media.AUDIO_RATE
        if short > 0.1:
            log.warning("The audio is %.1f s shorter than the video; padded with silence.", short)
        samples = np.pad(samples, (0, want - len(samples)))
    samples = samples[:want]
    if float(np.abs(samples).max(initial=0.0)) < SILENCE_PEAK:
        raise InputError(f"The audio of {speech} is silent; the avatar cannot learn lip motion from it. "
                         "Give the speech with --audio FILE.")
    ctx.save("audio", samples)


@dataclass(frozen=True)
class AudioFeatureParams(StepParams):
    features: AudioFeatureConfig
    fps: float
    n_frames: int
    device: str

    def cache_params(self) -> Any:
        return asdict(self.features)


def audio_feature_params(config: PreprocessConfig, ctx: StepContext) -> AudioFeatureParams:
    from avatar.audio import parse_audio_feature_spec

    return AudioFeatureParams(parse_audio_feature_spec(config.audio_features), config.fps,
                              len(ctx.load("tracking")["valid"]), config.device)


def audio_features(ctx: StepContext, params: AudioFeatureParams) -> None:
    """Speech features cut into one window per video frame (see :mod:`avatar.audio`)."""
    from avatar.audio import compute_audio_features

    feats = compute_audio_features(ctx.load("audio"), params.n_frames, params.fps, params.features,
                                   device=params.device, progress=ctx.progress)
    ctx.save("audio_features", feats.astype(np.float32))


@dataclass(frozen=True)
class FinalizeParams(StepParams):
    fps: float
    size: int
    crop: CropConfig
    features: AudioFeatureConfig


def finalize_params(config: PreprocessConfig, ctx: StepContext) -> FinalizeParams:
    from avatar.audio import parse_audio_feature_spec

    return FinalizeParams(config.fps, config.size, config.crop, parse_audio_feature_spec(config.audio_features))


def finalize(ctx: StepContext, params: FinalizeParams) -> None:
    """tracks.npz, the report and, last, subject.json. Runs every time: the manifest holds this run's log.

    Training caches (``.cache/``) made from an older state of the subject are dropped.
    """
    from avatar.audio import feature_shape

    paths, source = ctx.paths, ctx.source
    if ctx.log.seconds and paths.cache_dir.exists():
        shutil.rmtree(paths.cache_dir)
    det = Detections.from_arrays(ctx.load("detections"))
    valid = ctx.load("tracking")["valid"]
    face = ctx.load("face_model")
    blend = ctx.load("blendshapes")
    ctx.save("tracks", dict(
        landmarks=face["landmarks"].astype(np.float32),
        valid=valid,
        intrinsics=face["intrinsics"].astype(np.float32),
        cam_to_world=face["cam_to_world"].astype(np.float32),
        face_mean=face["face_mean"].astype(np.float32),
        face_basis=face["face_basis"].astype(np.float32),
        expression=face["expression"].astype(np.float32),
        blendshapes=blend["values"],
        blendshape_names=blend["names"],
        audio_features=ctx.load("audio_features"),
    ))
    _write_report(ctx.path("report"), paths, params.fps, face, valid, blend)
    if any(det.n_faces >= 2):
        log.info("Frames with several faces: %d of %d sampled", int((det.n_faces >= 2).sum()), len(det.n_faces))
    w, dim = feature_shape(params.features)
    n_frames = len(valid)
    manifest = SubjectManifest(
        n_frames=n_frames,
        fps=params.fps,
        size=params.size,
        crop={**asdict(place_crop(det, params.crop)), "source_w": det.source_size[0], "source_h": det.source_size[1]},
        source={"path": str(source.video.resolve()), "sha256": source.sha256, "duration_s": source.info.duration_s,
                "audio_path": str(source.audio.resolve()) if source.audio else None,
                "audio_sha256": source.audio_sha256},
        split=split_frames(n_frames),
        audio_features={**asdict(params.features), "window": w, "dim": dim},
        stats={
            "valid_share": float(valid.mean()),
            "reprojection_error_px": float(face["error"]),
            "max_faces_in_a_frame": int(det.n_faces.max()),
            "warnings": ctx.log.warnings,
            "seconds": ctx.log.seconds,
        },
        steps=dict(STEP_VERSIONS),
        tools=_tool_versions(),
    )
    write_manifest(paths.root, manifest)


STEPS: tuple[Step, ...] = (
    Step("detect", version=2, inputs=(), outputs=("detections",),
         run=detect, params=detect_params, check=pass_on_detection_warnings),
    Step("track", version=2, inputs=("detections",),
         outputs=("tracking", "frames", "masks", "background", "neck_plate"),
         run=track, params=track_params, check=check_tracking),
    Step("face_model", version=2, inputs=("tracking",), outputs=("face_model",),
         run=face_model, params=face_model_params),
    Step("masks", version=1, inputs=("tracking", "face_model", "masks"), outputs=("masks_redrawn",),
         run=redraw_masks, params=no_params),
    Step("blendshapes", version=2, inputs=("tracking", "face_model"), outputs=("blendshapes",),
         run=blendshapes, params=blendshape_params),
    Step("audio", version=2, inputs=("tracking",), outputs=("audio",),
         run=extract_audio, params=audio_params, keyed_on=()),
    Step("audio_features", version=1, inputs=("audio", "tracking"), outputs=("audio_features",),
         run=audio_features, params=audio_feature_params, keyed_on=("audio",)),
    Step("finalize", version=1,
         inputs=("detections", "tracking", "frames", "masks", "face_model", "masks_redrawn", "blendshapes", "audio",
                 "audio_features"),
         outputs=("tracks", "report", "manifest"),
         run=finalize, params=finalize_params, cached=False),
)
"""The preprocessing steps in the order they run.

``audio`` and ``audio_features`` read only the frame count from tracking, and ``audio`` keeps it
in its parameters: re-tracking (another crop, size...) that keeps the frame count keeps the audio
and its features. ``finalize`` is not cached: it writes this run's log into the manifest.
"""

STEP_VERSIONS: dict[str, int] = {step.name: step.version for step in STEPS}
"""Version of each step, recorded in subject.json."""


# --- the run ---------------------------------------------------------------------------------


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
    from avatar.audio import parse_audio_feature_spec

    start = time.perf_counter()
    video, out = Path(video), Path(out_dir)
    audio = Path(audio) if audio is not None else None
    parse_audio_feature_spec(config.audio_features)  # a bad spec fails before anything is written
    info = _check_inputs(video, audio, config)
    source = Source(video=video, info=info, sha256=sha256_file(video), audio=audio,
                    audio_sha256=sha256_file(audio) if audio is not None else None)
    _prepare_output(out, source.sha256, force)
    run_log = run_steps(STEPS, config, Workspace(out), source, progress)
    manifest = read_manifest(out)
    return PreprocessSummary(
        subject_dir=out, n_frames=manifest.n_frames, valid_share=manifest.stats["valid_share"],
        reprojection_error_px=manifest.stats["reprojection_error_px"], seconds=time.perf_counter() - start,
        step_seconds=run_log.seconds, skipped=run_log.skipped, warnings=run_log.warnings,
    )


def _write_report(report_dir: Path, paths: SubjectPaths, fps: float, face: dict[str, np.ndarray], valid: np.ndarray,
                  blend: dict[str, np.ndarray]) -> None:
    """Contact sheet (frames with masks and landmarks) and plots of the tracks, to check the tracking by eye."""
    import cv2

    from avatar.preprocess.report import contact_sheet, overlay, plot_tracks

    report_dir.mkdir(exist_ok=True)
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
    cv2.imwrite(str(report_dir / "contact_sheet.png"), sheet[:, :, ::-1])
    plot_tracks(report_dir / "tracks.png", fps, face["cam_to_world"], valid, blend["values"],
                [str(s) for s in blend["names"]], face["frame_error"])
