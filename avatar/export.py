"""Export the canonical Gaussians in the standard 3D Gaussian splatting .ply layout.

The layout common splat viewers read: binary little-endian float32 vertices with ``x y z``,
``nx ny nz`` (zeros), ``f_dc_0..2`` (SH DC), ``f_rest_*`` (higher SH bands, channel-major),
``opacity`` (logit), ``scale_0..2`` (log), ``rot_0..3`` (w, x, y, z). Face and mouth-interior
Gaussians are written together, undeformed (the avatar's neutral, canonical head).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from avatar.atomic import atomic_output, check_output_dir, clean_stale, refuse_overwrite
from avatar.errors import InputError
from avatar.run import RunPaths, load_avatar


def ply_fields(n_sh: int) -> list[str]:
    rest = [f"f_rest_{i}" for i in range(3 * (n_sh - 1))]
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", *rest, "opacity",
             "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def write_ply(path: Path | str, means: np.ndarray, sh: np.ndarray, opacity_logits: np.ndarray,
              log_scales: np.ndarray, quats: np.ndarray) -> Path:
    """Write Gaussians (means [N,3], sh [N,K,3], opacity logits [N], log scales [N,3], quats [N,4])."""
    n, k = sh.shape[:2]
    rest = sh[:, 1:].transpose(0, 2, 1).reshape(n, -1)  # channel-major, as 3DGS stores f_rest
    columns = np.concatenate([
        means, np.zeros((n, 3)), sh[:, 0], rest, opacity_logits[:, None], log_scales, quats,
    ], axis=1).astype("<f4")
    fields = ply_fields(k)
    header = "ply\nformat binary_little_endian 1.0\n" f"element vertex {n}\n"
    header += "".join(f"property float {f}\n" for f in fields) + "end_header\n"
    with atomic_output(Path(path)) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(header.encode("ascii"))
            fh.write(columns.tobytes())
    return Path(path)


def read_ply(path: Path | str) -> dict[str, np.ndarray]:
    """Read a binary little-endian float32 vertex .ply into {property name: [N] array}."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    if "format binary_little_endian 1.0" not in header:
        raise ValueError(f"{path}: only binary little-endian .ply files are read")
    n = next(int(line.split()[2]) for line in header if line.startswith("element vertex"))
    names = [line.split()[2] for line in header if line.startswith("property float")]
    table = np.frombuffer(data[end:end + n * len(names) * 4], dtype="<f4").reshape(n, len(names))
    return {name: table[:, i] for i, name in enumerate(names)}


def export_run(run_dir: Path | str, output: Path | str, step: Optional[int] = None) -> tuple[Path, int]:
    """Write the run's canonical Gaussians (of checkpoint ``step``, default the newest complete
    one) to ``output`` (.ply); returns (path, count).

    Raises:
        AvatarError: not a run, a bad output name or place, or a model kind without Gaussians.
    """
    output = Path(output)
    if output.suffix.lower() != ".ply":
        raise InputError(f"{output} should end in .ply.")
    check_output_dir(output)
    refuse_overwrite(output, *RunPaths(run_dir).inputs())
    avatar = load_avatar(run_dir, "cpu", step=step, need_subject=False)
    clean_stale(output.parent)
    arrays = avatar.model.canonical_gaussians()
    if arrays is None:
        raise InputError(f"{run_dir} is a {avatar.kind} avatar, which has no Gaussians to export.")
    write_ply(output, **arrays)
    return output, len(arrays["means"])
