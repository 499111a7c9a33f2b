"""train.py: real runs (2-process torchrun on CPU, local model + dataset files), FSDP2 1-rank ≡ 2-rank updates checked
against a hand-written plain-PyTorch update, log-probs against a per-position loop, the EOS mask, gathers per rollout.

Expected values come from independent computations written here (loops over single sequences, the GRPO formulas
typed out again, hand-made token rows), never from train.py's own output. The multi-process pieces run
tests/_dist_worker.py under torchrun (gloo). Shapes: B sequences, P prompt tokens, T completion tokens.
"""
import json
import math
import os
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import free_port, save_tiny_llama

import data
import distributed
import logprobs
import models
import options
import sampling
import train

REPO = Path(__file__).resolve().parents[1]
WORKER = str(REPO / "tests" / "_dist_worker.py")
TINY = ["--steps", "2", "--prompts-per-step", "4", "--group-size", "4", "--minibatch-size", "8", "--eval-size", "16",
        "--eval-every", "1", "--max-new-tokens", "4", "--plot", "false"]
TRAIN_KEYS = {"step", "reward_mean", "reward_std", "frac_reward_zero_std", "kl", "clipfrac", "approx_kl", "entropy",
              "completion_len_mean", "step_time_s", "tokens_per_s"}
# the fixed batch: rows 0-3 (rank 0 of 2) hold 16 completion tokens, rows 4-7 (rank 1) 17, so a rank-local
# normaliser would give a different update on 2 ranks than on 1
PROMPT_LENS, COMPLETION_LENS, P, T = [5, 3, 4, 2, 5, 1, 3, 4], [6, 1, 3, 6, 2, 5, 4, 6], 5, 6
SCORES, G, BETA, ENT_COEF, TEMPERATURE = [1.0, 0.0, 0.2, 0.9, 1.0, 1.0, 0.5, 0.0], 2, 0.04, 0.01, 0.7


def run(cmd: list[str], tmp: Path, timeout: int = 240, nproc: int = 0, retry_abort: bool = False) -> subprocess.CompletedProcess:
    """`python CMD` or `torchrun --nproc_per_node NPROC CMD` from the repo root, offline, with a short collective timeout.

    retry_abort: for the worker launches of tests/_dist_worker.py only (they write nothing a second attempt would meet):
    a gloo rank that aborts in C++ (SIGABRT, "terminate called without an active exception") under a loaded machine is
    launched once more. The first attempt's output is kept in TMP/aborted_attempt.log and a warning says so."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_DATASETS_CACHE=str(tmp / "hf_cache"), TRAIN_COLLECTIVE_TIMEOUT_S="60", PYTHONFAULTHANDLER="1")
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master-port"] if nproc else []
    for attempt in (1, 2):
        port = [str(free_port())] if nproc else []
        p = subprocess.run([sys.executable, *launcher, *port, *cmd], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=timeout)
        if p.returncode == 0 or not retry_abort or attempt == 2 or \
                "terminate called without an active exception" not in p.stderr:
            break
        log = tmp / "aborted_attempt.log"
        log.write_text(f"{' '.join(cmd)}\nexit {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
        warnings.warn(f"a gloo rank aborted (SIGABRT) in {' '.join(cmd[:2])}; launched again, the first attempt in {log}")
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def test_the_abort_retry_keeps_the_first_attempt_warns_and_is_asked_for(tmp_path):
    """run(retry_abort=True) launches again only after the gloo abort's signature, keeps the first attempt's output
    and warns; without retry_abort (every train.py launch) the first failure is the test's failure."""
    script, mark = tmp_path / "flaky.py", tmp_path / "mark"
    script.write_text("import os, sys\nif not os.path.exists(sys.argv[1]):\n    open(sys.argv[1], 'w').close()\n"
                      "    print('first attempt')\n    sys.stderr.write('terminate called without an active exception\\n')\n"
                      "    sys.exit(134)\nprint('second attempt')\n")
    with pytest.warns(UserWarning, match="launched again"):
        p = run([str(script), str(mark)], tmp_path, retry_abort=True)
    assert p.stdout.strip() == "second attempt"
    assert "first attempt" in (tmp_path / "aborted_attempt.log").read_text()
    mark.unlink()
    (tmp_path / "aborted_attempt.log").unlink()
    with pytest.raises(AssertionError, match="exit 134"):
        run([str(script), str(mark)], tmp_path)
    assert not (tmp_path / "aborted_attempt.log").exists()


def read_metrics(out: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if line.strip()]
    return [r for r in rows if "reward_mean" in r], [r for r in rows if "eval_accuracy" in r]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    """A random tiny Llama (GQA, untied head, large init so log-probs are far from uniform) + the char tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def plain_model(path: str):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def fixed_rollout(tok) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts of PROMPT_LENS, completions of COMPLETION_LENS ending in EOS (none when the length is T),
    pad after it, attention 1 over the whole completion: the layout train.generate returns."""
    g = torch.Generator().manual_seed(0)
    B = len(PROMPT_LENS)
    ids, att, mask = torch.full((B, P + T), tok.pad_token_id), torch.zeros(B, P + T, dtype=torch.long), torch.zeros(B, T)
    for i, (p, c) in enumerate(zip(PROMPT_LENS, COMPLETION_LENS)):
        ids[i, P - p : P + c] = torch.randint(4, len(tok), (p + c,), generator=g)  # ordinary characters
        if c < T:
            ids[i, P + c - 1] = tok.eos_token_id
        att[i, P - p :] = 1
        mask[i, :c] = 1
    return ids, att, mask


