"""The run directory and its checkpoints (safetensors + JSON; loading never executes code).

Layout::

    RUN/
      config.json                     everything needed to rebuild the model and continue training
      checkpoints/step_000500.safetensors + step_000500.json   (tensors + what is not a tensor)
      tb/                             TensorBoard logs
      metrics.json                    validation metrics at the end of training
      previews/                       GT | render | error images

A checkpoint holds the model, the optimizers' moments, the densification state and the random
generators, so that ``--resume`` continues exactly where training stopped.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from avatar.errors import InputError
from avatar.atomic import write_json_atomic

CHECKPOINT_VERSION = 1


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

    def latest_checkpoint(self) -> Optional[int]:
        """Step of the newest complete checkpoint (both files present), or None."""
        steps = []
        for p in self.checkpoints.glob("step_*.json"):
            m = re.fullmatch(r"step_(\d+)\.json", p.name)
            if m and p.with_suffix(".safetensors").is_file():
                steps.append(int(m.group(1)))
        return max(steps) if steps else None


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
    """Write ``step_N.safetensors`` and ``step_N.json`` atomically; keep the newest ``keep``."""
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_meta = {}
    for name, opt in optimizers.items():
        t, meta = _flatten_optimizer(f"optim/{name}", opt)
        tensors.update(t)
        opt_meta[name] = meta
    tensors.update({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()})
    st_path, json_path = paths.checkpoint(step)
    tmp_st = st_path.with_name(st_path.name + ".partial")
    save_file(tensors, str(tmp_st))
    os.replace(tmp_st, st_path)
    meta = {"version": CHECKPOINT_VERSION, "step": step, "optimizers": opt_meta, **extra_json}
    write_json_atomic(json_path, json.dumps(meta, indent=1))  # lands last: marks the checkpoint complete
    steps = sorted(int(p.stem.split("_")[1]) for p in paths.checkpoints.glob("step_*.json"))
    for old in steps[:-keep]:
        for p in paths.checkpoint(old):
            p.unlink(missing_ok=True)
    return st_path


def load_checkpoint(paths: RunPaths, step: Optional[int] = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and JSON of a checkpoint (the newest when ``step`` is None).

    Raises:
        InputError: no complete checkpoint, or one written by an incompatible version.
    """
    step = paths.latest_checkpoint() if step is None else step
    if step is None:
        raise InputError(f"{paths.root} has no checkpoint; train it with `avatar train SUBJECT -o {paths.root}`.")
    st_path, json_path = paths.checkpoint(step)
    try:
        meta = json.loads(json_path.read_text())
        tensors = load_file(str(st_path))
    except (OSError, ValueError, SafetensorError) as err:
        raise InputError(f"{st_path} is unreadable ({err}); resume from another checkpoint or train again.") from None
    if meta.get("version") != CHECKPOINT_VERSION:
        raise InputError(
            f"{st_path} was written by checkpoint format {meta.get('version')}, this avatar reads "
            f"{CHECKPOINT_VERSION}; train the run again."
        )
    return tensors, meta


def model_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}


def optimizer_state(name: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    return _unflatten_optimizer(f"optim/{name}", tensors, meta["optimizers"][name])
