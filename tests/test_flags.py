"""Flags of train.py, each checked for what it is for, and evaluate() on 1 and 2 ranks.

Expected values come from computations written here (hand formulas, a plain per-sequence forward, a greedy loop
without generate()), never from train.py's own output. Real runs call train.main(argv) in this process (the code
path of `python train.py ARGV`, minus the interpreter start-up), on a random tiny Llama saved with the character
tokenizer and a chat template, and a 40-row local .jsonl; the 2-rank pieces (evaluate, the reward model sharded
inside train.py) run tests/_eval_worker.py under one torchrun launch. Each test's docstring names the wrong
implementation it catches.
"""
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import free_port, save_tiny_llama, step_on

import data
import embedded_task
import models
import sampling
import train

REPO = Path(__file__).resolve().parents[1]
WORKER = str(REPO / "tests" / "_eval_worker.py")
CHAT_TEMPLATE = "{% for m in messages %}#{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
TIMING = ("step_time_s", "tokens_per_s", "host_peak_rss_gib")
DIGITS = "0123456789"


# ---------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    """A random tiny Llama (large init: log-probs far from uniform) + the char tokenizer WITH a chat template."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_chat"), chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    """40 'a+b=' rows; with no test split, min(--eval-size, 40 // 5) of the last rows are held out for evaluation."""
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    with open(path, "w") as f:
        f.writelines(json.dumps({"question": f"{a}+{b}=", "answer": str(a + b)}) + "\n" for a in range(3, 13) for b in (1, 4, 7, 9))
    return str(path)


def rm_dir(root: Path, bias: float) -> str:
    """A tiny BertForSequenceClassification (num_labels=1) with the char tokenizer: its classifier weight is zero and
    its bias b, so it scores every text exactly b (Llama's score head has no bias, hence BERT)."""
    from transformers import BertConfig, BertForSequenceClassification

    path = root / f"rm_{bias}"
    tok = embedded_task.make_char_tokenizer()
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=64, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(bias)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def main(monkeypatch):
    """train.main(argv) in this process: a fresh one-process group per call (setup_distributed picks a free port when
    RANK is unset), torn down afterwards whatever happened. Returns main's exit code."""
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1")):
        monkeypatch.setenv(k, v)

    def call(argv: list) -> int:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(k, raising=False)
        try:
            return train.main([str(a) for a in argv])
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    return call


def base_argv(tiny_dir, data_file, out, *extra) -> list:
    return ["--model", tiny_dir, "--dataset", data_file, "--out", out, "--prompts-per-step", "2", "--group-size", "4",
            "--max-new-tokens", "4", "--eval-size", "4", "--eval-every", "1", "--plot", "false", "--export", "false",
            "--reward", "_eval_worker:odd_digits", *extra]


def metrics_rows(out) -> list:
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl") if line.strip()]


def without_timing(rows: list) -> list:
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k not in TIMING} for r in rows]


def bare_run(args, **fields) -> train.Run:
    base = dict(tok=None, train_rows=[None] * 8, eval_rows=[], optimizers={}, base_lr={}, beta=args.beta)
    return train.Run(args=args, rank=0, world=1, device=torch.device("cpu"), **(base | fields))


# ---------------------------------------------------------------------------------------------------- evaluate()

def digit_model_dir(tiny_dir: str, root: Path) -> str:
    """The tiny model with every non-digit row of the LM head zeroed: greedy decoding writes digits (a number)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    tok = models.load_tokenizer(tiny_dir)
    digit_ids = set(tok.convert_tokens_to_ids(list(DIGITS)))
    with torch.no_grad():
        for i in range(model.lm_head.weight.shape[0]):
            if i in digit_ids:
                model.lm_head.weight[i] *= 3
            else:
                model.lm_head.weight[i] = 0
    path = root / "digit_model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def greedy_texts(model_dir: str, prompts: list, T: int) -> list:
    """Greedy decoding by hand: argmax of the last position, appended, T times (prompts of one length: no padding)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = models.load_tokenizer(model_dir)
    ids = torch.tensor([tok(p)["input_ids"] for p in prompts])
    with torch.no_grad():
        for _ in range(T):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    out = []
    for row in ids[:, -T:].tolist():
        cut = row.index(tok.eos_token_id) if tok.eos_token_id in row else T
        out.append(tok.decode(row[:cut], skip_special_tokens=True))
    return out