def per_position_logprobs(model, ids, att, mask, temperature: float):
    """Each sequence alone, its padding cut off, positions 0..n−1: log softmax(z_{pos−1}/τ)[token_pos] and the entropy
    of softmax(z_{pos−1}/τ), for every completion position pos (the one-token shift). Lists of (c,) tensors."""
    lps, ents, unshifted = [], [], []
    for i in range(ids.shape[0]):
        start, c = int((att[i, :P] == 0).sum()), int(mask[i].sum())
        seq = ids[i, start : P + c]  # the real prompt tokens + c completion tokens
        logits = model(input_ids=seq[None]).logits[0].float() / temperature  # (n, V)
        pos = torch.arange(P - start, P - start + c)  # completion positions in seq
        logp = torch.log_softmax(logits, -1)  # (n, V)
        lps.append(logp[pos - 1, seq[pos]])
        ents.append(-(logp[pos - 1].exp() * logp[pos - 1]).sum(-1))
        unshifted.append(logp[pos, seq[pos]])  # what an off-by-one would compare against
    return lps, ents, unshifted


# ------------------------------------------------------------------ tier 2: invariants against independent loops

def tiny_gpt2(tok):
    """Learned absolute positions: left padding shifts them unless position_ids count real tokens only."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("arch,temperature", [("llama", 1.0), ("llama", 0.7), ("gpt2", 0.7)])
def test_sequence_logprobs_match_a_per_position_loop(tiny_dir, arch, temperature):
    tok = models.load_tokenizer(tiny_dir)
    model = plain_model(tiny_dir) if arch == "llama" else tiny_gpt2(tok)
    ids, att, mask = fixed_rollout(tok)
    with torch.no_grad():
        logprobs_, entropy = logprobs.sequence_logprobs(model, ids, att, P, temperature)  # (B, T)
        lps, ents, unshifted = per_position_logprobs(model, ids, att, mask, temperature)
    assert logprobs_.shape == entropy.shape == (len(PROMPT_LENS), T)
    for i, (lp, ent) in enumerate(zip(lps, ents)):
        c = len(lp)
        torch.testing.assert_close(logprobs_[i, :c], lp, atol=2e-5, rtol=0)
        torch.testing.assert_close(entropy[i, :c], ent, atol=2e-5, rtol=0)
        assert (lp < 0).all() and (ent > 0).all()
    # the comparison has teeth: the log-probs are far from uniform, so a one-token shift would be caught
    assert max((a - b).abs().max().item() for a, b in zip(lps, unshifted)) > 0.5
    assert torch.cat(lps).std() > 0.3


class FakePolicy(torch.nn.Module):
    """Stands in for a policy: generate returns hand-made completions (a parameter gives it a device)."""

    def __init__(self, completions: list[list[int]]):
        super().__init__()
        self.completions, self.calls = torch.tensor(completions), []
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, **kw):
        self.calls.append(kw)
        return torch.cat([input_ids, self.completions], 1)


def fake_run(tok, policy, max_new_tokens: int, temperature: float, **args) -> train.Run:
    eos = [tok.eos_token_id]
    sampler = sampling.Sampler(sample_config=sampling.neutral_generation_config(max_new_tokens, temperature, eos,
                                                                                 tok.pad_token_id),
                               greedy_config=sampling.neutral_generation_config(max_new_tokens, None, eos,
                                                                                 tok.pad_token_id), eos_ids=eos)
    return train.Run(args=train.Args(max_new_tokens=max_new_tokens, temperature=temperature, **args), rank=0, world=1,
                     device=torch.device("cpu"), tok=tok, train_rows=[], eval_rows=[], optimizers={}, base_lr={},
                     policy=policy, sampler=sampler)


def rows_of(tok, prompts: list[str]) -> list:
    return [data.PromptRow(text=p, answer="0", ids=tok(p)["input_ids"]) for p in prompts]


def test_sample_mask_runs_through_the_first_eos(tiny_dir, one_process_group):
    tok = models.load_tokenizer(tiny_dir)
    E, pad = tok.eos_token_id, tok.pad_token_id
    d = tok.convert_tokens_to_ids(list("123"))
    rows = [[d[0], d[1], E, d[2], d[2]],  # EOS in the middle, tokens after it
            [E, d[0], E, d[1], d[1]],  # two EOS: the first one ends it
            [d[0], d[1], d[2], d[0], d[1]],  # no EOS: truncated
            [d[2], d[2], d[2], d[2], E]]  # EOS on the last allowed token: not truncated
    policy = FakePolicy(rows)
    ro = train.sample(fake_run(tok, policy, 5, 0.9, mask_truncated=True), rows_of(tok, ["1+2=", "13+4=", "7+7=", "0+0="]),
                      repeat=1)
    assert ro.completion_mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert ro.loss_mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]  # truncated: out
    assert ro.texts == ["12", "", "12312", "3333"]
    assert ro.input_ids[:, ro.n_prompt :].tolist() == [[d[0], d[1], E, pad, pad], [E, pad, pad, pad, pad], rows[2], rows[3]]
    assert ro.n_prompt == 5 and ro.attention_mask[:, ro.n_prompt :].eq(1).all()
    assert ro.attention_mask[1, : ro.n_prompt].tolist() == [1, 1, 1, 1, 1] and ro.attention_mask[0, 0] == 0  # left pad
    config = policy.calls[0]["generation_config"]
    assert config.max_new_tokens == 5 and config.eos_token_id == [E] and config.do_sample and config.temperature == 0.9
    # transformers stops early once every row has finished: the completion comes back shorter; greedy, repeat
    policy = FakePolicy([[d[0], E], [d[0], E], [E, pad], [E, pad]])
    run = fake_run(tok, policy, 5, 0.9)
    done = sampling.generate(policy, tok, [r.ids for r in rows_of(tok, ["1+2=", "3+4="])], run.sampler, greedy=True,
                             repeat=2)
    P_ = done.input_ids.shape[1] - done.completion_mask.shape[1]
    assert done.completion_mask.tolist() == [[1, 1]] * 2 + [[1, 0]] * 2  # trimmed to the longest completion
    assert done.input_ids.shape == (4, P_ + 2) and not done.truncated.any() and done.sampler_logprobs is None
    assert done.input_ids[0, :P_].tolist() == done.input_ids[1, :P_].tolist()  # repeat_interleave
    assert policy.calls[0]["generation_config"].do_sample is False


def rollout_invariants(ro: dict, tok) -> None:
    """A sample() rollout checked row by row: the mask is a prefix of ones ending at the first EOS, or all ones when
    no EOS (truncated); completion tokens after the mask are pad; the text is the decoded part before EOS."""
    comp = ro["input_ids"][:, ro["n_prompt"] :]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    for row, m, text in zip(comp.tolist(), ro["completion_mask"].tolist(), ro["texts"]):
        n = int(sum(m))
        trunc = row[n - 1] != eos
        assert m == [1.0] * n + [0.0] * (len(m) - n) and n >= 1
        assert eos not in row[: n - 1]
        assert not trunc or n == len(m)
        assert row[n:] == [pad] * (len(m) - n)
        assert text == tok.decode(row[: n if trunc else n - 1], skip_special_tokens=True)


# ------------------------------------------------------------------ tier 3: real runs, torchrun with 2 processes on CPU

@pytest.fixture(scope="module")
def fsdp_runs(tiny_dir, tmp_path_factory) -> tuple[Path, dict]:
    """A fixed batch through tests/_dist_worker.py: `update` on 1 rank; `update`, `generate` and `collectives` on 2
    ranks (one launch)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    model, tok = plain_model(tiny_dir), models.load_tokenizer(tiny_dir)
    ids, att, mask = fixed_rollout(tok)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        lp = logprobs.sequence_logprobs(model, ids, att, P, TEMPERATURE)[0]  # (B, T) the centre of the noise below
    batch = dict(input_ids=ids, attention_mask=att, mask=mask, n_prompt=P, group_size=G, temperature=TEMPERATURE,
                 beta=BETA, ent_coef=ENT_COEF, scores=torch.tensor(SCORES),
                 old_logprobs=lp + 0.3 * torch.randn(lp.shape, generator=g),  # ratios inside and outside 1 ± ε
                 ref_logprobs=lp + 0.3 * torch.randn(lp.shape, generator=g),
                 old_values=0.1 * torch.randn(lp.shape, generator=g),
                 critic_head=0.3 * torch.randn(1, 32, generator=g),
                 logprobs_now=lp,  # π_θ's own: with them as log π_θold, ρ ≡ 1 (up to the sharded forward's rounding)
                 sampler_noise=0.4 * torch.randn(lp.shape, generator=g))  # p_sampler ≠ π_θold, by this much
    torch.save(batch, tmp / "batch.pt")
    run([WORKER, "update", tiny_dir, str(tmp)], tmp, nproc=1, retry_abort=True)
    run([WORKER, "update,generate,collectives,loading", tiny_dir, str(tmp)], tmp, nproc=2, retry_abort=True)
    return tmp, batch


