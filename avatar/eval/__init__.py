"""Evaluation runs: re-render a split of the subject with its true conditions and compare; drive the
avatar with other people's speech and compare its lips with theirs."""

from avatar.eval.drive import drive_metrics
from avatar.eval.evaluate import evaluate_model, evaluate_run

__all__ = ["drive_metrics", "evaluate_model", "evaluate_run"]
