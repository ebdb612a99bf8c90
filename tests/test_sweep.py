"""The seed sweep's scheduling (benchmarks/sweep.py): runs that end are evaluated, runs still
training at the deadline are interrupted and evaluated, runs never started are skipped, and only
runs that trained to the end enter a variant's mean. Real trainings are replaced by tiny scripts."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def sweep():
    yield from load_benchmark("sweep")


def test_a_variant_is_a_name_and_set_options(sweep):
    assert sweep.parse_variant("l2 loss.l1=0.5 loss.l2=10") == ("l2", ["loss.l1=0.5", "loss.l2=10"])
    assert sweep.parse_variant("base") == ("base", [])
    with pytest.raises(SystemExit, match="not key=value"):
        sweep.parse_variant("bad loss.l1")
    with pytest.raises(SystemExit, match="--seeds"):
        sweep.parse_variant("bad seed=3")


def test_train_command_passes_seed_threads_and_options(sweep, tmp_path):
    job = sweep.Job("l2", 2, ["loss.l2=10"], tmp_path / "l2_s2", tmp_path / "l2_s2.log")
    args = argparse.Namespace(preset="fast", device="cuda", threads=1, iters=0)
    cmd = sweep.train_command(job, tmp_path / "subject", args)
    assert cmd[cmd.index("--device") + 1] == "cuda" and "--no-eval" in cmd
    sets = [cmd[i + 1] for i, word in enumerate(cmd) if word == "--set"]
    assert sets == ["seed=2", "threads=1", "loss.l2=10"]


def test_deadline_interrupts_and_evaluates(sweep, tmp_path, monkeypatch):
    durations = {"quick": 0.0, "slow": 60.0}  # "slow" is still training at the deadline

    def fake_train(job, subject, args):
        return [sys.executable, "-c", f"import time; time.sleep({durations[job.variant]})"]

    def fake_eval(job, args):
        out = job.run.with_suffix(".eval.json")
        return [sys.executable, "-c", f"import json; open({str(out)!r}, 'w').write(json.dumps({{'psnr_head': 30.0}}))"]

    monkeypatch.setattr(sweep, "train_command", fake_train)
    monkeypatch.setattr(sweep, "eval_command", fake_eval)
    jobs = [sweep.Job(name, 0, [], tmp_path / name, tmp_path / f"{name}.log") for name in durations]
    sweep.run_jobs(jobs, tmp_path, argparse.Namespace(parallel=2, deadline=4.0, until=0.0))
    quick, slow = jobs
    assert quick.returncode == 0 and not quick.interrupted and quick.result == {"psnr_head": 30.0}
    assert slow.interrupted and slow.returncode != 0 and slow.result == {"psnr_head": 30.0}
    assert slow.seconds < 30  # stopped at the deadline, not at its end
    summary = sweep.summarise(jobs)
    assert summary["quick"]["seeds"] == 1 and summary["quick"]["psnr_head"]["mean"] == 30.0
    assert summary["slow"] == {"seeds": 0}  # an interrupted run is listed, not averaged


def test_jobs_not_started_by_the_deadline_are_skipped(sweep, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "train_command", lambda job, subject, args: [sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(sweep, "eval_command", lambda job, args: [sys.executable, "-c", "pass"])
    jobs = [sweep.Job(f"v{i}", 0, [], tmp_path / f"v{i}", tmp_path / f"v{i}.log") for i in range(2)]
    sweep.run_jobs(jobs, tmp_path, argparse.Namespace(parallel=1, deadline=2.0, until=0.0))
    assert jobs[0].interrupted and "error" in jobs[0].result  # no eval JSON written: an error, not a crash
    assert jobs[1].proc is None and "skipped" in jobs[1].result
    assert json.dumps(sweep.summarise(jobs))  # the report stays JSON