def test_generate_gathers_parameters_once_per_rollout(tiny_dir, fsdp_runs):
    out = torch.load(fsdp_runs[0] / "generate.pt", weights_only=False)
    n_modules = 2 + 1  # fully_shard on each of the 2 decoder layers and on the root (BLOCKS_FROM = 0 in the worker)
    assert out["n_fsdp_modules"] == n_modules
    for counts in out["counts_per_rank"]:
        for T_ in (2, 8):
            c = dict(counts[f"train.sample T={T_}"])
            # one all_reduce: the longest completion over ranks (sampling.generate pads every rank's batch to it)
            assert c.pop("all_reduce", 0) == 1
            # FSDP2 (torch 2.13) all-gathers through dist.all_gather_single: one per FSDP module, independent of T
            assert c == {"all_gather_single": n_modules}
        # the control: without train.unsharded each of the 2 blocks is gathered again for each of the 8 forwards
        assert counts["plain policy.generate T=8"]["all_gather_single"] >= 8 * 2
    tok = models.load_tokenizer(tiny_dir)
    for T_ in (2, 8):
        rollout_invariants(out["rollouts"][T_], tok)
    ro = out["rollouts"][8]
    truncated = ro["completion_mask"].all(1) & (ro["input_ids"][:, -1] != tok.eos_token_id)
    assert truncated.any() and not truncated.all()  # both branches of the mask were exercised


def test_small_models_are_one_fsdp_unit_large_ones_one_per_block(tiny_dir, one_process_group, monkeypatch):
    """models.shard: below BLOCKS_FROM parameters the root is the only FSDP2 unit (one all-gather per forward instead
    of one per block); from it on, each transformer block is a unit of its own (what bounds a large model's memory)."""
    from torch.distributed.fsdp import FSDPModule

    units = lambda model: sum(isinstance(m, FSDPModule) for m in model.modules())  # noqa: E731
    assert units(models.shard(plain_model(tiny_dir), False)) == 1
    monkeypatch.setattr(models, "BLOCKS_FROM", sum(p.numel() for p in plain_model(tiny_dir).parameters()))
    assert units(models.shard(plain_model(tiny_dir), False)) == 2 + 1


