"""The run directory: the only code that knows its layout, its config file and its checkpoints.

Layout::

    RUN/
      config.json                     everything needed to rebuild the model and continue training
      checkpoints/step_000500.safetensors + step_000500.json   (tensors + what is not a tensor)
      tb/                             TensorBoard logs
      metrics.json                    validation metrics at the end of training
      previews/                       GT | render | error images

A checkpoint holds the model, the optimizers' moments, the densification state and the random
generators, so that ``--resume`` continues exactly where training stopped. Checkpoints are
safetensors + JSON: loading one never executes code. The JSON records the size and sha256 of the
safetensors file, and every load checks them (and the safetensors header): a checkpoint truncated
by a full disk or a killed writer is skipped, with a warning, for the newest complete one.

Everything that uses a trained avatar (rendering speech, evaluation, the viewer, export) loads it
with :func:`load_avatar`, which dispatches on the run's model kind and finds its subject.
``config.json`` as a whole is the trainer's (:class:`avatar.train.trainer.TrainConfig`); this
module reads only what every user of a run needs: the format version, the model kind and config,
the subject and the training resolution.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from avatar.atomic import atomic_output, clean_stale, scratch_dir, write_json_atomic
from avatar.errors import AvatarError, InputError
from avatar.models import MODEL_KINDS, AvatarModel
from avatar.subject import SubjectPaths, read_manifest

log = logging.getLogger(__name__)

RUN_FORMAT_VERSION = 1
"""Version of ``config.json``'s layout; a run of another version is refused with a clear sentence."""

CHECKPOINT_VERSION = 1

DEFAULT_MODEL_KIND = "gaussian"
"""The kind of runs written before ``config.json`` named one."""


class RunPaths:
    """Paths inside one run directory."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def previews(self) -> Path:
        return self.root / "previews"

    def checkpoint(self, step: int) -> tuple[Path, Path]:
        stem = self.checkpoints / f"step_{step:06d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def checkpoint_steps(self) -> list[int]:
        """Steps of the checkpoints whose two files are present, newest first (not yet verified:
        see :func:`load_checkpoint`)."""
        steps = []
        for p in self.checkpoints.glob("step_*.json"):
            m = re.fullmatch(r"step_(\d+)\.json", p.name)
            if m and p.with_suffix(".safetensors").is_file():
                steps.append(int(m.group(1)))
        return sorted(set(steps), reverse=True)

    def latest_checkpoint(self) -> Optional[int]:
        """Step of the newest checkpoint with both files present, or None."""
        steps = self.checkpoint_steps()
        return steps[0] if steps else None

    def inputs(self) -> list[Path]:
        """What commands read from a run and must never write over (see ``refuse_overwrite``)."""
        return [self.config, self.checkpoints]


def _flatten_optimizer(prefix: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{prefix}/{idx}/{key}"] = t.detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _unflatten_optimizer(prefix: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if not name.startswith(prefix + "/"):
            continue
        _, idx, key = name.rsplit("/", 2)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    paths: RunPaths,
    step: int,
    model: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    extra_tensors: dict[str, torch.Tensor],
    extra_json: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write ``step_N.safetensors`` and ``step_N.json`` atomically; keep the newest ``keep``.

    The JSON lands last and records the tensors file's size and sha256, so that a reader can
    tell a complete checkpoint from one cut short. safetensors writes through a temporary file of
    its own (``.tmp`` + 6 random characters, no pid): it writes inside a scratch directory named with our pid, so a
    killed writer's leftovers are recognised and removed by the next run.
    """
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    clean_stale(paths.checkpoints, legacy_tmp=True)
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_meta = {}
    for name, opt in optimizers.items():
        t, meta = _flatten_optimizer(f"optim/{name}", opt)
        tensors.update(t)
        opt_meta[name] = meta
    tensors.update({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()})
    st_path, json_path = paths.checkpoint(step)
    with atomic_output(st_path) as tmp_st:
        with scratch_dir("ckpt", paths.checkpoints) as scratch:
            save_file(tensors, str(scratch / st_path.name))
            os.replace(scratch / st_path.name, tmp_st)
        digest, size = file_sha256(tmp_st), tmp_st.stat().st_size
    meta = {"version": CHECKPOINT_VERSION, "step": step, "size": size, "sha256": digest, "optimizers": opt_meta,
            **extra_json}
    write_json_atomic(json_path, json.dumps(meta, indent=1))  # lands last: marks the checkpoint complete
    for old in sorted(paths.checkpoint_steps())[:-keep]:
        for p in paths.checkpoint(old):
            p.unlink(missing_ok=True)
    return st_path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class BrokenCheckpoint(InputError):
    """A checkpoint whose files are cut short, corrupt or inconsistent (an older one may be fine)."""


