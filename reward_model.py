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

The embedded default (embedded_task.embedded_comparisons) collects comparisons the way document 004 says they are
collected: for each training prompt, two samples of the --model policy, ranked by an annotator, here the verifiable
checker (rewards.math_reward): the correct one is chosen. Ties (both right, both wrong, or the same text) are
dropped, and a pair drawn again is kept once; a fifth of the prompts' pairs are held out for evaluation. The
export, OUT/hf, loads as it is with --reward-model; its config carries `reward_mean` and `reward_std`, the scores'
mean and std on the held-out pairs (OpenRLHF stores the same), with which --reward-model standardises the score, and
`reward_pairs`, how many pairs they come from.

| symbol       | variable         | shape | meaning                                         |
|--------------|------------------|-------|-------------------------------------------------|
| r_φ(x, y_c)  | chosen_rewards   | (b,)  | score of prompt + chosen response, at its last token  |
| r_φ(x, y_r)  | rejected_rewards | (b,)  | score of prompt + rejected response, at its last token |
| m            | margin           | (b,)  | per-pair margin (0 without a `margin` column)    |
"""

import os
from typing import NamedTuple

import torch

import data
import distributed
import metrics
import optim
import rewards as rewards_lib
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
# Data: preference pairs from a data set, or the embedded comparisons
# ======================================================================================================================
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