def grpo_reference_update(tiny_dir: str, batch: dict, loss_agg: str, max_grad_norm: float, lr: float):
    """GRPO typed out again for one unsharded model, one sequence at a time: loss and parameters after one SGD step."""
    model = plain_model(tiny_dir)
    adv = []
    for g in range(0, len(SCORES), G):
        r = SCORES[g : g + G]
        # A_i = (R_i − mean R) / (std R + 1e-6), std with Bessel's correction
        adv += [(x - statistics.mean(r)) / (statistics.stdev(r) + 1e-6) for x in r]
    lps, ents, _ = per_position_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["mask"], TEMPERATURE)
    per_seq = []
    for i, (lp, A) in enumerate(zip(lps, adv)):
        old, ref = batch["old_logprobs"][i, : len(lp)], batch["ref_logprobs"][i, : len(lp)]
        ratio = torch.exp(lp - old)
        pg = torch.maximum(-ratio * A, -ratio.clamp(0.8, 1.2) * A)
        k3 = torch.exp(ref - lp) - (ref - lp) - 1
        per_seq.append(pg + BETA * k3)
    n_tokens = sum(COMPLETION_LENS)
    if loss_agg == "seq-mean-token-mean":
        loss = sum(s.mean() for s in per_seq) / len(per_seq)
    elif loss_agg == "token-mean":
        loss = sum(s.sum() for s in per_seq) / n_tokens
    else:  # seq-mean-token-sum-norm: a constant normaliser B·T_max
        loss = sum(s.sum() for s in per_seq) / (len(per_seq) * T)
    loss = loss - ENT_COEF * sum(e.sum() for e in ents) / n_tokens  # the entropy bonus is a token mean
    loss.backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad * min(1.0, max_grad_norm / (norm.item() + 1e-6))
    return loss.item(), dict(model.named_parameters())


def ppo_reference_update(tiny_dir: str, batch: dict, minibatches: list, lr: float, critic_lr: float):
    """PPO typed out again for one unsharded policy and critic, one sequence at a time, plain SGD: KL-shaped rewards,
    GAE, global whitening, then for each minibatch (a list of row numbers, in the order the trainer takes them) the
    clipped surrogate, minus c_h·entropy, plus c_v × the value loss clipped around V_old, with the critic read at
    position P + t − 1. Returns the mean loss over the minibatches and both models' parameters after the last step.

    Catches: the entropy bonus added with the wrong sign; old_values or value_clip dropped on the way to the value loss;
    the critic read at the wrong position; a wrong vf_coef; whitening per rank instead of globally."""
    from transformers import AutoModelForTokenClassification

    policy = plain_model(tiny_dir)
    critic = AutoModelForTokenClassification.from_pretrained(tiny_dir, num_labels=1, dtype=torch.float32).eval()
    with torch.no_grad():
        critic.score.weight.copy_(batch["critic_head"])
        critic.score.bias.zero_() if critic.score.bias is not None else None
    ids, att, mask = batch["input_ids"], batch["attention_mask"], batch["mask"]
    old, ref, v_old = batch["old_logprobs"], batch["ref_logprobs"], batch["old_values"]
    lengths = [int(m.sum()) for m in mask]
    adv, ret = [], []
    for i, c in enumerate(lengths):
        # r_t = −β (log π_old − log π_ref), + R at the last token
        r = [-BETA * (old[i, t] - ref[i, t]).item() + (SCORES[i] if t == c - 1 else 0.0) for t in range(c)]
        v = v_old[i, :c].tolist() + [0.0]
        delta = [r[t] + 1.0 * v[t + 1] - v[t] for t in range(c)]  # γ = 1
        a = [sum((1.0 * 0.95) ** k * delta[t + k] for k in range(c - t)) for t in range(c)]  # λ = 0.95
        adv.append(a)
        ret.append([a[t] + v[t] for t in range(c)])
    flat = [x for a in adv for x in a]
    mean, std = statistics.mean(flat), statistics.stdev(flat)
    adv = [[(x - mean) / (std + 1e-8) for x in a] for a in adv]
    losses = []
    for rows in minibatches:
        n_tok = sum(lengths[i] for i in rows)
        lps, ents, _ = per_position_logprobs(policy, ids[rows], att[rows], mask[rows], TEMPERATURE)
        loss = 0.0
        for (i, lp, ent) in zip(rows, lps, ents):
            A = torch.tensor(adv[i])
            ratio = torch.exp(lp - old[i, : len(lp)])
            pg = torch.maximum(-ratio * A, -ratio.clamp(0.8, 1.2) * A)
            start = int((att[i, :P] == 0).sum())
            hidden = critic(input_ids=ids[i : i + 1, start : P + lengths[i]]).logits[0, :, 0]  # (n,) this sequence alone
            V = hidden[P - start - 1 : P - start - 1 + lengths[i]]  # V(s_t) at position P + t − 1
            R, Vo = torch.tensor(ret[i]), v_old[i, : lengths[i]]
            v_loss = torch.maximum((V - R) ** 2, (Vo + (V - Vo).clamp(-0.2, 0.2) - R) ** 2)
            loss = loss + (pg.sum() - ENT_COEF * ent.sum() + 0.5 * v_loss.sum()) / n_tok
        loss.backward()
        with torch.no_grad():
            for model, step in ((policy, lr), (critic, critic_lr)):
                for p in model.parameters():
                    if p.grad is not None:
                        p -= step * p.grad
                        p.grad = None
        losses.append(loss.item())
    return statistics.mean(losses), dict(policy.named_parameters()), dict(critic.named_parameters())


def trainer_minibatches(world: int, B: int, minibatch: int, epochs: int) -> list:
    """The rows of each minibatch in the order the trainer takes them on `world` ranks: each rank shuffles its own
    contiguous rows with the seed (seed 0, step 1, epoch, rank) and takes minibatch / world of them at a time."""
    per_rank, mb = B // world, minibatch // world
    out = []
    for epoch in range(epochs):
        orders = [torch.randperm(per_rank, generator=torch.Generator().manual_seed(distributed.seed_for(0, 1, epoch, r)))
                  if mb < per_rank else torch.arange(per_rank) for r in range(world)]
        out += [[r * per_rank + int(i) for r in range(world) for i in orders[r][k : k + mb]] for k in range(0, per_rank, mb)]
    return out