def _safetensors_data_end(path: Path) -> int:
    """The file size the safetensors header of ``path`` describes (8 + header + data).

    Raises:
        BrokenCheckpoint: no readable header.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > size - 8:
            raise BrokenCheckpoint(f"{path.name} is truncated or not a safetensors file (header)")
        try:
            header = json.loads(fh.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            raise BrokenCheckpoint(f"{path.name} has a corrupt safetensors header ({type(err).__name__})") from None
    return 8 + n + max(ends, default=0)


def verify_checkpoint(paths: RunPaths, step: int) -> dict[str, Any]:
    """The JSON of checkpoint ``step`` after checking that both files are whole: the JSON parses
    and names its step, the safetensors file has a readable header and the size it describes,
    and (checkpoints written since the checksum was added) the recorded size and sha256 match.

    Raises:
        BrokenCheckpoint: the first problem found, in words.
        InputError: a checkpoint of another format version.
    """
    st_path, json_path = paths.checkpoint(step)
    if not (st_path.is_file() and json_path.is_file()):
        raise BrokenCheckpoint(f"step {step} is missing {st_path.name if not st_path.is_file() else json_path.name}")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise BrokenCheckpoint(f"{json_path.name} is unreadable ({type(err).__name__})") from None
    if not isinstance(meta, dict) or "version" not in meta:
        raise BrokenCheckpoint(f"{json_path.name} is not a checkpoint's JSON")
    if meta["version"] != CHECKPOINT_VERSION:
        raise InputError(f"{st_path} was written by checkpoint format {meta['version']!r}, this avatar reads "
                         f"{CHECKPOINT_VERSION}; train the run again.")
    if type(meta.get("step")) is not int or meta["step"] != step:
        raise BrokenCheckpoint(f"{json_path.name} names step {meta.get('step')!r}")
    size = st_path.stat().st_size
    if "size" in meta and meta["size"] != size:
        raise BrokenCheckpoint(f"{st_path.name} holds {size} bytes, {meta['size']!r} were written")
    described = _safetensors_data_end(st_path)
    if described != size:
        raise BrokenCheckpoint(f"{st_path.name} holds {size} bytes, its header describes {described}")
    if "sha256" in meta and meta["sha256"] != file_sha256(st_path):
        raise BrokenCheckpoint(f"{st_path.name} does not match its checksum")
    return meta


def _load_one(paths: RunPaths, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta = verify_checkpoint(paths, step)
    st_path = paths.checkpoint(step)[0]
    try:
        tensors = load_file(str(st_path))
    except (OSError, ValueError, SafetensorError) as err:
        raise BrokenCheckpoint(f"{st_path.name} is unreadable ({err})") from None
    return tensors, meta


def load_checkpoint(paths: RunPaths, step: Optional[int] = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and JSON of checkpoint ``step``, or of the newest complete one when ``step`` is None.

    Newer checkpoints that fail :func:`verify_checkpoint` are skipped with a warning: a crash or a
    full disk while one was written must not make the older, complete ones unreachable.

    Raises:
        InputError: no checkpoint, none complete, ``step`` missing or broken, another format version.
    """
    steps = paths.checkpoint_steps()
    if step is not None:
        if step not in steps:
            have = ", ".join(str(s) for s in sorted(steps)) or "none"
            raise InputError(f"{paths.root} has no checkpoint of step {step} (it has: {have}); choose another --step.")
        try:
            return _load_one(paths, step)
        except BrokenCheckpoint as err:
            raise InputError(f"checkpoint step {step} of {paths.root} is broken: {err}; choose another --step, "
                             "or leave it out for the newest complete one.") from None
    if not steps:
        raise InputError(f"{paths.root} has no checkpoint yet (its training stopped before saving one); continue it "
                         f"with `avatar train SUBJECT -o {paths.root} --resume`, or start over with --force.")
    problems = []
    for candidate in steps:
        try:
            tensors, meta = _load_one(paths, candidate)
        except BrokenCheckpoint as err:
            problems.append(str(err))
            continue
        if problems:
            log.warning("Skipped the broken newer checkpoint(s) of %s (%s); using step %d.", paths.root,
                        "; ".join(problems), candidate)
        return tensors, meta
    raise InputError(f"no checkpoint of {paths.root} is complete ({'; '.join(problems)}); train the run again "
                     f"with `avatar train SUBJECT -o {paths.root} --force`.")


