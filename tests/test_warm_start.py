"""The embedded warm start is defined by what it reaches, not by a step count (issue 14): supervised steps run until
greedy accuracy on plumbing.SFT_HELD_OUT training prompts, which the supervised phase never trains on, reaches
--sft-target (checked every plumbing.SFT_CHECK_EVERY steps); --sft-steps caps the phase.

The accuracy the builder reports is recomputed here by a naive decoder (one prompt at a time, no padding, argmax over
the full forward pass at each position, no generate()), on the saved checkpoint.
"""
import json
import os
from types import SimpleNamespace

import pytest
import torch

import plumbing
import rewards
from helpers import main_error


def naive_greedy_accuracy(model_dir: str, rows: list[dict], max_new_tokens: int = 6) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    correct = 0
    for r in rows:
        ids = tok(r["question"])["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
        correct += rewards.math_reward(tok.decode(new), r["answer"]) == 1.0
    return correct / len(rows)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    data = tmp_path_factory.mktemp("task")
    plumbing.make_arithmetic_dataset(str(data), seed=0, n_eval=200)
    with open(data / "train.jsonl") as f:
        held_out = [json.loads(line) for line in f][: plumbing.SFT_HELD_OUT]
    return data, held_out


def build(tmp_path, data, target: float, cap: int, capsys) -> tuple[float, int, str, str]:
    path = str(tmp_path / f"sft_{target}_{cap}")
    accuracy = plumbing.build_embedded_model(path, SimpleNamespace(seed=0, sft_target=target, sft_steps=cap), str(data))
    line = [s for s in capsys.readouterr().out.splitlines() if s.startswith("warm start:")][-1]
    return accuracy, int(line.split()[2]), path, line


def test_stops_at_the_first_check_that_reaches_the_target(tmp_path, task, capsys):
    data, held_out = task
    target = 0.15
    accuracy, steps, path, line = build(tmp_path, data, target, 1000, capsys)
    assert accuracy >= target and 0 < steps < 1000 and steps % plumbing.SFT_CHECK_EVERY == 0
    assert "not reached" not in line
    assert naive_greedy_accuracy(path, held_out) == pytest.approx(accuracy)  # the saved model is the one measured
    # the same run capped one check earlier (same seed, same batches) had not reached it: the first crossing
    before, steps_before, _, _ = build(tmp_path, data, target, steps - plumbing.SFT_CHECK_EVERY, capsys)
    assert steps_before == steps - plumbing.SFT_CHECK_EVERY and before < target


def test_sft_steps_caps_the_phase(tmp_path, task, capsys):
    data, held_out = task
    accuracy, steps, path, line = build(tmp_path, data, 0.99, 5, capsys)
    assert steps == 5 and accuracy < 0.99 and "not reached: capped by --sft-steps" in line
    assert naive_greedy_accuracy(path, held_out) == pytest.approx(accuracy)


@pytest.mark.parametrize("flags", [["--sft-target", "1.5"], ["--sft-target", "-0.1"], ["--sft-steps", "-1"]])
def test_bad_warm_start_options_are_one_line(capsys, tmp_path, flags):
    assert "--sft-target" in main_error(capsys, *flags, "--out", tmp_path / "o")
    assert not os.path.exists(tmp_path / "o")