def test_fsdp_one_rank_equals_two_ranks_and_a_plain_update(tiny_dir, fsdp_runs):
    """One rank (the plain module `python train.py` trains) and two (FSDP2) give the same logged row and update; GRPO's
    equals an update typed out by hand on one sequence at a time, PPO's (minibatches and epochs) likewise on each."""
    from _dist_worker import CASES, CRITIC_LR, LR

    tmp, batch = fsdp_runs
    assert batch["mask"][:4].sum() != batch["mask"][4:].sum()  # the halves differ in token count (see COMPLETION_LENS)
    results = {w: torch.load(tmp / f"update_w{w}.pt", weights_only=False) for w in (1, 2)}
    assert set(results[1]) == set(results[2]) and {c[0] for c in CASES} <= set(results[1])
    start = {n: p.detach() for n, p in plain_model(tiny_dir).named_parameters()}
    start_critic = {n: p for n, p in start.items() if n.startswith("model.")} | {"score.weight": batch["critic_head"]}
    for case, algo, loss_agg, max_norm, epochs, minibatch, micro in CASES:
        one, two = results[1][case], results[2][case]
        for part, before in (("policy", start), ("critic", start_critic))[: 2 if algo == "ppo" else 1]:
            assert set(before) <= set(one[part])
            # the update moved the weights by far more than the tolerance below
            assert max((one[part][n] - before[n]).abs().max().item() for n in before) > 1e-4, (case, part)
        assert math.isclose(one["row"]["reward_mean"], statistics.mean(SCORES), rel_tol=1e-6)
        assert math.isclose(one["row"]["reward_std"], statistics.stdev(SCORES), rel_tol=1e-6)
        assert one["row"]["frac_reward_zero_std"] == 0.25  # one of the four groups, (1.0, 1.0), has equal rewards
        assert one["row"]["completion_len_mean"] == statistics.mean(COMPLETION_LENS)
        torch.testing.assert_close(one["advantages"], two["advantages"], atol=1e-6, rtol=0)
        if algo == "ppo":  # checked against the reference on each world size (minibatches differ between them)
            B = len(SCORES)
            assert one["row"]["minibatches_taken"] == epochs * B // (minibatch or B)
            for w, res in ((1, one), (2, two)):
                ref_loss, ref_policy, ref_critic = ppo_reference_update(tiny_dir, batch, trainer_minibatches(w, B, minibatch or B, epochs), LR, CRITIC_LR)
                assert math.isclose(res["row"]["loss"], ref_loss, rel_tol=0, abs_tol=1e-5), (case, w, res["row"]["loss"], ref_loss)
                for n, p in ref_policy.items():
                    torch.testing.assert_close(res["policy"][n], p.detach(), atol=1e-5, rtol=0, msg=f"{case} w{w} policy {n}")
                for n, p in ref_critic.items():
                    torch.testing.assert_close(res["critic"][n], p.detach(), atol=1e-5, rtol=0, msg=f"{case} w{w} critic {n}")
            continue
        # the logged row and the update: the same on 1 and 2 ranks (one minibatch: the same rows either way)
        assert set(one["row"]) == set(two["row"])
        for k in set(one["row"]):
            a, b = one["row"][k], two["row"][k]
            assert (a is None and b is None) or math.isclose(a, b, rel_tol=0, abs_tol=1e-6), (case, k, a, b)
        for n in one["policy"]:
            torch.testing.assert_close(one["policy"][n], two["policy"][n], atol=1e-6, rtol=0, msg=f"{case} policy {n}")
        # GRPO: world 1 (and so world 2) equals the update written out by hand on the unsharded model
        ref_loss, ref_params = grpo_reference_update(tiny_dir, batch, loss_agg, max_norm, LR)
        assert math.isclose(one["row"]["loss"], ref_loss, rel_tol=0, abs_tol=1e-5), (case, one["row"]["loss"], ref_loss)
        for n, p in ref_params.items():
            torch.testing.assert_close(one["policy"][n], p.detach(), atol=1e-5, rtol=0, msg=f"{case} vs reference {n}")
        if max_norm < 1:  # clipped SGD moves the parameters by exactly lr × max_grad_norm
            step = torch.sqrt(sum(((one["policy"][n] - start[n]) ** 2).sum() for n in start))
            assert math.isclose(step.item(), LR * max_norm, rel_tol=1e-3)
    # the three aggregations are different losses (the cases are not one case three times)
    losses = [results[1][c]["row"]["loss"] for c in ("grpo-seq-mean-token-mean", "grpo-token-mean", "grpo-seq-mean-token-sum-norm")]
    assert min(abs(x - y) for i, x in enumerate(losses) for y in losses[i + 1 :]) > 1e-4