def discard_checkpoints_after(paths: RunPaths, step: int) -> None:
    """Delete the checkpoints newer than ``step`` (the broken ones a resume skipped), so that the
    run's newest checkpoint is again the one its training continues from."""
    for newer in paths.checkpoint_steps():
        if newer > step:
            log.warning("Removing the broken checkpoint step %d of %s; training continues from step %d.",
                        newer, paths.root, step)
            for p in paths.checkpoint(newer):
                p.unlink(missing_ok=True)


POSE_CORRECTIONS = "poses/head_corrections"
"""Checkpoint tensor [T, 6] of a run's head pose corrections (see :class:`LoadedAvatar`)."""


def model_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}


def optimizer_state(name: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    return _unflatten_optimizer(f"optim/{name}", tensors, meta["optimizers"][name])


# -- devices ---------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA where a CUDA device is usable (never because a compiler is on PATH)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AvatarError("--device cuda was asked for but no CUDA device is available; use --device cpu.")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise AvatarError(f"unknown device {device!r}; use auto, cpu or cuda.")
    return torch.device(device)


# -- config.json ---------------------------------------------------------------------------------


def write_config(run_dir: Path | str, data: dict[str, Any]) -> None:
    paths = RunPaths(run_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(paths.config, json.dumps(data, indent=2))


def read_config(run_dir: Path | str) -> dict[str, Any]:
    """``config.json`` of a run as a dict, after checking it is one this version reads.

    Raises:
        AvatarError: not a run directory, unreadable or foreign config, another format version.
    """
    paths = RunPaths(run_dir)
    if not paths.config.is_file():
        raise AvatarError(f"{paths.root} is not a run directory (no config.json); train one with `avatar train`.")
    try:
        data = json.loads(paths.config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AvatarError(f"{paths.config} is unreadable ({err}); train the run again.") from None
    if not isinstance(data, dict):
        raise AvatarError(f"{paths.config} does not hold a run's options (a JSON object); train the run again.")
    if data.get("format_version") != RUN_FORMAT_VERSION:
        raise AvatarError(
            f"{paths.root} was trained by run format {data.get('format_version')}, this avatar reads "
            f"{RUN_FORMAT_VERSION}; train it again."
        )
    return data


def model_kind_of(config: dict[str, Any]) -> str:
    kind = config.get("model_kind", DEFAULT_MODEL_KIND)
    if kind not in MODEL_KINDS:
        raise AvatarError(f"the run's model kind {kind!r} is not one this avatar knows ({', '.join(MODEL_KINDS)}).")
    return kind


# -- the subject of a run ------------------------------------------------------------------------


def subject_reference(subject_dir: Path | str, run_dir: Path | str) -> dict[str, str]:
    """How a run remembers its subject: relative to the run (so the two can move together) and
    absolute (so the run alone can move)."""
    subject = Path(subject_dir).resolve()
    run = Path(run_dir).resolve()
    try:
        relative = os.path.relpath(subject, run)
    except ValueError:  # another drive on Windows
        relative = str(subject)
    return {"subject": relative, "subject_absolute": str(subject)}


def find_subject(run_dir: Path | str, config: dict[str, Any], override: Optional[Path | str] = None) -> Path:
    """The subject directory of a run: ``override`` when given, else where the run remembers it.

    Raises:
        InputError: the subject is not found (moved or deleted): one sentence naming ``--subject``.
    """
    if override is not None:
        path = Path(override)
        if not SubjectPaths(path).manifest.is_file():
            raise InputError(f"--subject {path} is not a subject directory (no subject.json).")
        return path
    stored = [str(config.get("subject") or ""), str(config.get("subject_absolute") or "")]
    for candidate in stored:
        if not candidate:
            continue
        path = Path(candidate)
        if not path.is_absolute():
            path = Path(run_dir) / path
        if SubjectPaths(path).manifest.is_file():
            return path
    shown = config.get("subject_absolute") or config.get("subject") or "(none recorded)"
    raise InputError(f"the subject of {run_dir} is not at {shown} any more; pass --subject DIR with its new place.")


# -- loading a trained avatar --------------------------------------------------------------------


@dataclass
class LoadedAvatar:
    """A trained avatar ready to drive: the model (eval mode), where its subject is, how it was trained."""

    model: AvatarModel
    kind: str
    step: int
    subject_dir: Optional[Path]
    """None when loaded with ``need_subject=False`` (export needs no subject)."""
    resolution: int
    """Side of the training images, pixels."""
    config: dict[str, Any]
    """The run's whole ``config.json``."""
    pose_corrections: Optional[torch.Tensor] = None
    """[T, 6] the run's refinement of its subject's tracked head poses for whole-head composites
    (held-out frames aligned to the avatar at the end of training; zeros elsewhere), or None."""


def load_avatar(run_dir: Path | str, device: str = "auto", step: Optional[int] = None,
                subject: Optional[Path | str] = None, need_subject: bool = True) -> LoadedAvatar:
    """The trained avatar of a run (newest checkpoint unless ``step``), on ``device``, in eval mode.

    Raises:
        AvatarError: not a run, no or a broken checkpoint, a checkpoint that does not fit the
            config, a missing subject (pass ``subject``).
    """
    data = read_config(run_dir)
    kind = model_kind_of(data)
    config_cls, model_cls = MODEL_KINDS[kind]
    try:
        model_config = config_cls.from_dict(data.get("model", {}))
    except (TypeError, ValueError) as err:
        raise AvatarError(f"{RunPaths(run_dir).config} does not match this version of avatar ({err}); "
                          "train again.") from None
    subject_dir = find_subject(run_dir, data, subject) if need_subject or subject is not None else None
    tensors, meta = load_checkpoint(RunPaths(run_dir), step)
    try:
        model = model_cls.from_state_dict(model_config, model_state(tensors))
    except (RuntimeError, KeyError) as err:
        raise AvatarError(f"the checkpoint of {run_dir} does not fit its config.json ({err}); train again.") from None
    model = model.to(resolve_device(device)).eval()
    corrections = tensors.get(POSE_CORRECTIONS)
    return LoadedAvatar(model=model, kind=kind, step=int(meta["step"]), subject_dir=subject_dir,
                        resolution=_resolution(data, subject_dir), config=data,
                        pose_corrections=None if corrections is None else corrections.float())


def _resolution(config: dict[str, Any], subject_dir: Optional[Path]) -> int:
    stored = config.get("resolution")
    if isinstance(stored, int) and not isinstance(stored, bool) and stored > 0:
        return stored
    if subject_dir is None:
        raise AvatarError("the run's config.json names no training resolution; train the run again.")
    return int(read_manifest(subject_dir).size)
