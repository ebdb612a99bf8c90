"""Preprocessing steps run alone, and the step cache of the runner, on synthetic landmark tracks."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from avatar import media
from avatar.audio import AudioFeatureConfig
from avatar.preprocess import pipeline
from avatar.preprocess.artifacts import Workspace
from avatar.preprocess.detect import CropConfig, DetectConfig, Detections, place_crop
from avatar.preprocess.pipeline import PreprocessConfig
from avatar.preprocess.steps import (
    Source,
    Step,
    StepCache,
    StepContext,
    StepParams,
    key_deps,
    producers,
    run_steps,
)
from avatar.preprocess.track import TrackConfig
from avatar.subject import LABEL
from tests.conftest import tone
from tests.preprocess.conftest import make_clip

FPS = 25.0
N_FRAMES = 60
GAP = slice(20, 24)
"""Frames the synthetic tracking loses: 4 frames, short enough for the default max_gap_s (0.5 s)."""

STEP = {step.name: step for step in pipeline.STEPS}


def _tracking(seed: int) -> dict[str, np.ndarray]:
    """The ``tracking`` artifact of a synthetic talking head (512 px) that loses the face in GAP."""
    clip = make_clip(n_frames=N_FRAMES, seed=seed)
    landmarks, valid = clip["landmarks"].copy(), clip["valid"].copy()
    landmarks[GAP], valid[GAP] = np.nan, False
    return {"landmarks": landmarks, "valid": valid}


def _person_masks(tracking: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Provisional masks as tracking writes them where it lost the face: person / background only."""
    mask = np.zeros((512, 512), np.uint8)
    cv2.circle(mask, (256, 256), 200, LABEL["torso_neck"], -1)
    return [mask] * len(tracking["valid"])


def _source(tmp_path: Path, name: str, seconds: float, freq: float = 180.0) -> Source:
    """A wav as the whole source (the audio steps read only the speech)."""
    wav = media.write_wav(tmp_path / f"{name}.wav", tone(seconds, freq=freq))
    sha = hashlib.sha256(wav.read_bytes()).hexdigest()
    return Source(video=wav, info=media.probe(wav), sha256=sha)


def _context(store: Workspace, name: str, source: Source | None = None) -> StepContext:
    return StepContext(STEP[name], store, source)


# --- steps alone --------------------------------------------------------------------------------


def test_face_model_and_blendshapes_alone(tmp_path):
    """Two steps run by hand on a workspace holding only a synthetic ``tracking`` artifact."""
    store = Workspace(tmp_path / "subject")
    store.work_dir.mkdir(parents=True)
    tracking = _tracking(seed=0)
    store.save("tracking", tracking)
    config = PreprocessConfig()

    ctx = _context(store, "face_model")
    pipeline.face_model(ctx, pipeline.face_model_params(config, ctx))
    face = store.load("face_model")
    assert face["usable"].all(), "a 4-frame gap is filled (max_gap_s 0.5 s)"
    assert np.isfinite(face["landmarks"][GAP]).all()
    assert float(face["error"]) < 1.5, "0.5 px noise: the fit reprojects to about that"
    assert face["cam_to_world"].shape == (N_FRAMES, 4, 4)
    assert face["intrinsics"][0, 0] == pytest.approx(1200.0, rel=0.1), "the synthetic focal length"

    ctx = _context(store, "blendshapes")
    pipeline.blendshapes(ctx, pipeline.blendshape_params(config, ctx))
    blend = store.load("blendshapes")
    assert blend["values"].shape == (N_FRAMES, len(blend["names"])) and blend["values"].dtype == np.float32
    assert "jaw_open" in [str(n) for n in blend["names"]]
    assert np.isfinite(blend["values"]).all()

    ctx = _context(store, "face_model", source=None)
    with pytest.raises(KeyError, match="does not declare"):
        ctx.load("audio")
    with pytest.raises(KeyError, match="does not declare"):
        ctx.save("blendshapes", blend)


def test_audio_and_features_alone(tmp_path):
    """Speech shorter than the frames is padded with silence to exactly their length, then featurised."""
    store = Workspace(tmp_path / "subject")
    store.work_dir.mkdir(parents=True)
    store.save("tracking", {"valid": np.ones(N_FRAMES, bool), "landmarks": np.zeros((N_FRAMES, 478, 3), np.float32)})
    source = _source(tmp_path, "speech", seconds=1.5)
    config = PreprocessConfig(audio_features="mel")

    ctx = _context(store, "audio", source)
    params = pipeline.audio_params(config, ctx)
    assert params.n_frames == N_FRAMES
    pipeline.extract_audio(ctx, params)
    samples = store.load("audio")
    assert len(samples) == round(N_FRAMES / FPS * media.AUDIO_RATE)
    assert np.abs(samples[: media.AUDIO_RATE]).max() > 0.1
    assert np.abs(samples[int(1.6 * media.AUDIO_RATE):]).max() == 0.0

    ctx = _context(store, "audio_features", source)
    pipeline.audio_features(ctx, pipeline.audio_feature_params(config, ctx))
    feats = store.load("audio_features")
    assert feats.shape == (N_FRAMES, 16, 80) and feats.dtype == np.float32
    assert not np.allclose(feats[10], feats[50]), "speech and silence give different features"


