"""reward_model.py — the reward-model stage of document 004 ("4. The Reward Model"): a scalar head on a causal LM,
trained on preference pairs with the Bradley–Terry model, its score read at the last real token of prompt + response.

    P(y_c ≻ y_r | x) = σ(r_φ(x, y_c) − r_φ(x, y_r))
    L_RM(φ) = −(1/N) Σ log σ(r_φ(x, y_c) − r_φ(x, y_r) − m)            rewards.bradley_terry_loss (m: optional margin)

The model is transformers' AutoModelForSequenceClassification with one label, started from a causal LM checkpoint
(the SFT model, as document 004 suggests): the backbone carries over, the head hidden_dim → 1 is new. Its score is
read at the last position whose attention mask is 1 (scoring.last_token_scores), never by the pad id.

Data follow TRL's convention: columns `chosen` and `rejected`, an optional `prompt` (without it the prompt is
implicit, inside both texts), an optional `margin`; plain text, or conversations (lists of {"role", "content"}) that
go through the chat template. A pair longer than --max-length tokens is dropped, and counted (TRL drops too).

Without a preference data set (no --dataset, or one of prompts and answers: no `chosen` column) the stage collects
its comparisons the way document 004 says they are collected (sampled_comparisons): for each training prompt,
--comparison-rounds rounds of two samples of the --model policy, ranked by an annotator, here the verifiable checker
(rewards.math_reward): the correct one is chosen. Ties (both right, both wrong, or the same text) are dropped, and a
pair drawn again is kept once; a fifth of the prompts' pairs are held out for evaluation. The
export, OUT/hf, loads as it is with --reward-model; its config carries `reward_mean` and `reward_std`, the scores'
mean and std on the held-out pairs (OpenRLHF stores the same), with which --reward-model standardises the score, and
`reward_pairs`, how many pairs they come from.

| symbol       | variable         | shape | meaning                                         |
|--------------|------------------|-------|-------------------------------------------------|
| r_φ(x, y_c)  | chosen_rewards   | (b,)  | score of prompt + chosen response, at its last token  |
| r_φ(x, y_r)  | rejected_rewards | (b,)  | score of prompt + rejected response, at its last token |
| m            | margin           | (b,)  | per-pair margin (0 without a `margin` column)    |
"""

import hashlib
import json
import os
from typing import NamedTuple

import numpy as np
import torch

import data
import distributed
import embedded_task
import metrics
import optim
import rewards as rewards_lib
import sampling
import scoring
from distributed import UserError, say


class Pair(NamedTuple):
    """One comparison, tokenised once."""

    chosen: list[int]  # scoring.reward_model_ids(prompt, chosen response): the tokens of prompt + response
    rejected: list[int]  # scoring.reward_model_ids(prompt, rejected response)
    margin: float  # 0.0 without a `margin` column


# ======================================================================================================================
# The step and the evaluation
# ======================================================================================================================
def pair_scores(run, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """r_φ of the chosen and the rejected texts of `pairs`, in one forward pass: (b,), (b,)."""
    ids, mask = rewards_lib.pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs],
                                      pad_id=run.tok.pad_token_id, padding_side="left")  # (2b, L)
    scores = scoring.last_token_scores(run.reward_model, ids.to(run.device), mask.to(run.device)).float()  # (2b,)
    return scores[: len(pairs)], scores[len(pairs) :]


