"""The ``avatar`` command line: parses arguments, calls one library function, prints results.

Errors a user can fix (:class:`avatar.errors.AvatarError`) become one sentence and exit code 1.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from pathlib import Path

import click

from avatar import __version__
from avatar.errors import AvatarError
from avatar.progress import ConsoleProgress


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Our own warnings (two faces found, audio padded...) are always shown.
    logging.getLogger("avatar").setLevel(min(level, logging.INFO if verbose > 0 else logging.WARNING))
    # imageio-ffmpeg warns whenever ffmpeg's output size differs from the source: that is our intent.
    logging.getLogger("imageio_ffmpeg").setLevel(logging.ERROR)


_NATIVE_NOISE = re.compile(
    rb"^(?:[WI]\d{4} |INFO: Created TensorFlow Lite|WARNING: All log messages before absl)"
)


def _filter_native_stderr() -> None:
    """Drop the info/warning lines mediapipe's C++ code writes straight to file descriptor 2.

    Python's own stderr keeps the real terminal; only native writes go through a pipe whose
    reader forwards everything but those log lines (errors and fatal messages pass).
    """
    try:
        sys.stderr.flush()
        real = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
    except OSError:
        return
    sys.stderr = os.fdopen(os.dup(real), "w", buffering=1, encoding="utf-8", errors="replace")

    def pump() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not _NATIVE_NOISE.match(line):
                    os.write(real, line)

    threading.Thread(target=pump, daemon=True, name="native-stderr-filter").start()


class _Group(click.Group):
    """Turns user-caused errors into one line and a non-zero exit instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AvatarError as err:
            click.echo(f"Error: {err}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="avatar")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Photoreal 3D talking-head avatars from a few minutes of video."""
    if verbose < 2 and "PYTEST_CURRENT_TEST" not in os.environ:
        _filter_native_stderr()
    _setup_logging(verbose)


@main.command()
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Directory to write sample.mp4, sample.wav and sample_truth.npz.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the utterance; another seed gives new speech (e.g. for rendering).")
@click.option("--duration", type=float, default=24.0, show_default=True, help="Length in seconds.")
def sample(out_dir: Path, seed: int, duration: float) -> None:
    """Write the synthetic talking-head sample (video, audio, ground truth) into a directory."""
    from avatar.sample import SampleConfig, make_sample

    progress = ConsoleProgress()
    paths = make_sample(out_dir, SampleConfig(seed=seed, duration_s=duration), progress=progress)
    progress.close()
    click.echo(f"Wrote {paths.video}, {paths.audio} and {paths.truth}")


@main.command()
@click.argument("video", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Subject directory to write (resumed if it holds this video's subject).")
@click.option("--audio", type=click.Path(path_type=Path), default=None,
              help="Speech to use instead of the video's own audio track.")
@click.option("--size", type=int, default=512, show_default=True, help="Side of the square crop in pixels.")
@click.option("--fps", type=float, default=25.0, show_default=True, help="Constant frame rate to resample to.")
@click.option("--audio-features", default="mel", show_default=True,
              help="mel (no weights), hubert:PATH_OR_NAME or wav2vec2:PATH_OR_NAME (local weights).")
@click.option("--device", default="cpu", show_default=True, help="Device for hubert/wav2vec2 features.")
@click.option("--force", is_flag=True, help="Replace a subject of another video in the output directory.")
def preprocess(video: Path, out_dir: Path, audio: Path | None, size: int, fps: float,
               audio_features: str, device: str, force: bool) -> None:
    """Turn a talking-head VIDEO into a tracked subject directory."""
    from avatar.preprocess.pipeline import PreprocessConfig, preprocess as run_preprocess

    try:
        config = PreprocessConfig(size=size, fps=fps, audio_features=audio_features, device=device)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    progress = ConsoleProgress()
    try:
        summary = run_preprocess(video, out_dir, config, audio=audio, force=force, progress=progress)
    finally:
        progress.close()
    skipped = f" (cached: {', '.join(summary.skipped)})" if summary.skipped else ""
    click.echo(
        f"Subject written to {summary.subject_dir}: {summary.n_frames} frames, "
        f"{summary.valid_share:.1%} tracked, reprojection error {summary.reprojection_error_px:.2f} px, "
        f"{summary.seconds:.1f} s ({summary.frames_per_second:.1f} frames/s){skipped}."
    )
    for warning in summary.warnings:
        click.echo(f"Warning: {warning}")
    click.echo(f"Check the tracking: {summary.subject_dir / 'report'}")


@main.command()
@click.argument("subject", type=click.Path(path_type=Path))
@click.option("-o", "--output", "run_dir", type=click.Path(path_type=Path), required=True,
              help="Run directory to write (checkpoints, logs, previews, metrics).")
@click.option("--model", type=click.Choice(["gaussian"]), default="gaussian", show_default=True,
              help="Avatar model.")
@click.option("--preset", type=click.Choice(["fast", "default", "best"]), default="fast", show_default=True,
              help="fast: CPU, 256 px, minutes. default/best: GPU, 512 px.")
@click.option("--iters", type=int, default=None, help="Training iterations (overrides the preset).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--resume", is_flag=True, help="Continue the run in the output directory from its newest checkpoint.")
@click.option("--no-eval", is_flag=True, help="Skip the validation metrics at the end.")
def train(subject: Path, run_dir: Path, model: str, preset: str, iters: int | None, device: str,
          resume: bool, no_eval: bool) -> None:
    """Train a talking-head avatar on a preprocessed SUBJECT."""
    from avatar.train.trainer import train as run_train

    overrides = {"iterations": iters} if iters is not None else None
    progress = ConsoleProgress()
    try:
        result = run_train(subject, run_dir, preset=preset, overrides=overrides, device=device,
                           resume=resume, evaluate=not no_eval, progress=progress)
    finally:
        progress.close()
    click.echo(f"Trained {result.steps} steps in {result.seconds / 60:.1f} min: {result.n_gaussians} Gaussians, "
               f"train PSNR {result.last_psnr:.2f} dB. Run: {result.run_dir}")
    m = result.metrics
    if m:
        parts = [f"PSNR {m['psnr']:.2f} dB"]
        if m.get("psnr_head") is not None:
            parts.append(f"head PSNR {m['psnr_head']:.2f} dB")
        parts.append(f"SSIM {m['ssim']:.3f}")
        if m.get("lmd") is not None:
            parts.append(f"LMD {m['lmd']:.2f} px")
        click.echo(f"Validation ({m['n_frames']} frames): " + ", ".join(parts))


def entrypoint() -> None:  # pragma: no cover - console script shim
    main()


if __name__ == "__main__":  # pragma: no cover
    main()
