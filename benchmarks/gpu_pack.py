"""Carry a preprocessed subject to a lent GPU machine and its trained run back: how the H200 figures
of benchmarks/RESULTS.md ("The GPU check") were made, as commands.

That machine has no mediapipe and no ffmpeg, cannot download, and takes a small working tree
(64 MiB here) and returns at most 8 files of 16 MB. So the subject travels without its JPEG
frames (they travel as one near-lossless x264 4:4:4 video, a sixth of the size, and are written
back as JPEG 95 4:4:4 as ``avatar preprocess`` writes them: 47-52 dB from the originals on the 50 s
clip), with mediapipe's face-mesh edge list (which the Gaussian model's initialisation reads)
written out as a stand-in ``mediapipe`` package; the trained checkpoint comes back in pieces.

Here (the folder is ignored by git and named in the device call's ``carry``)::

    echo /.gpu/ >> .git/info/exclude
    python benchmarks/gpu_pack.py pack SUBJECT .gpu

There (one call)::

    export PYTHONPATH=$PWD:$PWD/.gpu/site; python3 benchmarks/gpu_pack.py unpack .gpu && \\
      GPU_CHECK_LIMIT_S=550 bash benchmarks/gpu.sh $OUT/gpu.json --subject .gpu/subject --gaussian-seconds 270 \\
      --skip ngp_train --work /tmp/gw; python3 benchmarks/gpu_pack.py fetch /tmp/gw/gaussian-run $OUT

gsplat, the Gaussian rasterizer's fast path, is not on that machine either. Its wheel is pure
Python with the CUDA sources inside, compiled on first use with ninja; both wheels can travel
with gsplat's pure-Python dependencies (here: ``pip download gsplat ninja jaxtyping wadler-lindig rich
markdown-it-py mdurl pygments --no-deps -d WHEELS``, 8 MB, then ``pack ... --wheels WHEELS``):
``unpack`` installs them into ``.gpu/site`` and ninja's program into ``.gpu/bin``. There, also
``export PATH=$PWD/.gpu/bin:$PATH MAX_JOBS=16`` before ``gpu.sh``: its ``build`` part then compiles
gsplat's kernels (gsplat says it may take a few minutes) and records how long it took, and every
later part renders with gsplat, or with the PyTorch rasterizer and a warning saying why if the
build failed. Not yet tried on a GPU: whether gsplat 1.5.3 builds against that machine's CUDA 13.

Back here, with the returned files in FILES::

    python benchmarks/gpu_pack.py join FILES RUN && avatar eval RUN --subject SUBJECT
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SUBJECT_FILES = ("subject.json", "audio.wav", "background.png", "neck_plate.png", "tracks.npz")
"""What training reads from a subject besides its frames and masks (``.work``, ``.cache`` and
``report`` stay behind)."""

PIECE_BYTES = 15_000_000
"""Size of the pieces a checkpoint returns in (the machine returns files of at most 16 MB)."""

MOST_BYTES = 58_000_000
"""A checkpoint larger than this returns without its optimizer state (evaluation needs none)."""


def pack(subject: Path, out: Path, crf: int, wheels: Path | None = None) -> None:
    """Write ``out``: the subject without frames, its frames as a video, the mediapipe stand-in,
    and the ``*.whl`` files of ``wheels`` (installed by :func:`unpack`)."""
    import imageio_ffmpeg

    if not (subject / "subject.json").is_file():
        sys.exit(f"{subject} is not a preprocessed subject (no subject.json)")
    target = out / "subject"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in SUBJECT_FILES:
        if (subject / name).is_file():
            shutil.copy2(subject / name, target / name)
    shutil.copytree(subject / "masks", target / "masks")
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-framerate", "25", "-i",
                    str(subject / "frames" / "%06d.jpg"), "-c:v", "libx264", "-preset", "medium", "-crf", str(crf),
                    "-pix_fmt", "yuv444p", str(out / "frames.mp4")], check=True)
    _write_mediapipe_stand_in(out / "site")
    if wheels is not None:
        found = sorted(wheels.glob("*.whl"))
        if not found:
            sys.exit(f"{wheels} holds no .whl file")
        (out / "wheels").mkdir(exist_ok=True)
        for wheel in found:
            shutil.copy2(wheel, out / "wheels" / wheel.name)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(json.dumps({"packed": str(out), "bytes": size, "frames_video_bytes": (out / "frames.mp4").stat().st_size}))


def _write_mediapipe_stand_in(site: Path) -> None:
    """A package ``mediapipe`` holding only ``python.solutions.face_mesh_connections.FACEMESH_TESSELATION``,
    the edge list read from the mediapipe installed here."""
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_TESSELATION

    package = site / "mediapipe" / "python" / "solutions"
    package.mkdir(parents=True, exist_ok=True)
    for folder in (site / "mediapipe", site / "mediapipe" / "python", package):
        (folder / "__init__.py").write_text('"""Stand-in for mediapipe on a machine without it (benchmarks/gpu_pack.py)."""\n')
    edges = ",\n    ".join(f"({a}, {b})" for a, b in sorted(FACEMESH_TESSELATION))
    (package / "face_mesh_connections.py").write_text(
        '"""The face mesh\'s edge list, written by benchmarks/gpu_pack.py from the installed mediapipe."""\n\n'
        f"FACEMESH_TESSELATION = frozenset([\n    {edges},\n])\n")


