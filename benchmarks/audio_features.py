"""Speed of the speech features: seconds of compute per second of audio, per kind. Prints JSON.

Input: ../shared/data/real/musetalk_eng_60s.wav when it is there (60 s of English speech), else
60 s of synthetic vowels. Each kind runs once cold (for whisper: loading the model included),
then ``--repeats`` times warm; the warm median is the figure. ``realtime_factor`` is seconds of
audio per second of compute. The load average is printed too: the CPU may be shared.

Usage: python benchmarks/audio_features.py [--kinds mel whisper] [--threads N] [--repeats 3] [--wav FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import print_report

ROOT = Path(__file__).resolve().parents[1]
SHARED_WAV = ROOT.parent / "shared" / "data" / "real" / "musetalk_eng_60s.wav"
FPS = 25.0


def synthetic_speech(seconds: float) -> np.ndarray:
    sys.path.insert(0, str(ROOT))
    from tests.audio.test_whisper import vowels

    return vowels(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=["mel", "whisper"])
    parser.add_argument("--threads", type=int, default=None, help="torch and ctranslate2 threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wav", type=Path, default=None)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()

    from avatar.audio import compute_audio_features, parse_audio_feature_spec
    from avatar.media import AUDIO_RATE, read_wav

    if args.threads:
        torch.set_num_threads(args.threads)
    wav = args.wav or (SHARED_WAV if SHARED_WAV.exists() else None)
    if wav is not None:
        samples, rate = read_wav(wav)
        assert rate == AUDIO_RATE, rate
        samples = samples[: int(args.seconds * AUDIO_RATE)]
        source = str(wav)
    else:
        samples = synthetic_speech(args.seconds)
        source = "synthetic vowels"
    seconds = samples.size / AUDIO_RATE
    n_frames = int(seconds * FPS)

    results = []
    for kind in args.kinds:
        config = parse_audio_feature_spec(kind)
        times = []
        for _ in range(1 + args.repeats):
            t0 = time.perf_counter()
            feats = compute_audio_features(samples, n_frames, FPS, config)
            times.append(time.perf_counter() - t0)
        warm = statistics.median(times[1:]) if args.repeats else times[0]
        results.append({
            "kind": kind,
            "input": source,
            "audio_seconds": round(seconds, 2),
            "shape": list(feats.shape),
            "threads": torch.get_num_threads(),
            "cold_seconds": round(times[0], 3),
            "warm_seconds": [round(t, 3) for t in times[1:]],
            "compute_s_per_audio_s": round(warm / seconds, 4),
            "realtime_factor": round(seconds / warm, 1),
            "load_average_1min": round(os.getloadavg()[0], 2),
        })
        print(f"{kind}: {warm:.2f} s for {seconds:.0f} s of audio", file=sys.stderr)
    print_report("audio_features", results)


if __name__ == "__main__":
    main()
