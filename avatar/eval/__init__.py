"""Evaluation runs: re-render a split of the subject with its true conditions and compare."""

from avatar.eval.evaluate import evaluate_model, evaluate_run

__all__ = ["evaluate_model", "evaluate_run"]
