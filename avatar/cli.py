"""The ``avatar`` command line: parses arguments, calls one library function, prints results.

Errors a user can fix (:class:`avatar.errors.AvatarError`) become one sentence and exit code 1, and
so do the file system's refusals (a read-only directory, a full disk); numbers out of range are
refused by the options themselves (exit code 2).
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
        except OSError as err:  # read-only directory, full disk, a file vanishing under us
            where = f" {err.filename}" if err.filename else ""
            click.echo(f"Error: the file system refused{where} ({err.strerror or err}); check the path, its "
                       "permissions and the free space.", err=True)
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


SUBJECT_OPTION = click.option(
    "--subject", type=click.Path(path_type=Path), default=None,
    help="The run's subject directory, when it has moved since training.")
STEP_OPTION = click.option(
    "--step", type=click.IntRange(min=0), default=None,
    help="Use the checkpoint of this step [default: the newest complete one].")
SIZE = click.IntRange(16, 4096)
"""Rendered sizes: below 16 pixels there is no face to see, above 4096 a frame alone outgrows memory."""


@main.command()
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Directory to write sample.mp4, sample.wav and sample_truth.npz.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Seed of the utterance; another seed gives new speech (e.g. for rendering).")
@click.option("--duration", type=click.FloatRange(1.0, 3600.0), default=24.0, show_default=True,
              help="Length in seconds.")
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
@click.option("--size", type=click.IntRange(min=64), default=512, show_default=True,
              help="Side of the square crop in pixels (even).")
@click.option("--fps", type=click.FloatRange(1.0, 120.0), default=25.0, show_default=True,
              help="Constant frame rate to resample to.")
@click.option("--audio-features", default="whisper", show_default=True,
              help="mel (log-mel, no weights), whisper (the Whisper tiny.en encoder installed with avatar; "
                   "whisper:PATH another CTranslate2 Whisper), hubert:PATH_OR_NAME or wav2vec2:PATH_OR_NAME "
                   "(local weights).")
@click.option("--device", default="cpu", show_default=True, help="Device for whisper/hubert/wav2vec2 features.")
@click.option("--force", is_flag=True, help="Replace a subject of another video in the output directory.")
def preprocess(video: Path, out_dir: Path, audio: Path | None, size: int, fps: float,
               audio_features: str, device: str, force: bool) -> None:
    """Turn a talking-head VIDEO into a tracked subject directory."""
    from avatar.preprocess.pipeline import PreprocessConfig
    from avatar.preprocess.pipeline import preprocess as run_preprocess

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
@click.option("--model", type=click.Choice(["gaussian", "ngp"]), default="gaussian", show_default=True,
              help="Avatar kind: gaussian (3D Gaussians, fast to render) or ngp (a radiance field on hash grids).")
@click.option("--preset", type=click.Choice(["fast", "default", "best"]), default="fast", show_default=True,
              help="fast: CPU, 256 px, minutes. default/best: GPU, 512 px.")
@click.option("--iters", type=click.IntRange(min=1), default=None, help="Training iterations (overrides the preset).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--resume", is_flag=True,
              help="Continue the run in the output directory from its newest complete checkpoint (step 0 if none).")
@click.option("--force", is_flag=True, help="Replace the run in the output directory (only a run).")
@click.option("--no-eval", is_flag=True, help="Skip the validation metrics at the end.")
@click.option("--set", "assignments", multiple=True, metavar="NAME=VALUE",
              help="Change one option of RUN/config.json over the preset, e.g. --set loss.mouth=2.0 "
                   "(repeatable; VALUE is JSON or a plain string).")
def train(subject: Path, run_dir: Path, model: str, preset: str, iters: int | None, device: str,
          resume: bool, force: bool, no_eval: bool, assignments: tuple[str, ...]) -> None:
    """Train a talking-head avatar on a preprocessed SUBJECT."""
    from avatar.configs import parse_assignments
    from avatar.eval import evaluate_run
    from avatar.run import RunPaths
    from avatar.train import train as run_train

    try:
        overrides = parse_assignments(assignments)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--set") from None
    if iters is not None:
        overrides["iterations"] = iters
    if resume and force:
        raise click.UsageError("--resume continues a run and --force replaces it; pass only one of them.")
    progress = ConsoleProgress()
    try:
        result = run_train(subject, run_dir, preset=preset, overrides=overrides or None, device=device,
                           resume=resume, progress=progress, force=force, model=model)
        m = None if no_eval else evaluate_run(run_dir, "val", RunPaths(run_dir).metrics, device=device,
                                               progress=progress, extra={**result.summary(), "preset": preset})
    finally:
        progress.close()
    if result.steps == result.start_step:
        click.echo(f"{result.run_dir} is already trained to step {result.steps}; raise --iters to train it further.")
    else:
        size = "" if result.n_gaussians is None else f"{result.n_gaussians} Gaussians, "
        click.echo(f"Trained {result.steps} steps in {result.seconds / 60:.1f} min: {size}"
                   f"train PSNR {result.last_psnr:.2f} dB. Run: {result.run_dir}")
    if m:
        click.echo(f"Validation ({m['n_frames']} frames): {_validation_summary(m)}")


def _validation_summary(m: dict) -> str:
    """One line of the val metrics, each PSNR named by what it was measured on."""
    parts = [f"PSNR {m['psnr']:.2f} dB (face pasted into the frame; whole head {m['psnr_frame']:.2f} into the "
             f"frame, {m['psnr_plate']:.2f} over the plate)"]
    if m.get("psnr_head") is not None:
        head = f"head PSNR {m['psnr_head']:.2f} dB"
        tracked = m.get("psnr_head_tracked")
        if tracked is not None and abs(tracked - m["psnr_head"]) >= 0.005:
            head += f" ({tracked:.2f} at the tracked poses)"
        parts.append(head)
    parts.append(f"SSIM {m['ssim']:.3f}")
    if m.get("lmd") is not None:
        parts.append(f"LMD {m['lmd']:.2f} px")
    return ", ".join(parts)


@main.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--audio", "speech", type=click.Path(path_type=Path), required=True,
              help="Speech to say: any audio or video file ffmpeg reads.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output .mp4.")
@click.option("--pose", default="loop", show_default=True, help="loop, static, static:N or a pose .npz.")
@click.option("--blink", default="auto", show_default=True, help="auto, none or a per-frame blink file.")
@click.option("--background", type=click.Choice(["face", "frame", "plate"]), default="face", show_default=True,
              help="face: the rendered face pasted into each subject frame (its hair and background kept); frame: the "
                   "whole rendered head over the frame's own pixels; plate: the whole head over its torso and the "
                   "background plate.")
@click.option("--size", type=SIZE, default=None,
              help="Output resolution (even; an odd one is rounded up) [default: the training one].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Frames deformed together.")
@SUBJECT_OPTION
@STEP_OPTION
def render(run_dir: Path, speech: Path, output: Path, pose: str, blink: str, background: str, size: int | None,
           device: str, batch: int, subject: Path | None, step: int | None) -> None:
    """Render the avatar of RUN saying new speech into an mp4."""
    from avatar.speak import RenderOptions, render_speech

    progress = ConsoleProgress()
    try:
        summary = render_speech(run_dir, speech, output, RenderOptions(
            pose=pose, blink=blink, background=background, size=size, device=device, batch=batch, subject=subject,
            step=step), progress)
    finally:
        progress.close()
    click.echo(f"Wrote {summary.output}: {summary.n_frames} frames ({summary.duration_s:.1f} s) at "
               f"{summary.resolution} px, rendered at {summary.render_fps:.1f} frames/s on {summary.device}.")


@main.command(name="eval")
@click.argument("run_dir", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--split", default="val", show_default=True, help="val, train or all.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the metrics here.")
@click.option("--video", type=click.Path(path_type=Path), default=None,
              help="Side-by-side GT | render mp4 (default: RUN/eval_SPLIT.mp4).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--drive", type=click.Path(path_type=Path), multiple=True,
              help="A video of another person speaking (repeatable): the avatar says its speech and its lips are "
                   "compared with that person's (cross_mouth_corr).")
@click.option("--drive-size", type=SIZE, default=None,
              help="Side of the --drive renders [default: the training one; mediapipe finds no face at 64 px].")
@click.option("--drive-video", "drive_video", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory to write each --drive render beside the real video (drive_NAME.mp4).")
@SUBJECT_OPTION
@STEP_OPTION
def evaluate(run_dir: Path, split: str, json_path: Path | None, video: Path | None, device: str,
             drive: tuple[Path, ...], drive_size: int | None, drive_video: Path | None,
             subject: Path | None, step: int | None) -> None:
    """Re-render a split of the subject and compare with the ground truth; with --drive, also
    judge lip sync against real mouths of other speakers."""
    import json

    from avatar.eval import evaluate_run

    progress = ConsoleProgress()
    video = video or Path(run_dir) / f"eval_{split}.mp4"
    try:
        metrics = evaluate_run(run_dir, split, json_path, video, device, progress, subject=subject, step=step,
                               drive=drive, drive_size=drive_size, drive_video_dir=drive_video)
    finally:
        progress.close()
    click.echo(json.dumps(metrics, indent=2))
    click.echo(f"Side-by-side video: {video}")


@main.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output .ply.")
@STEP_OPTION
def export(run_dir: Path, output: Path, step: int | None) -> None:
    """Write the canonical Gaussians of RUN as a standard 3D Gaussian splatting .ply."""
    from avatar.export import export_run

    path, count = export_run(run_dir, output, step=step)
    click.echo(f"Wrote {count} Gaussians to {path}")


@main.command()
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), default=Path("avatar-demo"),
              show_default=True, help="Directory for everything the demo makes.")
@click.option("--iters", type=click.IntRange(min=1), default=None, help="Training iterations (default: the fast preset's).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
def demo(out_dir: Path, iters: int | None, device: str) -> None:
    """Sample -> preprocess -> train (fast) -> render new speech -> eval, on the built-in sample."""
    from avatar.demo import DemoConfig, run_demo

    progress = ConsoleProgress()
    try:
        result = run_demo(out_dir, DemoConfig(iterations=iters, device=device), progress)
    finally:
        progress.close()
    for step, seconds in result.step_seconds.items():
        click.echo(f"  {step:<10} {seconds:8.1f} s")
    m = result.metrics
    click.echo(f"The avatar saying new speech: {result.video}")
    click.echo(f"Validation metrics ({m['n_frames']} held-out frames): {_validation_summary(m)} -> {result.metrics_json}")


@main.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. 0.0.0.0 (or this machine's address) lets other machines connect: "
                   "the printed URL then carries a token every request needs.")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True, help="Port to listen on.")
@click.option("--audio", type=click.Path(path_type=Path), default=None,
              help="Speech to start with (any audio or video file); the subject's own audio is offered too.")
@click.option("--size", type=SIZE, default=None, help="Side of the rendered frames in pixels [default: training resolution].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@SUBJECT_OPTION
def view(run_dir: Path, host: str, port: int, audio: Path | None, size: int | None, device: str,
         subject: Path | None) -> None:
    """Watch and hear a trained RUN talk in the browser, with a movable camera."""
    from avatar.viewer import serve

    progress = ConsoleProgress()

    def ready(url: str) -> None:
        progress.close()
        click.echo(f"Viewer of {run_dir} at {url}  (Ctrl-C to stop)")

    try:
        serve(run_dir, host=host, port=port, audio=audio, size=size, device=device, ready=ready, progress=progress,
              subject=subject)
    finally:
        progress.close()
    click.echo("Viewer stopped.")


def entrypoint() -> None:  # pragma: no cover - console script shim
    main()


if __name__ == "__main__":  # pragma: no cover
    main()
