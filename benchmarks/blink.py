"""Can a trained avatar close its eyes? Prints JSON.

Usage: python benchmarks/blink.py RUN [RUN ...] [--frames N]

For up to N val frames of each run's subject where the tracked eyes are closed (both blink
tracks above 0.8), the avatar renders that frame twice, with its own audio, pose and other
tracks but both blink tracks at 0 (open) and at 1 (closed); ``render_change`` is the mean
absolute change of the render over the box around both eyes (0..1 per channel). ``real_change``
is the same measure between the real blink frame and the nearest val frame with open eyes (it also
holds whatever else moved between the two frames, so it bounds what a blink should change). An
avatar that ignores its blink tracks scores near 0. A subject without a val blink frame is reported
with ``n_frames`` 0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from _common import print_report


def blink_change(run: Path, max_frames: int) -> dict:
    import torch

    from avatar import topology
    from avatar.models import FrameCondition
    from avatar.models.talking_head import BLINK_NAMES
    from avatar.run import load_avatar
    from avatar.speak import SpeechDriver
    from avatar.subject_data import SubjectData

    avatar = load_avatar(run, "cpu")
    size = avatar.resolution
    data = SubjectData(avatar.subject_dir, size, avatar.model.motion_features, torch.device("cpu"))
    names = list(avatar.model.motion_features)
    if not all(b in names for b in BLINK_NAMES):
        return {"run": str(run), "n_frames": 0, "note": "the run is not conditioned on blinks"}
    columns = [names.index(b) for b in BLINK_NAMES]
    blink = data.motion[:, columns].mean(dim=1).cpu().numpy()
    val = data.split("val")
    closed, opened = val[blink[val] > 0.8][:max_frames], val[blink[val] < 0.05]
    driver = SpeechDriver(avatar.model, data)
    renders, reals = [], []
    for i in closed:
        if not len(opened):
            break
        lm = data.subject.tracks["landmarks"][i][:, :2] * (size / data.subject.manifest.size)
        eyes = lm[list(topology.LEFT_EYE) + list(topology.RIGHT_EYE)]
        (x0, y0), (x1, y1) = np.floor(eyes.min(0)).astype(int) - 2, np.ceil(eyes.max(0)).astype(int) + 2
        cond, frame = driver.subject_condition([int(i)]), data.frame(int(i))
        images = []
        for value in (0.0, 1.0):
            motion = cond.motion[0].clone()
            motion[columns] = value
            with torch.no_grad():
                out = avatar.model.render(FrameCondition(cond.audio[0], motion), frame.viewmat, frame.K, size, size)
            images.append(out["rgb"].cpu().numpy())
        renders.append(float(np.abs(images[1] - images[0])[y0:y1, x0:x1].mean()))
        j = int(opened[np.argmin(np.abs(opened - i))])
        real = np.abs(frame.image.cpu().numpy() - data.frame(j).image.cpu().numpy())
        reals.append(float(real[y0:y1, x0:x1].mean()))
    return {"run": str(run), "n_frames": len(renders), "frames": [int(i) for i in closed[:len(renders)]],
            "render_change": round(float(np.mean(renders)), 4) if renders else None,
            "real_change": round(float(np.mean(reals)), 4) if reals else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--frames", type=int, default=4, help="val blink frames per run (default 4)")
    args = parser.parse_args()
    print_report("blink", [blink_change(run, args.frames) for run in args.runs])


if __name__ == "__main__":
    main()