EVAL_T = 3


@pytest.fixture(scope="module")
def eval_cases(tiny_dir, tmp_path_factory):
    """Two sets of eval rows with a known number correct. 'odd7': 7 rows, the correct ones all on rank 1 of 2 (rows
    1, 3, 5), so a mean of per-rank accuracies (0 and 1 → 0.5) is not the global 3/7. 'pad129': 129 rows, so on 2
    ranks rank 0 holds 65 (chunks of 64 + 1) and rank 1 holds 64 and must decode a padding row in its 2nd call; row 0
    (the padding row's prompt) is correct, so counting the padding row would change both eval_n and the count."""
    root = tmp_path_factory.mktemp("eval")
    model = digit_model_dir(tiny_dir, root)
    pool = [f"{a}+{b}=" for a in range(10, 30) for b in range(10, 30)]  # one length (6 characters): no padding
    texts = greedy_texts(model, pool, EVAL_T)
    numeric = [(p, t) for p, t in zip(pool, texts) if len(t) == EVAL_T and all(c in DIGITS for c in t)]
    assert len(numeric) >= 129, len(numeric)

    def rows(pairs, correct):  # the answer is the number the model writes, or that number + 1
        return [[p, t if i in correct else str(int(t) + 1)] for i, (p, t) in enumerate(pairs)]

    correct129 = set(range(0, 129, 3)) | {128}  # 43 + 1 = 44
    cases = {"odd7": rows(numeric[:7], {1, 3, 5}), "pad129": rows(numeric[:129], correct129)}
    expected = {"odd7": (3, 7), "pad129": (len(correct129), 129)}
    return root, model, cases, expected


@pytest.fixture(scope="module")
def two_rank_launch(eval_cases, tiny_dir, data_file):
    """One torchrun launch of tests/_eval_worker.py on 2 ranks: evaluate() on both cases, then train.main with a
    --reward-model (constant score b = 0.75, weight 2, the other reward weighted 0)."""
    root, model, cases, _ = eval_cases
    out = root / "launch"
    out.mkdir()
    rm = rm_dir(root, 0.75)
    argv = ["--model", tiny_dir, "--dataset", data_file, "--out", str(out / "train"), "--reward", "math=0",
            "--reward-model", rm, "--reward-model-weight", "2", "--steps", "1", "--prompts-per-step", "2",
            "--group-size", "2", "--max-new-tokens", "3", "--eval-size", "0", "--plot", "false", "--export", "false"]
    (out / "spec.json").write_text(json.dumps({"model": model, "T": EVAL_T, "cases": cases, "train_argv": argv}))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TRAIN_COLLECTIVE_TIMEOUT_S="60")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port",
                        str(free_port()), WORKER, str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return out, p


def test_evaluate_one_rank_odd_rows_known_correct(eval_cases, one_process_group):
    """eval_accuracy = k/N exactly and eval_n = N on one rank, N = 7 and 129 (3 generate calls: 64, 64, 1 rows).

    Catches: an accuracy over the first 64-row chunk only (range over len(rows) // 64 chunks); a chunk loop that
    drops the last partial chunk; a wrong `correct` test (e.g. string equality on the raw completion or the rate
    computed from the number of chunks)."""
    from _dist_worker import make_run

    _, model, cases, expected = eval_cases
    tok = models.load_tokenizer(model)
    policy = models.shard(models.load_full_model(models.ModelSpec("policy", model, "--model")), False)
    for name, rows in cases.items():
        run = make_run(train.Args(max_new_tokens=EVAL_T), policy, None, {}, tok=tok,
                       eval_rows=[data.PromptRow(text=p, answer=a, ids=tok(p)["input_ids"]) for p, a in rows],
                       sampler=sampling.make_sampler(policy, tok, EVAL_T, 1.0, None))
        k, n = expected[name]
        metrics, samples = train.evaluate(run)
        assert metrics == {"eval_accuracy": k / n, "eval_n": n}, name
        assert [s["prompt"] for s in samples] == [r[0] for r in rows]
        assert sum(s["correct"] for s in samples) == k