def test_masks_redrawn_where_landmarks_were_interpolated(tmp_path):
    store = Workspace(tmp_path / "subject")
    store.work_dir.mkdir(parents=True)
    store.paths.masks_dir.mkdir()
    tracking = _tracking(seed=0)
    store.save("tracking", tracking)
    for i, mask in enumerate(_person_masks(tracking)):
        cv2.imwrite(str(store.paths.mask(i)), mask)
    # the face model's artifact, faked: the true landmarks everywhere, all frames usable
    landmarks = make_clip(n_frames=N_FRAMES, seed=0)["landmarks"]
    store.save("face_model", {"landmarks": landmarks, "usable": np.ones(N_FRAMES, bool)})

    pipeline.redraw_masks(_context(store, "masks"), pipeline.NoParams())
    assert store.load("masks_redrawn") == f"{GAP.stop - GAP.start}\n"
    for i in (GAP.start, GAP.stop - 1):
        labels = cv2.imread(str(store.paths.mask(i)), cv2.IMREAD_UNCHANGED)
        assert (labels == LABEL["face"]).sum() > 1000, "the face is drawn from the interpolated landmarks"
    untouched = cv2.imread(str(store.paths.mask(0)), cv2.IMREAD_UNCHANGED)
    assert (untouched != LABEL["face"]).all(), "tracked frames keep the masks tracking drew"


# --- the table and the cache keys ------------------------------------------------------------


def test_table_is_well_formed():
    made = producers(pipeline.STEPS)
    assert made["tracking"] == "track" and made["manifest"] == "finalize"
    assert list(pipeline.STEP_VERSIONS) == [s.name for s in pipeline.STEPS]
    bad = (replace(STEP["face_model"]),)
    with pytest.raises(ValueError, match="before any step writes it"):
        producers(bad)
    twice = (STEP["detect"], replace(STEP["detect"], name="detect_again"))
    with pytest.raises(ValueError, match="written by both"):
        producers(twice)