def test_variants_on_one_rank_equal_two_ranks_and_their_definitions(fsdp_runs):
    """The 2024-25 variants inside the trainer's step, on the fixed batch (tests/_dist_worker.py VARIANTS, DYNAMIC): the
    logged row and the update are the same on 1 and 2 ranks, and each variant computes what its paper defines, the
    expectation written out here."""
    from _dist_worker import DYNAMIC, VARIANTS

    tmp, batch = fsdp_runs
    res = {w: torch.load(tmp / f"update_w{w}.pt", weights_only=False) for w in (1, 2)}
    for name in [v[0] for v in VARIANTS] + [d[0] for d in DYNAMIC]:
        one, two = res[1][name], res[2][name]
        assert set(one["row"]) == set(two["row"]), name
        for k, a in one["row"].items():
            b = two["row"][k]
            assert (a is None and b is None) or math.isclose(a, b, rel_tol=0, abs_tol=1e-6), (name, k, a, b)
        for n in one["policy"]:
            torch.testing.assert_close(one["policy"][n], two["policy"][n], atol=1e-6, rtol=0, msg=f"{name} {n}")
    one = res[1]
    groups = [SCORES[i : i + G] for i in range(0, len(SCORES), G)]
    # RLOO: R_i minus the mean of the other members of its group
    rloo = [r - (sum(g) - r) / (len(g) - 1) for g in groups for r in g]
    torch.testing.assert_close(one["rloo"]["advantages"], torch.tensor(rloo), atol=1e-6, rtol=0)
    # REINFORCE++-baseline: R_i − the group mean, then whitened over every completion token of the batch (each
    # sequence's value counted once per token: a token-weighted mean, and the Bessel-corrected token variance)
    centred = [r - sum(g) / len(g) for g in groups for r in g]
    n = sum(COMPLETION_LENS)
    mu = sum(c * k for c, k in zip(centred, COMPLETION_LENS)) / n
    sd = math.sqrt(sum(k * (c - mu) ** 2 for c, k in zip(centred, COMPLETION_LENS)) / (n - 1))
    torch.testing.assert_close(one["reinforce-pp-baseline"]["advantages"],
                               torch.tensor([(c - mu) / (sd + 1e-8) for c in centred]), atol=1e-5, rtol=0)
    # GSPO at θ = θold takes the token-level surrogate's step (seq-mean-token-mean), away from it another one
    for n_ in one["token-at-old"]["policy"]:
        torch.testing.assert_close(one["gspo-at-old"]["policy"][n_], one["token-at-old"]["policy"][n_], atol=1e-6, rtol=0)
    moved = max((one["gspo"]["policy"][k] - one["grpo-seq-mean-token-mean"]["policy"][k]).abs().max().item()
                for k in one["gspo"]["policy"])
    assert moved > 1e-4
    # the sampler–trainer correction: p_sampler = π_θold weighs every token by exactly 1, the same update as without it
    row = one["correction-equal"]["row"]
    assert (row["sampler_weight_mean"], row["sampler_frac_truncated"], row["sampler_frac_masked"]) == (1.0, 0.0, 0.0)
    for k, p in one["grpo-seq-mean-token-mean"]["policy"].items():
        torch.testing.assert_close(one["correction-equal"]["policy"][k], p, atol=1e-7, rtol=0)
    # and with p_sampler = π_θold·e^noise: w_t = min(e^−noise_t, 1.5), 0 for a sequence whose Π_t e^−noise_t leaves
    # [1/1.5, 1.5]; the logged mean weight, fraction truncated and fraction masked, token by token
    w_sum = cut = masked = 0
    for i in range(len(SCORES)):
        ratios = [math.exp(-batch["sampler_noise"][i, t].item()) for t in range(COMPLETION_LENS[i])]
        seq = math.prod(ratios)
        keep = 1 / 1.5 <= seq <= 1.5
        masked += not keep
        cut += sum(r > 1.5 for r in ratios)
        w_sum += keep * sum(min(r, 1.5) for r in ratios)
    row = one["correction"]["row"]
    assert 0 < masked < len(SCORES) and cut > 0  # both branches, on this batch
    assert math.isclose(row["sampler_weight_mean"], w_sum / n, rel_tol=1e-5)
    assert math.isclose(row["sampler_frac_truncated"], cut / n, rel_tol=1e-6)
    assert math.isclose(row["sampler_frac_masked"], masked / len(SCORES), rel_tol=1e-6)
    moved = max((one["correction"]["policy"][k] - p).abs().max().item()
                for k, p in one["grpo-seq-mean-token-mean"]["policy"].items())
    assert moved > 1e-5, "the weights reached the update"


def test_dynamic_sampling_keeps_groups_with_a_spread_in_the_datas_order(fsdp_runs):
    """--dynamic-sampling (DAPO): draw 1 has one group with a spread (group 1), draw 2 three (groups 0, 2, 3); the step
    keeps those four, in the order drawn, on 1 and 2 ranks alike (the test above); capped at one draw, it keeps
    group 1 and tops up with draw 1's equal-reward groups. Scores and advantages of the rows kept, by hand."""
    from _dist_worker import DRAW_SCORES

    tmp, _ = fsdp_runs
    for w in (1, 2):
        res = torch.load(tmp / f"update_w{w}.pt", weights_only=False)
        d1, d2 = DRAW_SCORES[1], DRAW_SCORES[2]
        for name, kept, draws, flat_drawn in (("dynamic", d1[2:4] + d2[0:2] + d2[4:8], 2, 4 / 8),
                                               ("dynamic-topped-up", d1[2:4] + d1[0:2] + d1[4:8], 1, 3 / 4)):
            out = res[name]
            assert out["scores"].tolist() == pytest.approx(kept)
            assert out["draws"] == draws and out["row"]["sample_batches"] == draws
            assert out["row"]["frac_reward_zero_std_drawn"] == flat_drawn
            pairs = [kept[i : i + 2] for i in range(0, 8, 2)]
            assert out["row"]["frac_reward_zero_std"] == sum(a == b for a, b in pairs) / 4
            # GRPO's A for a pair (a, b): ±(a − b)/2 over the Bessel std |a − b|/√2 (+ 1e-6), 0 for a = b
            adv = [(x - (a + b) / 2) / (abs(a - b) / math.sqrt(2) + 1e-6) for a, b in pairs for x in (a, b)]
            torch.testing.assert_close(out["advantages"], torch.tensor(adv), atol=1e-5, rtol=0)