def test_evaluate_two_ranks_odd_rows_and_padding_batch(eval_cases, two_rank_launch):
    """On 2 ranks (torchrun): eval_accuracy = k/N and eval_n = N, both ranks return the same, every rank makes the
    same number of generate calls and the rank with fewer rows finishes (its 2nd call decodes one padding row that
    is not counted).

    Catches: a mean of per-rank accuracies (odd7: 0.5 ≠ 3/7); eval_n or the count taken from rank 0 only; the padding
    row counted (pad129: eval_n 130, and row 0 is correct); a loop over the rank's own rows only (rank 1 skips its
    2nd generate call: rank 0's sample() waits in its all_reduce, the launch fails)."""
    out, p = two_rank_launch
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    _, _, cases, expected = eval_cases
    per_rank = [json.loads((out / f"eval_rank{r}.json").read_text()) for r in (0, 1)]
    for name, (k, n) in expected.items():
        for r, res in enumerate(per_rank):
            got = res[name]
            assert got["finished"] and got["metrics"] == {"eval_accuracy": k / n, "eval_n": n}, (name, r, got["metrics"])
            assert got["n_samples"] == n and sorted(got["sample_prompts"]) == sorted(row[0] for row in cases[name])
        calls = [res[name]["sample_calls"] for res in per_rank]
        assert len(calls[0]) == len(calls[1]), calls
    assert per_rank[0]["odd7"]["my_rows"] == 4 and per_rank[1]["odd7"]["my_rows"] == 3
    # pad129: rank 0 decodes 64 + 1 rows; rank 1 64 rows, then one padding row (evaluate passes eval_rows[:1])
    assert per_rank[0]["pad129"]["sample_calls"] == [64, 1] and per_rank[1]["pad129"]["sample_calls"] == [64, 1]


# ---------------------------------------------------------------------------------------------------- --reward-model