def rm_step(run, step: int) -> dict:
    """One optimizer step on --prompts-per-step pairs, the step's slice of the epochs (data.rows_for_step);
    gradients accumulate over micro-batches, and the loss divides by the whole batch's pair count. Returns the logged
    row."""
    args, timer = run.args, metrics.StepTimer(run.device)
    _, mine = data.rows_for_step(len(run.train_rows), args.prompts_per_step, args.seed, step, run.rank,
                                 run.world)
    pairs = [run.train_rows[i] for i in mine]
    n_pairs = args.prompts_per_step / run.world  # the global count / world size: FSDP averages the gradients
    sums = dict.fromkeys(("loss", "pair_accuracy", "margin", "chosen_reward_mean", "rejected_reward_mean"), 0.0)
    for i in range(0, len(pairs), args.micro_batch_size):
        part = pairs[i : i + args.micro_batch_size]
        chosen, rejected = pair_scores(run, part)  # (b,), (b,)
        margin = torch.tensor([p.margin for p in part], device=run.device)  # (b,)
        loss = rewards_lib.bradley_terry_loss(chosen, rejected, margin, num_pairs=n_pairs)  # ()
        loss.backward()
        chosen, rejected = chosen.detach(), rejected.detach()
        sums["loss"] += loss.item()
        sums["pair_accuracy"] += (chosen > rejected).float().sum().item() / n_pairs
        sums["margin"] += (chosen - rejected).sum().item() / n_pairs
        sums["chosen_reward_mean"] += chosen.sum().item() / n_pairs
        sums["rejected_reward_mean"] += rejected.sum().item() / n_pairs
    update = optim.optimizer_step(run, args.max_grad_norm)
    timer.lap("update")
    row = dict(zip(sums, (x / run.world for x in distributed.global_sum(*sums.values()))))
    return row | update | {"step_time_s": timer.total()}


@torch.no_grad()
def evaluate(run) -> tuple[dict, list[dict]]:
    """Collective: scores of every held-out pair, split across ranks. eval_pair_accuracy is the fraction with
    r_c > r_r; eval_reward_mean and eval_reward_std are over all 2N held-out scores (what the export stores)."""
    mine = run.eval_rows[run.rank :: run.world]
    chosen, rejected = [], []
    for i in range(0, len(mine), run.args.micro_batch_size):
        c, r = pair_scores(run, mine[i : i + run.args.micro_batch_size])
        chosen += c.tolist()
        rejected += r.tolist()
    everyone = distributed.all_gather_objects((chosen, rejected))
    chosen = torch.tensor([x for c, _ in everyone for x in c], dtype=torch.float64)  # (N,)
    rejected = torch.tensor([x for _, r in everyone for x in r], dtype=torch.float64)  # (N,)
    both = torch.cat([chosen, rejected])  # (2N,)
    return {"eval_pair_accuracy": (chosen > rejected).double().mean().item(),
            "eval_loss": rewards_lib.bradley_terry_loss(chosen, rejected).item(),
            "eval_margin": (chosen - rejected).mean().item(), "eval_reward_mean": both.mean().item(),
            "eval_reward_std": both.std().item(), "eval_n": len(chosen)}, []


# ======================================================================================================================
# Data: preference pairs from a data set
# ======================================================================================================================
def has_pairs(args, name: str) -> bool:
    """Whether the data set `name` holds preference pairs (`chosen`, `rejected`); if not, it must hold prompts and
    answers (--prompt-column, --answer-column) to sample comparisons from, else one line names its columns."""
    columns = data.load_split(args, name, args.split).column_names
    if {"chosen", "rejected"} & set(columns):
        return True
    if not {args.prompt_column, args.answer_column} <= set(columns):
        raise UserError(f"dataset {name!r} has columns {', '.join(columns)}: --algo rm needs preference pairs "
                        f"(chosen, rejected, optional prompt and margin) or prompts and answers to sample comparisons "
                        f"from (--prompt-column {args.prompt_column!r}, --answer-column {args.answer_column!r})")
    return False