def test_micro_batches_give_the_update_of_one_big_batch(fsdp_runs):
    """Gradient accumulation over micro-batches of one sequence, every --loss-agg and PPO, on 1 and 2 ranks: the same
    parameters (to fp32 rounding) as one forward/backward over the whole minibatch. Catches a per-micro-batch
    normaliser (a mean of micro-batch means), or gradients zeroed between micro-batches."""
    tmp, _ = fsdp_runs
    for w in (1, 2):
        res = torch.load(tmp / f"update_w{w}.pt", weights_only=False)
        for case in ("grpo-seq-mean-token-mean", "grpo-token-mean", "grpo-seq-mean-token-sum-norm", "ppo"):
            big, micro = res[case], res[case + "-micro1"]
            assert math.isclose(big["row"]["loss"], micro["row"]["loss"], rel_tol=0, abs_tol=1e-6), (w, case)
            for part in ("policy", "critic") if case == "ppo" else ("policy",):
                for n in big[part]:
                    torch.testing.assert_close(micro[part][n], big[part][n], atol=1e-6, rtol=0, msg=f"w{w} {case} {part} {n}")


def test_rank_0_alone_reads_the_checkpoint_and_the_shards_equal_it(tiny_dir, fsdp_runs):
    """Loading at scale: on 2 ranks only rank 0 builds a full model in host memory; every rank gets its shard by
    broadcast, and the gathered parameters (and the RoPE buffers, which are not in the state dict) equal the checkpoint.
    Catches: every rank calling from_pretrained; a shard left uninitialised after to_empty (garbage, not zeros);
    buffers left uninitialised; the critic's head not zeroed (V ≡ 0 at first, document 004)."""
    from transformers import AutoModelForTokenClassification

    out = torch.load(fsdp_runs[0] / "loading.pt", weights_only=False)
    assert out["calls"] == [["policy", "critic"], []]  # rank 0 loaded both models once; rank 1 never did
    n_params = sum(math.prod(s) for s in out["shapes"])
    assert sum(out["local_numel"]) == n_params and 0 < out["local_numel"][1] < n_params  # both ranks hold a share
    disk = plain_model(tiny_dir)
    for n, p in disk.named_parameters():
        assert torch.equal(out["policy"][n], p.detach()), n
    for n, b in disk.named_buffers():
        assert torch.equal(out["policy_buffers"][n], b), n
    critic = AutoModelForTokenClassification.from_pretrained(tiny_dir, num_labels=1)
    for n, p in critic.named_parameters():
        expected = torch.zeros_like(p) if n.startswith("score.") else p.detach()
        assert torch.equal(out["critic"][n], expected), n


HELPERS = {"all_reduce", "all_gather_cat", "all_gather_objects", "broadcast_from_rank0"}  # distributed.py's collective helpers
PRODUCT = ("distributed.py", "models.py", "data.py", "checkpoints.py", "metrics.py", "scoring.py", "optim.py",
           "run_dir.py", "train.py", "sampling.py", "logprobs.py", "sft.py", "reward_model.py", "embedded_task.py")


def test_every_collective_of_a_step_is_on_the_group_device(fsdp_runs):
    """One PPO and one GRPO step on 2 ranks (sampling, rewards, reference, critic, whitening, update, metrics), every
    torch.distributed collective recorded: each tensor is on the process group's device, and each call is made by
    distributed.py's helpers (which move tensors to that device) or by torch itself (FSDP2), never straight from train.py.
    Catches e.g. `dist.all_reduce(torch.tensor([...]))` in the metrics: a CPU tensor that NCCL would refuse. On this CPU
    machine the group's device is the CPU, so the second check is the one that sees such a call here."""
    seen = torch.load(fsdp_runs[0] / "collectives.pt", weights_only=False)
    for algo, seen_by in seen.items():
        calls, device = seen_by["calls"], seen_by["group_device"]
        assert device == "cpu" and {"all_reduce", "all_gather", "all_gather_single"} <= {c["fn"] for c in calls}, algo
        for c in calls:
            assert set(c["devices"]) <= {device}, (algo, c)
            file, fn = c["caller"][-1]
            assert (file == "distributed.py" and fn in HELPERS) or file not in PRODUCT, (algo, c)


def test_logged_clipfrac_and_approx_kl_do_not_depend_on_world_size(fsdp_runs):
    one, two = (torch.load(fsdp_runs[0] / f"update_w{w}.pt", weights_only=False)["grpo-token-mean"]["row"] for w in (1, 2))
    for k in ("clipfrac", "approx_kl"):
        assert math.isclose(one[k], two[k], rel_tol=0, abs_tol=1e-6), (k, one[k], two[k])


@pytest.mark.parametrize("case", ["ppo", "grpo-token-mean"])
def test_logged_kl_is_the_rollout_kl_to_the_reference(fsdp_runs, case):
    tmp, batch = fsdp_runs
    row = torch.load(tmp / "update_w2.pt", weights_only=False)[case]["row"]
    # KL(π_θold ‖ π_ref) by k3 on the sampled tokens: mean over completion tokens of (r − 1 − log r), r = π_ref/π_θold
    logr = (batch["ref_logprobs"] - batch["old_logprobs"]).double()
    k3 = (logr.exp() - 1 - logr) * batch["mask"]
    assert math.isclose(row["kl"], (k3.sum() / batch["mask"].sum()).item(), rel_tol=1e-5)


def ledger_bytes_rank0_of_2(model) -> int:
    """16 B/param (fp32 weight, grad, Adam m, v) on rank 0's ⌈d_0/2⌉ rows + a 4-byte Adam step per tensor."""
    params = list(model.parameters())
    return 16 * sum(math.ceil(p.shape[0] / 2) * p[0].numel() for p in params) + 4 * len(params)