def test_reward_model_is_sharded_and_weighted_inside_train(two_rank_launch):
    """train.main on 2 ranks with --reward-model RM (every text scores b = 0.75), --reward-model-weight 2 and the
    rule-based reward weighted 0: reward_mean = 2 × 0.75 = 1.5 exactly, reward_std 0; the reward model was loaded
    through load_model as FSDP2 DTensors, each rank holding about half of it.

    Catches: --reward-model-weight ignored (0.75) or applied twice (3.0); the reward model's score not added to the
    total (0); the reward model loaded whole on every rank (plain tensors, local = full)."""
    out, p = two_rank_launch
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    ranks = [json.loads((out / f"rm_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["exit_code"] for r in ranks] == [0, 0]
    for r in ranks:
        (rm,) = r["reward_models"]
        assert rm["all_dtensor"] and any("Shard(dim=0)" in s for s in rm["placements"]), rm
        assert rm["local_numel"] < 0.6 * rm["full_numel"], rm
    assert sum(r["reward_models"][0]["local_numel"] for r in ranks) >= ranks[0]["reward_models"][0]["full_numel"]
    (row,) = [r for r in metrics_rows(out / "train") if "reward_mean" in r]
    assert row["reward_mean"] == 1.5 and row["reward_std"] == 0.0, row


def test_non_finite_reward_model_score_stops_the_run(tmp_path, tiny_dir, data_file, main, capsys):
    """A reward model that scores NaN: exit code 2, exactly one `error:` line, naming the reward model, and no step
    row in metrics.jsonl (nothing reached the optimizer).

    Catches: the isfinite check removed (the run goes on with NaN rewards, exit 0); a traceback instead of the
    one-line UserError."""
    out = tmp_path / "out"
    code = main(base_argv(tiny_dir, data_file, out, "--reward", "math=0", "--reward-model", rm_dir(tmp_path, math.nan),
                          "--steps", "1", "--eval-size", "0"))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, (code, err[-3000:])
    assert "reward model" in errors[0] and "nan" in errors[0], errors
    assert "Traceback" not in err
    assert not any("reward_mean" in r for r in metrics_rows(out))


# ---------------------------------------------------------------------------------------------------- --mask-truncated

def truncated_batch(tok, G=4, T=3, seed=0, row2=None, score2=0.3) -> train.Rollout:
    """2 groups of G; row 2 truncated (no EOS within T: completion_mask all ones, loss_mask all zero), row 5 ends
    early with EOS. Prompts of 3 tokens, no padding. row2/score2 replace row 2's completion tokens and score."""
    g = torch.Generator().manual_seed(seed)
    B, P = 2 * G, 3
    ids = torch.randint(4, len(tok), (B, P + T), generator=g)
    cmask = torch.ones(B, T)
    ids[5, P + 1] = tok.eos_token_id
    ids[5, P + 2] = tok.pad_token_id
    cmask[5, 2] = 0
    if row2 is not None:
        ids[2, P:] = torch.tensor(row2)
    lmask = cmask.clone()
    lmask[2] = 0
    scores = torch.tensor([1.0, 0.0, score2, 2.0, 0.5, 1.5, 0.0, 1.0])
    n = len(scores)
    return train.Rollout(input_ids=ids, attention_mask=torch.ones(B, P + T, dtype=torch.long), completion_mask=cmask,
                         loss_mask=lmask, n_prompt=P, prompts=[""] * n, answers=[""] * n, texts=[""] * n, scores=scores)


def hand_group_advantages(scores: list, valid: list, G: int, scale: bool = True) -> list:
    out = []
    for g in range(0, len(scores), G):
        kept = [s for s, v in zip(scores[g : g + G], valid[g : g + G]) if v]
        mean = statistics.mean(kept)
        std = statistics.stdev(kept) if scale else None
        out += [((s - mean) / (std + 1e-6) if scale else s - mean) if v else 0.0
                for s, v in zip(scores[g : g + G], valid[g : g + G])]
    return out


def test_mask_truncated_row_is_out_of_the_group_statistics(tiny_dir):
    """GRPO, --mask-truncated: the truncated row 2 gets A = 0 and its group's mean/std are over rows 0, 1, 3 only;
    changing its score changes no advantage.

    Catches: compute_advantages ignoring loss_mask (valid=None: row 2 in the mean/std and A_2 ≠ 0); the truncated
    row zeroed after the statistics instead of left out of them."""
    tok = models.load_tokenizer(tiny_dir)
    run = bare_run(train.Args(algo="grpo", group_size=4, mask_truncated=True))
    valid = [True, True, False, True, True, True, True, True]
    for score2 in (0.3, 7.0):
        batch = truncated_batch(tok, score2=score2)
        adv, ret = train.compute_advantages(run, batch)
        assert ret is None
        expected = hand_group_advantages(batch.scores.tolist(), valid, 4)
        torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-6, rtol=0)
        assert adv[2] == 0


def reference_update(tiny_dir, batch, adv, loss_agg, lr):
    """The GRPO step by hand on the unsharded model, one sequence at a time, ratio = 1 (on-policy: π_θold is the
    same forward, detached), kept rows only: seq-mean-token-mean = (1/n_kept) Σ_i mean_t(−ratio·A_i); token-mean =
    Σ_i Σ_t(−ratio·A_i) / (tokens of kept rows). Plain SGD, no clipping. Returns the parameters after it."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    P = batch.n_prompt
    kept = [i for i in range(len(batch)) if batch.loss_mask[i].sum() > 0]
    n_tok = sum(int(batch.loss_mask[i].sum()) for i in kept)
    loss = 0.0
    for i in kept:
        c = int(batch.loss_mask[i].sum())
        seq = batch.input_ids[i, : P + c]
        logp = torch.log_softmax(model(input_ids=seq[None]).logits[0].float(), -1)  # temperature 1
        lp = logp[torch.arange(P - 1, P - 1 + c), seq[P : P + c]]
        pg = -torch.exp(lp - lp.detach()) * float(adv[i])
        loss = loss + (pg.mean() / len(kept) if loss_agg == "seq-mean-token-mean" else pg.sum() / n_tok)
    loss.backward()
    with torch.no_grad():
        return {n: p - lr * p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("loss_agg", ["seq-mean-token-mean", "token-mean"])
def test_mask_truncated_row_is_out_of_the_update(tiny_dir, one_process_group, loss_agg):
    """GRPO, --mask-truncated, one train.rl_step on a hand-made rollout with plain SGD: (1) changing the truncated row's tokens and score leaves the
    parameters after the update identical; (2) the update equals the hand-written one whose normaliser counts the
    kept rows (seq-mean) or the kept rows' tokens (token-mean) only.

    Catches: n_seq counting every row (7 → 8: the step shrinks by 7/8), n_tok counting the completion_mask (the
    truncated row's 3 tokens), the loss taken over completion_mask instead of loss_mask (row 2 moves the update)."""
    from transformers import LlamaForCausalLM

    tok = models.load_tokenizer(tiny_dir)
    lr = 0.5
    args = train.Args(algo="grpo", group_size=4, prompts_per_step=2, mask_truncated=True, minibatch_size=8, eps=0.2,
                      micro_batch_size=8, max_new_tokens=3, loss_agg=loss_agg, ent_coef=0.0, beta=0.0, max_grad_norm=1e9)
    d = tok.convert_tokens_to_ids(list("91"))
    after = []
    for row2, score2 in ((None, 0.3), ([d[0], d[1], d[0]], -4.0)):
        policy = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
        run = bare_run(args, policy=policy, optimizers={"policy": torch.optim.SGD(policy.parameters(), lr=lr)})
        batch = truncated_batch(tok, row2=row2, score2=score2)
        step_on(run, batch, batch.scores)  # π_θold: the trainer's own no-grad pass (ratio 1)
        after.append({n: p.detach().clone() for n, p in policy.named_parameters()})
    for n in after[0]:
        torch.testing.assert_close(after[1][n], after[0][n], atol=0, rtol=0, msg=n)
    batch = truncated_batch(tok)
    adv = hand_group_advantages(batch.scores.tolist(), [True, True, False, True, True, True, True, True], 4)
    expected = reference_update(tiny_dir, batch, adv, loss_agg, lr)
    start = dict(LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).named_parameters())
    assert max((after[0][n] - start[n]).abs().max().item() for n in start) > 1e-3  # the update moved the weights
    for n, p in expected.items():
        torch.testing.assert_close(after[0][n], p, atol=2e-6, rtol=0, msg=n)


def test_mask_truncated_real_run_with_chat_template(tmp_path, tiny_dir, data_file, main):
    """A real run with --chat-template --mask-truncated --max-new-tokens 2 (most completions truncated) completes with
    finite metrics, and the prompts the policy saw (eval_completions.jsonl "prompt") went through the tokenizer's
    chat template: '#' + question + '=' for the 4 held-out rows.

    Catches: --chat-template ignored (raw questions, e.g. '12+9='); the template applied without
    add_generation_prompt (no trailing '='); a crash or a NaN loss when every row of a group is masked."""
    out = tmp_path / "out"
    assert main(base_argv(tiny_dir, data_file, out, "--chat-template", "--mask-truncated", "--max-new-tokens", "2",
                          "--steps", "1")) == 0
    (row,) = [r for r in metrics_rows(out) if "reward_mean" in r]
    # finite loss and gradient (approx_kl/clipfrac/entropy are token means: null when every completion is truncated)
    assert all(row[k] is not None and math.isfinite(row[k]) for k in ("loss", "reward_mean", "grad_norm")), row
    assert row["skipped_updates"] == 0 and row["completion_len_mean"] <= 2
    questions = [json.loads(line)["question"] for line in open(data_file)][-4:]
    prompts = [json.loads(line)["prompt"] for line in open(out / "eval_completions.jsonl")]
    assert prompts == ["#" + q + "=" for q in questions]


# ---------------------------------------------------------------------------------------------------- advantages flags

def test_scale_rewards_false_is_r_minus_group_mean():
    """GRPO --scale-rewards false (Dr.GRPO): A_i = R_i − mean of its group, not divided by the std; true divides.

    Catches: the flag ignored (std division always), or its meaning inverted."""
    scores = [1.0, 0.0, 0.3, 2.0, 0.5, 1.5, 0.0, 4.0]
    batch = train.Rollout(input_ids=torch.zeros(8, 2, dtype=torch.long), attention_mask=torch.ones(8, 2),
                          completion_mask=torch.ones(8, 1), loss_mask=torch.ones(8, 1), n_prompt=1, prompts=[""] * 8,
                          answers=[""] * 8, texts=[""] * 8, scores=torch.tensor(scores))
    for scale in (False, True):
        adv, _ = train.compute_advantages(bare_run(train.Args(algo="grpo", group_size=4, scale_rewards=scale)), batch)
        expected = [s - statistics.mean(scores[g : g + 4]) for g in (0, 4) for s in scores[g : g + 4]] if not scale else \
            [(s - statistics.mean(scores[g : g + 4])) / (statistics.stdev(scores[g : g + 4]) + 1e-6) for g in (0, 4) for s in scores[g : g + 4]]
        torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-6, rtol=0)


def test_whiten_advantages_false_keeps_raw_gae(one_process_group):
    """PPO --whiten-advantages false, β = 0, γ = λ = 1: A_t = R − V_old(s_t) on the completion tokens (0 after EOS),
    returns = R; with true, the same values whitened over all valid tokens.

    Catches: the flag ignored (always whitened) or inverted; whitening statistics that include padding."""
    T = 4
    lengths, scores = [4, 2, 3], [1.0, -0.5, 2.0]
    mask = torch.tensor([[1.0] * c + [0.0] * (T - c) for c in lengths])
    values = torch.tensor([[0.1, 0.2, -0.3, 0.4], [0.5, -0.1, 0.0, 0.0], [0.2, 0.2, 0.7, 0.0]]) * mask
    batch = train.Rollout(input_ids=torch.zeros(3, 1 + T, dtype=torch.long), attention_mask=torch.ones(3, 1 + T),
                          completion_mask=mask, loss_mask=mask.clone(), n_prompt=1, prompts=[""] * 3, answers=[""] * 3,
                          texts=[""] * 3, scores=torch.tensor(scores), old_logprobs=torch.zeros(3, T) - 1.0,
                          old_values=values)
    raw = [[scores[i] - values[i, t].item() for t in range(c)] for i, c in enumerate(lengths)]
    flat = [x for r in raw for x in r]
    mean, std = statistics.mean(flat), statistics.stdev(flat)
    for whiten in (False, True):
        run = bare_run(train.Args(algo="ppo", whiten_advantages=whiten, gamma=1.0, lam=1.0, beta=0.0))
        adv, ret = train.compute_advantages(run, batch)
        expected = torch.zeros(3, T)
        for i, r in enumerate(raw):
            expected[i, : len(r)] = torch.tensor([(x - mean) / (std + 1e-8) if whiten else x for x in r])
        torch.testing.assert_close(adv * mask, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(ret * mask, torch.tensor(scores)[:, None] * mask, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------- PPO resume + lr

def recording_lrs(monkeypatch, record: list):
    original = train.rl_step

    def wrapper(run, step):
        record.append((step, [[g["lr"] for g in opt.param_groups] for opt in run.optimizers.values()]))
        return original(run, step)

    monkeypatch.setattr(train, "rl_step", wrapper)


def test_ppo_resume_restores_critic_and_lr_schedule(tmp_path, tiny_dir, data_file, main, monkeypatch):
    """PPO, 2 steps × (2 epochs × 2 minibatches), a checkpoint each step. Resumed from step 1 (step 2's checkpoint
    deleted), step 2's rows (train and eval) equal the uninterrupted run's, timings aside. The optimizers' lr at
    step s, read from the optimizers' param_groups as rl_step starts, is base·(1 − (s − 1)/steps) for the policy
    (--lr) and the critic (--critic-lr), in both runs; the logged "lr" (the policy's; the critic's is not logged)
    matches.

    Catches: the critic or its AdamW state not saved/restored (step 2's value_loss/explained_variance/loss differ);
    an lr schedule off by one step ((1 − s/steps): 0.5·base at step 1) or re-based on the resumed step; the critic
    left on a constant lr."""
    lrs = []
    recording_lrs(monkeypatch, lrs)
    out = tmp_path / "out"
    argv = base_argv(tiny_dir, data_file, out, "--algo", "ppo", "--steps", "2", "--save-every", "1", "--epochs", "2",
                     "--minibatch-size", "4", "--lr", "0.01", "--critic-lr", "0.05")
    assert main(argv) == 0
    full = without_timing(metrics_rows(out))
    assert [r["step"] for r in full] == [0, 1, 1, 2, 2]
    shutil.rmtree(out / "checkpoints" / "step_000002")
    assert main(argv + ["--resume"]) == 0
    resumed = without_timing(metrics_rows(out))
    assert resumed == full
    train_rows = [r for r in full if "reward_mean" in r]
    assert all(r["minibatches_taken"] == 4 for r in train_rows) and train_rows[1]["value_loss"] > 0
    expected = lambda s: [[0.01 * (1 - (s - 1) / 2)], [0.05 * (1 - (s - 1) / 2)]]
    assert [s for s, _ in lrs] == [1, 2, 2]
    for s, got in lrs:
        for g, e in zip(got, expected(s)):
            assert math.isclose(g[0], e[0], rel_tol=1e-12), (s, got)
    for r in train_rows:  # the policy's lr is also logged per step (the critic's is not)
        assert math.isclose(r["lr"], expected(r["step"])[0][0], rel_tol=1e-12), r


# ---------------------------------------------------------------------------------------------------- KL controls

def test_adaptive_kl_target_adapts_beta_and_resumes_exactly(tmp_path, tiny_dir, data_file, main):
    """GRPO --beta 0.05 --adaptive-kl-target 0.002 --kl-horizon 16, 3 steps (with --eps-high 0.28 --dual-clip 3 --kl-estimator
    k2): the logged β of steps 2 and 3 follow Ziegler's rule from the previous step's logged kl:
    e = clip(kl/X − 1, −0.2, 0.2), β' = β·(1 + e·n/H), n = 2 prompts × 4 = 8. Resumed from step 2 (step 3's
    checkpoint deleted): step 3's rows equal the uninterrupted run's (β comes from the checkpoint). The checkpoint's
    meta.json args record eps_high 0.28, dual_clip 3, kl_estimator k2.

    Catches: β not adapted; n = prompts only (K = 2/16); the error not clipped or clipped to another range; the sign
    of the correction inverted; β restarting from --beta on resume."""
    out = tmp_path / "out"
    argv = base_argv(tiny_dir, data_file, out, "--steps", "3", "--save-every", "1", "--beta", "0.05", "--adaptive-kl-target", "0.002",
                     "--kl-horizon", "16", "--lr", "0.05", "--eps-high", "0.28", "--dual-clip", "3", "--kl-estimator", "k2",
                     "--eval-size", "0")
    assert main(argv) == 0
    full = without_timing(metrics_rows(out))
    rows = [r for r in full if "reward_mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["beta"] == 0.05
    for prev, nxt in zip(rows, rows[1:]):
        e = min(max(prev["kl"] / 0.002 - 1, -0.2), 0.2)
        assert math.isclose(nxt["beta"], prev["beta"] * (1 + e * 8 / 16), rel_tol=1e-12), (prev, nxt)
    assert rows[1]["kl"] > 0 and rows[2]["beta"] != rows[1]["beta"]
    meta = json.loads((out / "checkpoints" / "step_000003" / "meta.json").read_text())
    assert meta["args"]["eps_high"] == 0.28 and meta["args"]["dual_clip"] == 3.0 and meta["args"]["kl_estimator"] == "k2"
    shutil.rmtree(out / "checkpoints" / "step_000003")
    assert main(argv + ["--resume"]) == 0
    assert without_timing(metrics_rows(out)) == full


def test_a_beta_changed_on_resume_trains_from_the_next_step(tmp_path, tiny_dir, data_file, main, capsys):
    """GRPO --beta 0.05 for 2 steps, a checkpoint each; step 2's checkpoint deleted and the run resumed with --beta 0.2:
    step 2 logs β 0.2 (the announced value trains), the start-up line prints β 0.2; resumed instead with --beta 0, no
    reference is loaded and step 2 logs no kl.

    Catches: β taken from the checkpoint's meta though the change is announced (0.05 trains on); a start-up line
    printing --beta while another β trains; a reference loaded (or not) by the old β."""
    out = tmp_path / "out"
    argv = base_argv(tiny_dir, data_file, out, "--steps", "2", "--save-every", "1", "--eval-size", "0", "--lr", "0.05")
    assert main(argv + ["--beta", "0.05"]) == 0
    capsys.readouterr()
    shutil.rmtree(out / "checkpoints" / "step_000002")
    assert main(argv + ["--beta", "0.2", "--resume"]) == 0
    said = capsys.readouterr().out
    assert "--beta 0.05 → 0.2 from step 2" in said and "β 0.2," in said and "reference" in said, said
    assert [(r["step"], r["beta"]) for r in metrics_rows(out)] == [(1, 0.05), (2, 0.2)]  # step 2 replaced
    shutil.rmtree(out / "checkpoints" / "step_000002")
    assert main(argv + ["--beta", "0", "--resume"]) == 0
    said = capsys.readouterr().out
    last = metrics_rows(out)[-1]
    assert (last["step"], last["beta"], last["kl"]) == (2, 0.0, None) and "reference" not in said, said


def test_early_stop_kl_stops_the_epochs_early(tmp_path, tiny_dir, data_file, main):
    """GRPO --early-stop-kl 1e-9 with --epochs 3 and 2 minibatches: the first minibatch that moved the policy stops the
    step: minibatches_taken < 3 × 2 and kl_early_stop = 1.

    Catches: --early-stop-kl ignored (6 minibatches, kl_early_stop 0); a stop that only ends the current epoch (3 taken);
    the check made after the optimizer step instead of before it (2 taken)."""
    out = tmp_path / "out"
    assert main(base_argv(tiny_dir, data_file, out, "--steps", "1", "--epochs", "3", "--minibatch-size", "4",
                          "--early-stop-kl", "1e-9", "--lr", "0.05", "--eval-size", "0")) == 0
    (row,) = [r for r in metrics_rows(out) if "reward_mean" in r]
    # the first minibatch is on-policy (approx_kl 0): it steps; the second sees the moved policy and stops everything
    assert row["kl_early_stop"] == 1 and row["minibatches_taken"] == 1, row
