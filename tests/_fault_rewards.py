"""Reward functions for tests/test_faults.py, loaded by train.py as `--reward _fault_rewards:NAME` (tests/ on PYTHONPATH)."""

import os

_calls = 0


def length(completion: str, answer: str) -> float:
    """A well-behaved reward that varies within a group, so every step moves the weights."""
    return len(completion) / 4.0


def raises(completion: str, answer: str) -> float:
    raise ValueError("boom")


def nan_on_third(completion: str, answer: str) -> float:
    """Finite for samples 0 and 1 of the first step, NaN on sample 2."""
    global _calls
    _calls += 1
    return float("nan") if _calls == 3 else 0.0


def inf_on_rank_1(completion: str, answer: str) -> float:
    """Finite on rank 0, +inf on every sample of rank 1."""
    return float("inf") if os.environ.get("RANK") == "1" else 0.0


def length_held(completion: str, answer: str) -> float:
    """`length`, but held once the file HOLD_AFTER exists (a checkpoint) and while the file HOLD_FILE does: a run that
    stays alive, mid-step, until the test that started it has looked at it, however slow the machine."""
    import time

    while os.path.exists(os.environ.get("HOLD_AFTER", "")) and os.path.exists(os.environ.get("HOLD_FILE", "")):
        time.sleep(0.1)
    return length(completion, answer)


def length_slow(completion: str, answer: str) -> float:
    """`length`, a quarter of a second later: a run that lives long enough to be looked at (and killed) mid-way."""
    import time

    time.sleep(0.25)
    return length(completion, answer)
