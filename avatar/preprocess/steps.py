"""The step machinery: a step is a function with typed parameters, declared inputs and outputs, and a version.

:func:`run_steps` runs an ordered table of steps. Each cached step gets a key, a hash of its
version, of its parameters and of the keys of the steps it reads from; a step whose key matches
the one it last completed with, and whose outputs all exist, is skipped. So an interrupted or
re-parameterised run redoes only what changed, and this logic lives here once instead of in
every step. The steps themselves (and the table the ``preprocess`` command runs) are in
:mod:`avatar.preprocess.pipeline`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from avatar import media
from avatar.atomic import write_json_atomic
from avatar.preprocess.artifacts import ARTIFACTS, Workspace
from avatar.progress import Progress
from avatar.subject import SubjectPaths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """The input files of a run: what steps may read besides artifacts."""

    video: Path
    info: media.MediaInfo
    sha256: str
    audio: Optional[Path] = None
    """Speech to use instead of the video's own audio track."""
    audio_sha256: Optional[str] = None

    @property
    def speech(self) -> Path:
        """The file the speech is taken from."""
        return self.audio if self.audio is not None else self.video

    @property
    def speech_sha256(self) -> str:
        return self.audio_sha256 or self.sha256


@dataclass(frozen=True)
class StepParams:
    """Base of the steps' typed parameters: everything that shapes a step's outputs besides its inputs."""

    def cache_params(self) -> Any:
        """What the step's cache key hashes: every field, unless a step says otherwise."""
        return asdict(self)


@dataclass
class RunLog:
    """What happened in one run of the table, for the manifest and the summary."""

    seconds: dict[str, float] = field(default_factory=dict)
    """Seconds of each step that ran (skipped steps are absent)."""
    skipped: list[str] = field(default_factory=list)
    """Steps found fresh in the cache."""
    warnings: list[str] = field(default_factory=list)
    """Sentences for the user about the input (several faces, frames without a face...)."""


class StepContext:
    """What one step sees: the source, its declared artifacts, the progress callback and the run's log.

    Loading or saving an artifact the step did not declare is an error: the declarations in the
    table are what the cache keys follow, so they must be the whole truth.
    """

    def __init__(self, step: "Step", store: Workspace, source: Optional[Source] = None,
                 progress: Optional[Progress] = None, log: Optional[RunLog] = None):
        self.step = step
        self.store = store
        self._source = source
        self.progress = progress
        self.log = log if log is not None else RunLog()

    @property
    def source(self) -> Source:
        """The input files (a step run alone that reads none may be given none)."""
        if self._source is None:
            raise RuntimeError(f"The step {self.step.name!r} reads the source files, and none were given.")
        return self._source

    @property
    def paths(self) -> SubjectPaths:
        """The subject's layout, for the per-frame files of the artifacts written in place."""
        return self.store.paths

    def path(self, name: str) -> Path:
        self._declared(name, self.step.inputs + self.step.outputs)
        return self.store.path(name)

    def load(self, name: str) -> Any:
        """An input, or an output already written (a step's check reads what the step wrote)."""
        self._declared(name, self.step.inputs + self.step.outputs)
        return self.store.load(name)

    def save(self, name: str, value: Any) -> Path:
        self._declared(name, self.step.outputs)
        return self.store.save(name, value)

    def warn(self, message: str) -> None:
        """Tell the user something about the input (kept in the manifest and the summary)."""
        self.log.warnings.append(message)

    def _declared(self, name: str, names: tuple[str, ...]) -> None:
        if name not in names:
            raise KeyError(f"The step {self.step.name!r} does not declare the artifact {name!r}.")


@dataclass(frozen=True)
class Step:
    """One row of the table."""

    name: str
    version: int
    """Bump it when the step's code changes its outputs: every subject then redoes it."""
    inputs: tuple[str, ...]
    """Artifacts it reads, made by earlier steps of the table."""
    outputs: tuple[str, ...]
    """Artifacts it writes. The step is fresh only if they all exist."""
    run: Callable[[StepContext, Any], None]
    """``run(ctx, params)``: does the work, saves its outputs through ``ctx``."""
    params: Callable[[Any, StepContext], StepParams]
    """``params(config, ctx)``: the step's parameters from the run's config (and, rarely, its inputs)."""
    check: Optional[Callable[[StepContext, Any], None]] = None
    """``check(ctx, params)``, after the step whether it ran or was fresh: refusals and warnings about
    the input that must hold on every run (their thresholds are not part of the key)."""
    keyed_on: Optional[tuple[str, ...]] = None
    """Steps whose keys this key holds, when not the producers of its inputs (a step that reads only
    a frame count keeps that count in its parameters instead)."""
    cached: bool = True
    """False for a step that runs every time (it writes what depends on the whole run)."""