@pytest.mark.parametrize("algo,extra", [("ppo", [])])  # GRPO on 2 ranks: tests/test_variant_flags.py, test_faults.py
def test_torchrun_two_ranks_end_to_end(algo, extra, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    out = tmp_path / "out"
    p = run(["train.py", "--algo", algo, "--sft-steps", "10", "--out", str(out), *TINY, *extra], tmp_path, nproc=2)
    sft_model = out / "sft" / "hf"  # the warm start: the sft stage ran first, into OUT/sft
    assert "2 rank(s) on cpu" in p.stdout
    train_rows, eval_rows = read_metrics(out)
    assert [r["step"] for r in train_rows] == [1, 2] and [r["step"] for r in eval_rows] == [0, 1, 2]
    keys = TRAIN_KEYS | ({"value_loss", "explained_variance"} if algo == "ppo" else set())
    for r in train_rows:
        assert keys <= set(r), keys - set(r)
        assert 0 <= r["reward_mean"] <= 1 and r["reward_std"] >= 0 and 0 <= r["frac_reward_zero_std"] <= 1
        assert 1 <= r["completion_len_mean"] <= 4 and 0 <= r["clipfrac"] <= 1 and r["approx_kl"] >= 0 and r["entropy"] > 0
        # tokens_per_s = (completion tokens of all 4 × 4 sequences) / step time
        assert math.isclose(r["tokens_per_s"] * r["step_time_s"], r["completion_len_mean"] * 16, rel_tol=1e-9)
        assert (r["kl"] is None) == (algo == "ppo") and (r["kl"] is None or r["kl"] >= 0)  # k3 ≥ 0
    for r in eval_rows:
        assert 0 <= r["eval_accuracy"] <= 1 and (r["eval_accuracy"] * 16) % 1 == 0  # k correct of 16 prompts
    if algo == "ppo":  # the critic's head starts at zero: V ≡ 0 explains nothing, EV = 1 − Var[R]/Var[R] = 0
        ev = train_rows[0]["explained_variance"]
        assert ev == 0.0 or (ev is None and train_rows[0]["reward_std"] == 0)  # null (NaN): returns all equal
    memory = json.loads((out / "memory.json").read_text())
    assert memory["world_size"] == 2 and memory["predicted_bytes"] == memory["measured_bytes"]
    expected = {"policy": ledger_bytes_rank0_of_2(AutoModelForCausalLM.from_pretrained(sft_model))}
    if algo == "ppo":
        critic = AutoModelForTokenClassification.from_pretrained(sft_model, num_labels=1)
        expected["critic"] = ledger_bytes_rank0_of_2(critic)
    assert memory["predicted_bytes"] == expected
    ckpt = out / "checkpoints" / "step_000002"
    assert json.loads((ckpt / "meta.json").read_text())["step"] == 2
    assert sorted(f.name for f in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard per rank


def test_unset_options_take_model_dependent_defaults():
    """The embedded task's tuned values (options.resolve_defaults) never leak into a --model run, and an explicit
    value, zero included, always wins."""
    close = lambda xs, ys: all(math.isclose(x, y, rel_tol=1e-12) for x, y in zip(xs, ys, strict=True))
    parse = lambda argv: options.resolve_defaults(options.parse_args(train.Args, argv), 1)
    embedded = parse(["--algo", "ppo"])
    assert close((embedded.lr, embedded.critic_lr, embedded.ent_coef), (1e-3, 5e-3, 0.08))
    assert parse([]).ent_coef == 0.05  # GRPO
    llm = parse(["--model", "org/name", "--lr", "2e-6"])
    assert close((llm.lr, llm.critic_lr), (2e-6, 1e-5)) and llm.ent_coef == 0.0
    explicit = parse(["--ent-coef", "0", "--critic-lr", "7e-4"])
    assert explicit.ent_coef == 0.0 and explicit.critic_lr == 7e-4 and explicit.lr == 1e-3


@pytest.fixture(scope="module")
def arithmetic_files(tmp_path_factory) -> Path:
    """50 'a+b=' rows under custom column names, as .jsonl and as .parquet (written by datasets)."""
    import datasets

    root = tmp_path_factory.mktemp("local")
    rows = [{"problem": f"{a}+{b}=", "solution": str(a + b)} for a in range(5, 15) for b in (1, 3, 8, 12, 20)]
    with open(root / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    datasets.Dataset.from_list(rows).to_parquet(str(root / "rows.parquet"))
    return root


@pytest.mark.parametrize("algo,ext", [("grpo", "jsonl"), ("ppo", "parquet")])
def test_local_model_dir_and_dataset_file_with_custom_columns(tiny_dir, arithmetic_files, algo, ext, tmp_path):
    out = tmp_path / "out"
    p = run(["train.py", "--algo", algo, "--model", tiny_dir, "--dataset", str(arithmetic_files / f"rows.{ext}"),
             "--prompt-column", "problem", "--answer-column", "solution", "--out", str(out), *TINY, "--steps", "1"], tmp_path)
    # the file has no 'question'/'answer' columns, so the custom ones were used; one file is the train split, and
    # min(--eval-size 16, 50 // 5) = 10 of its rows are held out for evaluation
    assert "40 train / 10 eval rows" in p.stdout
    assert not (out / "sft").exists() and not (out / "embedded_model").exists()  # the given model was used
    train_rows, eval_rows = read_metrics(out)
    assert [r["step"] for r in train_rows] == [1] and [r["step"] for r in eval_rows] == [0, 1]
    assert TRAIN_KEYS | ({"value_loss", "explained_variance"} if algo == "ppo" else set()) <= set(train_rows[0])
    assert (out / "checkpoints" / "step_000001" / "meta.json").exists()