def install_wheels(wheels: Path, site: Path, bin_dir: Path) -> list[str]:
    """Unzip each wheel of ``wheels`` into ``site`` (what pip does for a pure-Python wheel), its
    ``*.data/scripts/`` programs into ``bin_dir`` with their permissions; returns the wheels' names.

    Without pip or a network on the GPU machine this is the whole install; a wheel's compiled
    parts (gsplat's CUDA) are built there on first use.
    """
    import zipfile

    names = []
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                parts = Path(info.filename).parts
                if len(parts) == 3 and parts[0].endswith(".data") and parts[1] == "scripts":
                    target = bin_dir / parts[2]
                elif parts[0].endswith(".data"):
                    continue  # headers and data files: nothing gsplat or ninja needs
                else:
                    target = site / info.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(info))
                mode = (info.external_attr >> 16) & 0o777
                if mode:
                    target.chmod(mode)
        names.append(wheel.name)
    return names


def unpack(folder: Path) -> None:
    """Write ``folder/subject/frames/%06d.jpg`` from ``folder/frames.mp4`` (needs only OpenCV), and
    install the carried wheels (``folder/wheels``) into ``folder/site`` and ``folder/bin``."""
    if (folder / "wheels").is_dir():
        print(json.dumps({"installed": install_wheels(folder / "wheels", folder / "site", folder / "bin")}))
    import cv2

    from avatar.preprocess.track import JPEG_PARAMS  # the frames as avatar preprocess writes them

    frames = folder / "subject" / "frames"
    frames.mkdir(parents=True, exist_ok=True)
    video = cv2.VideoCapture(str(folder / "frames.mp4"))
    n = 0
    with ThreadPoolExecutor(8) as pool:
        writes = []
        while True:
            ok, frame = video.read()
            if not ok:
                break
            writes.append(pool.submit(cv2.imwrite, str(frames / f"{n:06d}.jpg"), frame, JPEG_PARAMS))
            n += 1
        if not all(w.result() for w in writes):
            sys.exit("could not write every frame")
    expected = json.loads((folder / "subject" / "subject.json").read_text())["n_frames"]
    if n != expected:
        sys.exit(f"the video held {n} frames, the subject {expected}")
    print(json.dumps({"unpacked_frames": n}))


def fetch(run: Path, out: Path) -> None:
    """Put the run's config and newest checkpoint into ``out``: 2 files and the tensors in pieces."""
    checkpoints = sorted((run / "checkpoints").glob("step_*.json"))
    if not checkpoints:
        sys.exit(f"{run} holds no checkpoint")
    meta_path = checkpoints[-1]
    tensors = meta_path.with_suffix(".safetensors")
    meta = json.loads(meta_path.read_text())
    if tensors.stat().st_size > MOST_BYTES:
        tensors, meta = _without_optimizer(tensors, meta, Path(tempfile.mkdtemp()) / "stripped.safetensors")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(run / "config.json", out / "run_config.json")
    (out / meta_path.name).write_text(json.dumps(meta, indent=1))
    with open(tensors, "rb") as src:
        for k, piece in enumerate(iter(lambda: src.read(PIECE_BYTES), b"")):
            (out / f"{meta_path.stem}.st.part{k:02d}").write_bytes(piece)
    if tensors.name == "stripped.safetensors":
        shutil.rmtree(tensors.parent)
    print(json.dumps({"fetched": meta_path.stem, "bytes": meta["size"]}))


def _without_optimizer(tensors: Path, meta: dict, dst: Path) -> tuple[Path, dict]:
    """The checkpoint's tensors without ``optim/...``; its JSON's size and sha256 updated."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tensors), "pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("optim/")}
        header = f.metadata()
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(kept, str(dst), metadata=header)
    return dst, dict(meta, size=dst.stat().st_size, sha256=hashlib.sha256(dst.read_bytes()).hexdigest())


def join(files: Path, run: Path) -> None:
    """Rebuild a run directory from the files ``fetch`` wrote (evaluate it with ``--subject``)."""
    metas = sorted(p for p in files.glob("step_*.json"))
    if not metas:
        sys.exit(f"no step_*.json in {files}")
    meta_path = metas[-1]
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy2(files / "run_config.json", run / "config.json")
    shutil.copy2(meta_path, run / "checkpoints" / meta_path.name)
    with open(run / "checkpoints" / f"{meta_path.stem}.safetensors", "wb") as dst:
        for piece in sorted(files.glob(f"{meta_path.stem}.st.part*")):
            dst.write(piece.read_bytes())
    print(json.dumps({"run": str(run), "checkpoint": meta_path.stem}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="here: SUBJECT -> OUT (subject without frames, frames video, stand-in)")
    p.add_argument("subject", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--crf", type=int, default=10, help="x264 quality of the frames video (default 10)")
    p.add_argument("--wheels", type=Path, default=None, help="a folder of wheels to carry (gsplat, ninja)")
    p = sub.add_parser("unpack", help="there: FOLDER/frames.mp4 -> FOLDER/subject/frames")
    p.add_argument("folder", type=Path)
    p = sub.add_parser("fetch", help="there: RUN's config and newest checkpoint -> OUT in pieces")
    p.add_argument("run", type=Path)
    p.add_argument("out", type=Path)
    p = sub.add_parser("join", help="here: the fetched FILES -> RUN directory")
    p.add_argument("files", type=Path)
    p.add_argument("run", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.subject, args.out, args.crf, args.wheels)
    elif args.command == "unpack":
        unpack(args.folder)
    elif args.command == "fetch":
        fetch(args.run, args.out)
    else:
        join(args.files, args.run)


if __name__ == "__main__":
    main()