class StepCache:
    """Remembers, in ``.work/steps.json``, the key each step last completed with."""

    def __init__(self, work_dir: Path):
        self.path = work_dir / "steps.json"
        self.state: dict[str, str] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    @staticmethod
    def key(version: int, params: Any, deps: tuple[str, ...] = ()) -> str:
        blob = json.dumps({"v": version, "p": params, "d": deps}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def fresh(self, name: str, key: str, outputs: list[Path]) -> bool:
        return self.state.get(name) == key and all(p.exists() for p in outputs)

    def done(self, name: str, key: str) -> None:
        self.state[name] = key
        write_json_atomic(self.path, json.dumps(self.state, indent=1, sort_keys=True))

    def forget(self, name: str) -> None:
        if self.state.pop(name, None) is not None:
            write_json_atomic(self.path, json.dumps(self.state, indent=1, sort_keys=True))


def producers(steps: Sequence[Step]) -> dict[str, str]:
    """``artifact -> name of the step that writes it``, checking that the table is well formed.

    Raises:
        ValueError: an unknown artifact, one written by two steps, one read before it is written,
            or a cached step that reads what an uncached one writes (it would have no key).
    """
    made: dict[str, str] = {}
    cached = {s.name: s.cached for s in steps}
    for step in steps:
        for name in step.inputs + step.outputs:
            if name not in ARTIFACTS:
                raise ValueError(f"Step {step.name!r}: unknown artifact {name!r}.")
        for name in step.inputs:
            if name not in made:
                raise ValueError(f"Step {step.name!r} reads {name!r} before any step writes it.")
            if step.cached and not cached[made[name]]:
                raise ValueError(f"Cached step {step.name!r} reads {name!r} of the uncached {made[name]!r}.")
        for name in step.outputs:
            if name in made:
                raise ValueError(f"{name!r} is written by both {made[name]!r} and {step.name!r}.")
            made[name] = step.name
    return made


def key_deps(steps: Sequence[Step]) -> dict[str, tuple[str, ...]]:
    """For each cached step, the steps whose keys its key holds.

    By default the producers of its inputs, less those whose key another of them already holds
    (a step reading both the face model and the tracking it was fitted to depends on the tracking
    through the face model's key).
    """
    made = producers(steps)
    deps: dict[str, tuple[str, ...]] = {}
    covered: dict[str, set[str]] = {}  # step -> every step whose key its key holds
    for step in steps:
        if not step.cached:
            continue
        if step.keyed_on is not None:
            direct = list(step.keyed_on)
        else:
            direct = list(dict.fromkeys(made[name] for name in step.inputs))
        deps[step.name] = tuple(d for d in direct if not any(d in covered[o] for o in direct if o != d))
        covered[step.name] = set(direct).union(*(covered[d] for d in direct))
    return deps


def run_steps(steps: Sequence[Step], config: Any, store: Workspace, source: Optional[Source] = None,
              progress: Optional[Progress] = None) -> RunLog:
    """Run ``steps`` in order, skipping those whose key and outputs are already there.

    A step's parameters are computed (``step.params(config, ctx)``) on every run, fresh or not,
    since its key needs them; a step whose key changed, or whose outputs are missing, runs.
    """
    store.work_dir.mkdir(parents=True, exist_ok=True)
    cache = StepCache(store.work_dir)
    deps = key_deps(steps)
    keys: dict[str, str] = {}
    run_log = RunLog()
    for step in steps:
        ctx = StepContext(step, store, source, progress, run_log)
        params = step.params(config, ctx)
        if not step.cached:
            step.run(ctx, params)
        else:
            key = keys[step.name] = StepCache.key(step.version, params.cache_params(),
                                                  tuple(keys[d] for d in deps[step.name]))
            if cache.fresh(step.name, key, [store.path(name) for name in step.outputs]):
                run_log.skipped.append(step.name)
            else:
                cache.forget(step.name)
                t0 = time.perf_counter()
                step.run(ctx, params)
                run_log.seconds[step.name] = round(time.perf_counter() - t0, 3)
                missing = [name for name in step.outputs if not store.exists(name)]
                if missing:
                    raise RuntimeError(f"Step {step.name!r} did not write {', '.join(missing)}.")
                cache.done(step.name, key)
                log.debug("step %s done in %.3f s", step.name, run_log.seconds[step.name])
        if step.check is not None:
            step.check(ctx, params)
    return run_log