def _legacy_key(version: int, params: dict, deps: tuple[str, ...] = ()) -> str:
    """The key formula of the pipeline before the step table (it must not change: subjects' caches)."""
    blob = json.dumps({"v": version, "p": params, "d": deps}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def test_cache_keys_are_those_of_subjects_made_before_the_table(tmp_path):
    """Same step versions, parameters under the same names, same dependencies: old caches stay valid.

    The one deliberate change since the table: ``audio`` 2 (decoded on the video's clock), so old
    subjects re-extract their audio (seconds) and keep every other step."""
    assert pipeline.STEP_VERSIONS == {"detect": 2, "track": 2, "face_model": 2, "masks": 1, "blendshapes": 2,
                                      "audio": 2, "audio_features": 1, "finalize": 1}
    assert key_deps(pipeline.STEPS) == {
        "detect": (), "track": ("detect",), "face_model": ("track",), "masks": ("face_model",),
        "blendshapes": ("face_model",), "audio": (), "audio_features": ("audio",),
    }
    config = PreprocessConfig(size=256, fps=30.0, max_gap_s=0.4, audio_features="mel")
    store = Workspace(tmp_path)
    store.work_dir.mkdir()
    boxes = np.array([[100.0, 80.0, 180.0, 190.0]] * 5)
    det = Detections(np.arange(5) / 5.0, boxes, np.ones(5, int), (640, 360), [])
    store.save("detections", det.to_arrays())
    store.save("tracking", {"valid": np.ones(300, bool)})
    source = Source(video=tmp_path / "v.mp4", info=media.MediaInfo(tmp_path / "v.mp4", 10.0, True, True),
                    sha256="a" * 64, audio=tmp_path / "s.wav", audio_sha256="b" * 64)

    def params(name: str):
        return STEP[name].params(config, StepContext(STEP[name], store, source)).cache_params()

    crop = place_crop(det, CropConfig())
    assert params("detect") == {"sha": "a" * 64, "fps": 30.0, "cfg": asdict(DetectConfig())}
    assert params("track") == {"crop": asdict(crop), "size": 256, "cfg": asdict(TrackConfig())}
    assert params("face_model") == {"gap": 0.4}
    assert params("masks") == {} and params("blendshapes") == {}
    assert params("audio") == {"sha": "b" * 64, "fps": 30.0, "n": 300}
    assert params("audio_features") == asdict(AudioFeatureConfig(kind="mel"))
    for version, p, deps in [(2, params("detect"), ()), (1, params("audio"), ()),
                             (2, {"gap": 0.4}, ("0123456789abcdef0123",))]:
        assert StepCache.key(version, p, deps) == _legacy_key(version, p, deps)
    # pinned (computed with the pipeline before the table): a default detect step on an all-"a" source
    assert StepCache.key(2, {"sha": "a" * 64, "fps": 25.0, "cfg": asdict(DetectConfig())}) == "ac4088e02497ff35da95"


# --- the runner ------------------------------------------------------------------------------


@dataclass
class ClipConfig(PreprocessConfig):
    """The preprocessing config, plus the seed of the synthetic head the fake tracking step "sees"."""

    seed: int = 0


@dataclass(frozen=True)
class FakeTrackParams(StepParams):
    seed: int


def fake_track(ctx: StepContext, params: FakeTrackParams) -> None:
    """Stands in for the track step: synthetic landmarks and person-only masks, no video."""
    tracking = _tracking(params.seed)
    ctx.path("masks").mkdir(exist_ok=True)
    for i, mask in enumerate(_person_masks(tracking)):
        cv2.imwrite(str(ctx.paths.mask(i)), mask)
    ctx.save("tracking", tracking)


FAKE_TRACK = Step("track", version=1, inputs=(), outputs=("tracking", "masks"), run=fake_track,
                  params=lambda config, ctx: FakeTrackParams(config.seed))
TABLE = (FAKE_TRACK,) + tuple(STEP[n] for n in ("face_model", "masks", "blendshapes", "audio", "audio_features"))
CACHED_OUTPUTS = ("tracking", "face_model", "masks_redrawn", "blendshapes", "audio", "audio_features")


def _mtimes(store: Workspace) -> dict[str, int]:
    return {name: store.path(name).stat().st_mtime_ns for name in CACHED_OUTPUTS}


def _ran(run_log) -> list[str]:
    return [name for name in (s.name for s in TABLE) if name in run_log.seconds]


def test_runner_redoes_only_what_changed(tmp_path):
    store = Workspace(tmp_path / "subject")
    source = _source(tmp_path, "speech", seconds=N_FRAMES / FPS)
    config = ClipConfig()

    first = run_steps(TABLE, config, store, source)
    assert _ran(first) == [s.name for s in TABLE] and first.skipped == []
    assert store.load("masks_redrawn") == "4\n"
    before = _mtimes(store)

    again = run_steps(TABLE, config, store, source)
    assert again.seconds == {} and again.skipped == [s.name for s in TABLE]
    assert _mtimes(store) == before, "a fresh step writes nothing"

    # the face model's setting: it and the two steps that read the face model redo, nothing else
    shorter_gaps = replace(config, max_gap_s=0.1)
    changed = run_steps(TABLE, shorter_gaps, store, source)
    assert _ran(changed) == ["face_model", "masks", "blendshapes"]
    assert changed.skipped == ["track", "audio", "audio_features"]
    assert store.load("masks_redrawn") == "0\n", "a 4-frame gap is no longer filled at 0.1 s"
    assert not store.load("face_model")["usable"][GAP].any()
    now = _mtimes(store)
    assert [n for n in CACHED_OUTPUTS if now[n] != before[n]] == ["face_model", "masks_redrawn", "blendshapes"]

    # another tracking of the same length: everything downstream of it but the audio redoes
    other_head = replace(shorter_gaps, seed=1)
    assert _ran(run_steps(TABLE, other_head, store, source)) == ["track", "face_model", "masks", "blendshapes"]

    # other speech: the audio and its features only
    other_speech = _source(tmp_path, "other", seconds=N_FRAMES / FPS, freq=240.0)
    assert _ran(run_steps(TABLE, other_head, store, other_speech)) == ["audio", "audio_features"]

    # a missing output: its step redoes, and only it (its key did not change)
    store.path("blendshapes").unlink()
    assert _ran(run_steps(TABLE, other_head, store, other_speech)) == ["blendshapes"]
    assert run_steps(TABLE, other_head, store, other_speech).seconds == {}


def test_runner_refuses_a_step_that_skips_an_output(tmp_path):
    lazy = replace(FAKE_TRACK, run=lambda ctx, params: ctx.save("tracking", _tracking(0)))
    with pytest.raises(RuntimeError, match="did not write masks"):
        run_steps((lazy,), ClipConfig(), Workspace(tmp_path))
    assert "track" not in StepCache(Workspace(tmp_path).work_dir).state