def load_pairs(args, tok, name: str) -> tuple[list[Pair], list[Pair]]:
    """Training and held-out Pairs of a preference data set (see the module docstring for its columns)."""
    train = data.load_split(args, name, args.split)
    evals = data.load_split(args, name, args.eval_split) if args.eval_size else None
    for ds in filter(None, (train, evals)):
        data.check_columns(ds, name, ["chosen", "rejected"], "a preference data set: chosen, rejected, and an "
                           "optional prompt and margin")
    pairs = tokenize_pairs(train, tok, args, f"{name!r} (split {args.split!r})")
    eval_pairs = tokenize_pairs(evals, tok, args, f"{name!r} (split {args.eval_split!r})") if evals is not None else []
    if evals is None and args.eval_size:
        n = min(args.eval_size, len(pairs) // 5)
        if n == 0:
            raise UserError(f"dataset {name!r}: {len(pairs)} pairs and no split {args.eval_split!r}: too few "
                            "to hold out an evaluation set (20% of them); give --eval-size 0 or --eval-split")
        say(f"dataset {name!r} has no split {args.eval_split!r}: the last {n} of {len(pairs)} pairs are held "
            "out")
        pairs, eval_pairs = pairs[: len(pairs) - n], pairs[len(pairs) - n :]
    return pairs, eval_pairs[: args.eval_size]


def tokenize_pairs(ds, tok, args, where: str) -> list[Pair]:
    """A Pair per row, as scoring.reward_model_ids tokenises what it scores; identical pairs are refused, pairs with a
    null response and pairs over --max-length tokens dropped and counted."""
    pairs, identical, too_long, null = [], [], 0, []
    margins = ds["margin"] if "margin" in ds.column_names else [0.0] * len(ds)
    prompts = ds["prompt"] if "prompt" in ds.column_names else [None] * len(ds)
    for i, (prompt, chosen, rejected, margin) in enumerate(zip(prompts, ds["chosen"], ds["rejected"], margins)):
        if not check_pair_types(prompt, chosen, rejected, where, i):
            null.append(i)
            continue
        prompt, chosen, rejected = pair_texts(tok, prompt, chosen, rejected, where, i)
        if chosen == rejected:
            identical.append(i)
            continue
        pair = Pair(chosen=scoring.reward_model_ids(tok, prompt, chosen),
                    rejected=scoring.reward_model_ids(tok, prompt, rejected), margin=float(margin or 0.0))
        if max(len(pair.chosen), len(pair.rejected)) > args.max_length:
            too_long += 1
            continue
        pairs.append(pair)
    if identical:
        rows = ", ".join(map(str, identical[:5]))
        raise UserError(f"dataset {where}: {len(identical)} pairs have the same chosen and rejected text "
                        f"(rows {rows}): a comparison needs two different responses")
    if null:
        say(f"dataset {where}: dropped {len(null)} of {len(ds)} pairs whose chosen or rejected response is "
            f"null (rows {data.first_rows(null)})")
    if too_long:
        say(f"dataset {where}: dropped {too_long} of {len(ds)} pairs longer than --max-length "
            f"{args.max_length} tokens")
    if not pairs:
        raise UserError(f"dataset {where}: no pair to train on")
    return pairs


def check_pair_types(prompt, chosen, rejected, where: str, row: int) -> bool:
    """False for a pair with a null response (dropped); a UserError for values that are neither texts nor
    conversations (lists of {"role", "content"} messages), or one of each. An empty text is a response a policy can
    give (EOS at once), so it is kept; an empty conversation is not."""
    if chosen is None or rejected is None:
        return False
    texts = all(isinstance(r, str) for r in (chosen, rejected)) and (prompt is None or isinstance(prompt, str))
    talks = all(isinstance(r, list) and r and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in r)
                for r in (chosen, rejected)) and (prompt is None or isinstance(prompt, list))
    if not (texts or talks):
        raise UserError(f"dataset {where}, row {row}: prompt, chosen and rejected must all be texts or all "
                        "conversations (lists of {'role', 'content'} messages), not "
                        f"{type(prompt).__name__}, {type(chosen).__name__} and {type(rejected).__name__}")
    return True


def pair_texts(tok, prompt, chosen, rejected, where: str, row: int) -> tuple[str, str, str]:
    """(prompt text, chosen response, rejected response). Conversations: the prompt is the messages before the last
    (or the `prompt` column), through the chat template with the assistant's turn opened; each response is the last
    message's content. Plain text without a prompt: the common prefix of the two texts is the prompt."""
    if isinstance(chosen, list):  # [{"role": ..., "content": ...}, ...]
        if not tok.chat_template:
            raise UserError(f"dataset {where} holds conversations, and the tokenizer of --model has no chat "
                            "template to write them with")
        messages = prompt if prompt is not None else chosen[:-1]
        if prompt is None and rejected[:-1] != messages:
            raise UserError(f"dataset {where}, row {row}: chosen and rejected conversations differ before "
                            "their last message, and there is no prompt column")
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, chosen[-1]["content"], rejected[-1]["content"]
    if prompt is None:
        prompt = os.path.commonprefix([chosen, rejected])
        return prompt, chosen[len(prompt) :], rejected[len(prompt) :]
    return str(prompt), str(chosen), str(rejected)


