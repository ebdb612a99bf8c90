"""How much of a run's validation error is head-pose error? A diagnosis, not a metric.

For each frame of a split, a small rigid correction of the tracked camera (rotation vector and
translation, in the camera frame) is fitted to that frame's ground truth by gradient descent
with the trained model frozen, and the PSNR before and after is printed. The corrected PSNR uses
the ground truth it is scored against, so it is an upper bound of what better tracking could
give, never a figure to report as quality.

    python benchmarks/pose_oracle.py RUN [--split val] [--every 1] [--steps 60]

Prints one JSON object: PSNR before/after (pooled MSE over the frames) and per-frame corrections.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch


def correct_pose(model, data, index: int, steps: int, lr: float = 2e-3) -> dict:
    """Fit a rigid camera correction of frame ``index``; MSE before and after, and the correction."""
    from avatar.preprocess.face_model import so3_exp

    frame = data.frame(index)
    r = data.resolution
    with torch.no_grad():
        cond = model.conditions(data.audio_features, torch.tensor([index], device=data.device),
                                frame.motion[None], smooth=True)[0]
    rot = torch.zeros(3, requires_grad=True)
    shift = torch.zeros(3, requires_grad=True)
    opt = torch.optim.Adam([rot, shift], lr=lr)

    def render() -> torch.Tensor:
        correction = torch.eye(4)
        correction[:3, :3] = so3_exp(rot)
        correction[:3, 3] = shift
        return model.render(cond, correction @ frame.viewmat, frame.K, r, r, frame.background)["rgb"]

    def mse() -> float:
        with torch.no_grad():
            return float((render().clamp(0, 1) - frame.image).square().mean())

    before = mse()
    for _ in range(steps):
        loss = (render() - frame.image).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"frame": index, "mse_before": before, "mse_after": mse(),
            "rotation_deg": (rot.detach() * 180 / math.pi).tolist(), "translation": shift.detach().tolist()}


def main() -> None:
    from avatar.run import load_avatar
    from avatar.subject_data import SubjectData

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--split", default="val", choices=("train", "val", "all"))
    parser.add_argument("--every", type=int, default=1, help="Use every N-th frame of the split.")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    avatar = load_avatar(args.run, "cpu")
    model, step = avatar.model, avatar.step
    for p in model.parameters():
        p.requires_grad_(False)
    data = SubjectData(avatar.subject_dir, avatar.resolution, model.motion_features, "cpu")
    frames = [correct_pose(model, data, int(i), args.steps) for i in data.split(args.split)[::args.every]]

    def pooled_psnr(key: str) -> float:
        return float(-10 * np.log10(np.mean([f[key] for f in frames])))

    print(json.dumps({
        "run": args.run, "step": step, "split": args.split, "n_frames": len(frames),
        "psnr_tracked_pose": round(pooled_psnr("mse_before"), 3),
        "psnr_corrected_pose": round(pooled_psnr("mse_after"), 3),
        "max_rotation_deg": round(max(float(np.linalg.norm(f["rotation_deg"])) for f in frames), 3),
        "frames": frames,
    }, indent=2))


if __name__ == "__main__":
    main()
