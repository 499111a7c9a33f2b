"""The supervised stage (`train.py --algo sft`, document 004 "1. Background: From Pre-training to SFT"): the loss is
the masked next-token cross-entropy of the responses, and the embedded warm start is defined by what it reaches.

Expected values come from computations written here: a per-sequence forward of the starting checkpoint with the
loss typed out (prompt positions excluded), and a naive greedy decoder (one prompt at a time, argmax over the full
forward pass at each position, no generate()) on the exported checkpoint. Runs call train.main in this process.
"""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import main_error

import checkpoints
import data
import distributed
import embedded_task
import rewards
import sft


def naive_greedy_accuracy(model_dir, rows: list[dict], max_new_tokens: int = 6) -> float:
    """Greedy decoding without generate() or padding: the prompts of one length go together, each step appends the
    argmax of the full forward pass at the last position; a completion ends at its first EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    by_length = {}
    for r in rows:
        by_length.setdefault(len(tok(r["question"])["input_ids"]), []).append(r)
    correct = 0
    for group in by_length.values():
        ids = torch.tensor([tok(r["question"])["input_ids"] for r in group])  # (n, P) one length: no padding
        with torch.no_grad():
            for _ in range(max_new_tokens):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
        for r, row in zip(group, ids[:, -max_new_tokens:].tolist()):
            new = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
            correct += rewards.math_reward(tok.decode(new), r["answer"]) == 1.0
    return correct / len(rows)


def run_main(argv) -> int:
    import train

    try:
        return train.main([str(a) for a in argv])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def rows_of(out, name) -> list[dict]:
    return [json.loads(line) for line in open(out / "embedded_data" / name)]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl") if line.strip()]


def test_sft_loss_is_the_masked_cross_entropy_by_hand():
    """sft.sft_loss on a real forward equals −mean log p over the response tokens (answer + EOS), written out with
    log_softmax one sequence at a time; counting the prompt's tokens too gives another number."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import logprobs

    tok = embedded_task.make_char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, initializer_range=0.2)).eval()
    pairs = [("12+3=", "15"), ("7+8=", "15"), ("20+20=", "40")]
    examples = [sft.Example(prompt=data.PromptRow(text=p, answer=a, ids=tok(p)["input_ids"]),
                            response_ids=tok(a)["input_ids"] + [tok.eos_token_id]) for p, a in pairs]
    ids, att, mask, P = sft.batch_tensors(examples, tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        lp, _ = logprobs.sequence_logprobs(model, ids, att, P, 1.0)
        loss = sft.sft_loss(lp, mask).item()
        total, n = 0.0, 0
        for e in examples:
            seq = torch.tensor([e.prompt.ids + e.response_ids])
            logp = torch.log_softmax(model(input_ids=seq).logits[0], -1)  # (S, V)
            for t, y in enumerate(e.response_ids):
                total -= logp[len(e.prompt.ids) + t - 1, y].item()  # the logits before token t score it
                n += 1
    assert n == 3 + 3 + 3 and math.isclose(loss, total / n, rel_tol=1e-5)
    assert mask.sum() == n  # padding of the shorter responses carries no loss
    with torch.no_grad():  # the loss with the prompt's tokens counted too: another number, so the test can tell
        everything = [torch.log_softmax(model(input_ids=torch.tensor([e.prompt.ids + e.response_ids])).logits[0], -1)
                      for e in examples]
        seqs = [e.prompt.ids + e.response_ids for e in examples]
        wrong = -sum(lp_[t - 1, s[t]].item() for lp_, s in zip(everything, seqs) for t in range(1, len(s)))
        wrong /= sum(len(s) - 1 for s in seqs)
    assert abs(wrong - loss) > 0.05


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """`train.py --algo sft` on the embedded task with --sft-target 0.15 (reached within a few dozen steps)."""
    out = tmp_path_factory.mktemp("sft") / "out"
    assert run_main(["--algo", "sft", "--out", out, "--sft-target", "0.15", "--steps", "1000", "--plot", "false"]) == 0
    return out


def test_first_step_loss_and_token_accuracy_by_hand(sft_run):
    """The logged loss and token_accuracy of step 1 equal the ones computed here from the starting checkpoint
    (OUT/embedded_model) on the step's 64 rows, drawn as the trainer draws them (data.rows_for_step), each
    sequence alone: −mean log p and the argmax hit rate over response tokens (answer + EOS) only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = sft_run / embedded_task.MODEL_DIR
    tok = AutoTokenizer.from_pretrained(start)
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32).eval()
    rows = rows_of(sft_run, "train.jsonl")[200:]  # train[200:], the sft stage's training split
    picks = np.random.default_rng(distributed.seed_for(0, "epoch", 0)).permutation(len(rows))[:64]  # step 1: epoch 0
    total, hits, n = 0.0, 0, 0
    with torch.no_grad():
        for i in picks:
            prompt, response = tok(rows[i]["question"])["input_ids"], tok(rows[i]["answer"])["input_ids"]
            response = response + [tok.eos_token_id]
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0]  # (S, V)
            for t, y in enumerate(response):
                z = logits[len(prompt) + t - 1]
                total -= torch.log_softmax(z, -1)[y].item()
                hits += int(z.argmax()) == y
                n += 1
    (row,) = [r for r in metrics(sft_run) if r["step"] == 1 and "loss" in r]
    assert math.isclose(row["loss"], total / n, rel_tol=1e-5), (row["loss"], total / n)
    assert math.isclose(row["token_accuracy"], hits / n, rel_tol=1e-9)


def test_stops_at_the_first_evaluation_that_reaches_the_target(sft_run):
    """Every evaluation (every 10 steps, on train[:200], rows the stage never trains on) before the last is below
    --sft-target; the last reaches it; the checkpoint and the export are that step's; the accuracy logged equals the
    naive decoder's on the exported checkpoint."""
    evals = [r for r in metrics(sft_run) if "eval_accuracy" in r]
    last = evals[-1]
    assert last["eval_accuracy"] >= 0.15 and all(r["eval_accuracy"] < 0.15 for r in evals[:-1])
    assert 0 < last["step"] < 1000 and last["step"] % 10 == 0 and last["eval_n"] == 200
    assert [r["step"] for r in evals] == list(range(0, last["step"] + 1, 10))
    assert checkpoints.latest_checkpoint(sft_run).endswith(f"step_{last['step']:06d}")
    meta = json.loads(open(os.path.join(checkpoints.latest_checkpoint(sft_run), "meta.json")).read())
    assert meta["reached_target"] is True
    held_out = rows_of(sft_run, "train.jsonl")[:200]
    assert naive_greedy_accuracy(sft_run / "hf", held_out) == pytest.approx(last["eval_accuracy"])


def test_a_complete_stage_resumed_says_so_and_writes_nothing(sft_run, capsys):
    before = metrics(sft_run)
    assert run_main(["--algo", "sft", "--out", sft_run, "--sft-target", "0.15", "--steps", "1000", "--plot", "false",
                     "--resume"]) == 0
    said = capsys.readouterr().out
    assert "is already complete at step" in said and "(--sft-target reached)" in said, said
    assert metrics(sft_run) == before


def test_steps_caps_the_stage(tmp_path):
    out = tmp_path / "out"
    assert run_main(["--algo", "sft", "--out", out, "--sft-target", "0.99", "--steps", "5", "--plot", "false"]) == 0
    evals = [r for r in metrics(out) if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 5] and evals[-1]["eval_accuracy"] < 0.99
    assert json.loads(open(os.path.join(checkpoints.latest_checkpoint(out), "meta.json")).read())["reached_target"] is False
    assert naive_greedy_accuracy(out / "hf", rows_of(out, "train.jsonl")[:200]) == pytest.approx(evals[-1]["eval_accuracy"])


@pytest.mark.parametrize("flags, says", [
    (["--sft-target", "1.5"], "--sft-target 1.5 must be an accuracy in [0, 1]"),
    (["--sft-target", "-0.1"], "--sft-target -0.1 must be an accuracy in [0, 1]"),
    (["--sft-steps", "-1"], "--sft-steps must be non-negative, not -1"),
])
def test_bad_warm_start_options_are_one_line(capsys, tmp_path, flags, says):
    assert main_error(capsys, *flags, "--out", tmp_path / "o") == "error: " + says
    assert not os.path.exists(tmp_path / "o")