# ======================================================================================================================
# Comparisons sampled from the policy, the verifier annotating (a --dataset of prompts and answers, or none)
# ======================================================================================================================
HELD_OUT = 0.2  # this fraction of the prompts' pairs is held out


def fingerprint(model: str) -> str:
    """A short hash of a local checkpoint's weight files (a hub name stands for itself): comparisons sampled from
    another model are not reused."""
    if not os.path.isdir(model):
        return model
    digest = hashlib.sha256()
    for name in sorted(os.listdir(model)):
        if name.endswith((".safetensors", ".bin")):
            with open(os.path.join(model, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]


def sample_comparisons(policy, tok, rows: list, sampler: sampling.Sampler, seed: int, rounds: int) -> list[dict]:
    """Collective: `rounds` pairs of samples of every prompt (PromptRow), split across ranks, ranked by the checker.
    Returns every rank's comparisons: {prompt, chosen, rejected, group} where group is the prompt's index."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    found = []
    for r in range(rounds):
        torch.manual_seed(distributed.seed_for(seed, r, rank))
        mine = list(range(rank, len(rows), world))
        done = sampling.generate(policy, tok, [rows[i].ids for i in mine], sampler, repeat=2)
        for k, i in enumerate(mine):
            a, b = done.texts[2 * k], done.texts[2 * k + 1]
            right = [rewards_lib.math_reward(t, rows[i].answer) == 1.0 for t in (a, b)]
            if right[0] != right[1] and a != b:  # one right, one wrong: the checker prefers the right one
                chosen, rejected = (a, b) if right[0] else (b, a)
                found.append({"prompt": rows[i].text, "chosen": chosen, "rejected": rejected, "group": i})
    return [c for part in distributed.all_gather_objects(found) for c in part]


def distinct_pairs(comparisons: list[dict]) -> list[dict]:
    """Each (prompt, chosen, rejected) once, the first time it was drawn."""
    return list({(c["prompt"], c["chosen"], c["rejected"]): c for c in comparisons}.values())


def write_comparisons(path: str, comparisons: list[dict], n_prompts: int) -> None:
    """train.jsonl and test.jsonl of `comparisons`, each pair once (annotators do not label the same pair twice;
    measured, the number of distinct pairs is what the reward model's accuracy follows): the pairs of a random
    HELD_OUT of the prompts are the test set, so that no held-out prompt is trained on."""
    held = set(np.random.default_rng(0).permutation(n_prompts)[: int(HELD_OUT * n_prompts)].tolist())
    distinct = distinct_pairs(comparisons)
    os.makedirs(path, exist_ok=True)
    for name, part in (("train.jsonl", [c for c in distinct if c["group"] not in held]),
                       ("test.jsonl", [c for c in distinct if c["group"] in held])):
        with open(os.path.join(path, name), "w") as f:
            f.writelines(json.dumps({k: c[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for c in part)


def sampled_comparisons(args, policy, tok, rows: list, sampler: sampling.Sampler) -> str:
    """Collective: OUT/comparisons, sampled from --model unless it is already there for this model, data, seed and
    sampling. Returns its path (a data set like any other: train.jsonl, test.jsonl)."""
    path = os.path.join(args.out, "comparisons")
    settings = {"model": os.path.abspath(args.model) if os.path.isdir(args.model) else args.model,
                "weights": fingerprint(args.model), "dataset": args.dataset, "split": args.split, "seed": args.seed,
                "rounds": args.comparison_rounds, "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature, "chat_template": args.chat_template, "prompts": len(rows)}
    meta = os.path.join(path, "meta.json")
    fresh = os.path.isfile(meta) and json.load(open(meta)) == settings
    if not distributed.all_gather_objects(fresh)[0]:
        comparisons = sample_comparisons(policy, tok, rows, sampler, args.seed, args.comparison_rounds)
        if torch.distributed.get_rank() == 0:
            embedded_task.built(path, settings, lambda tmp: write_comparisons(tmp, comparisons, len(rows)))
            say(f"comparisons: {len(distinct_pairs(comparisons))} distinct pairs ({len(comparisons)} drawn) "
                f"from {args.comparison_rounds} rounds of two samples of each of the {len(rows)} training prompts "
                f"by {args.model} (ties dropped), in {path}")
    torch.distributed.barrier()
    return path
