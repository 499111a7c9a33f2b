"""sft.py — the supervised stage of document 004 ("1. Background: From Pre-training to SFT"): next-token cross-entropy
on (prompt, response) rows, with the loss on the response tokens only.

    L_SFT(θ) = −(1/N) Σ_i Σ_t m_{i,t} · log π_θ(y_{i,t} | x_i, y_{i,<t})      N = Σ_{i,t} m_{i,t}

The response is the data set's answer column followed by EOS (so the model learns where to stop); the prompt's
positions carry no loss (m = 0 there): the model learns to answer, not to write prompts. A batch has the layout of an
RL rollout (prompts left-padded, responses right-padded), so the log-probs come from the same function the RL loss
uses (logprobs.py). The embedded default's warm start is this stage: train.py runs it into OUT/sft before an RL or
reward-model stage that has no --model.

| symbol        | variable        | shape  | meaning                                              |
|---------------|-----------------|--------|------------------------------------------------------|
| log π_θ(y_t)  | logprobs        | (b, T) | log-prob of each response token given what precedes |
| m_t           | mask            | (b, T) | 1 on response tokens (EOS included), 0 on padding    |
| N             | num_tokens      | scalar | response tokens of the whole batch (/ world size)    |
"""

from typing import NamedTuple

import torch

import data
import distributed
import logprobs as logprobs_lib
import metrics
import optim
import rewards as rewards_lib
from distributed import UserError, say


class Example(NamedTuple):
    """One supervised row, tokenised once."""

    prompt: data.PromptRow  # the prompt as the policy sees it; prompt.answer is the response text
    response_ids: list[int]  # the answer's token ids + EOS


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """L_SFT: the mean negative log-likelihood of the response tokens; (b, T), (b, T) → scalar. num_tokens: the
    normaliser N (the batch's global response-token count / world size when ranks split it), else Σ mask."""
    n = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    # L_SFT = −(1/N) Σ_t m_t log π_θ(y_t | x, y_<t)
    return -(logprobs * mask).sum() / n  # ()


def make_examples(tok, rows: list, max_length: int) -> list[Example]:
    """An Example per PromptRow; rows longer than max_length tokens (prompt + response + EOS) are dropped, counted."""
    responses = tok([r.answer for r in rows], add_special_tokens=False)["input_ids"] if rows else []
    examples = [Example(prompt=r, response_ids=ids + [tok.eos_token_id]) for r, ids in zip(rows, responses)]
    kept = [e for e in examples if len(e.prompt.ids) + len(e.response_ids) <= max_length]
    if len(kept) < len(examples):
        say(f"sft: dropped {len(examples) - len(kept)} of {len(examples)} rows longer than --max-length "
            f"{max_length} tokens (prompt + response + EOS)")
    if not kept:
        raise UserError(f"sft: no row fits --max-length {max_length}")
    return kept


def batch_tensors(examples: list[Example], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """(input_ids (b, P + T), attention_mask (b, P + T), response mask (b, T), P): prompts left-padded to P,
    responses right-padded to T, the layout of an RL rollout."""
    prompt_ids, prompt_mask = rewards_lib.pad_batch([e.prompt.ids for e in examples], pad_id=pad_id,
                                                    padding_side="left")  # (b, P)
    response_ids, response_mask = rewards_lib.pad_batch([e.response_ids for e in examples], pad_id=pad_id,
                                                        padding_side="right")  # (b, T)
    input_ids = torch.cat([prompt_ids, response_ids], 1).to(device)  # (b, P + T)
    attention_mask = torch.cat([prompt_mask, response_mask], 1).to(device)  # (b, P + T)
    return input_ids, attention_mask, response_mask.float().to(device), prompt_ids.shape[1]


def sft_step(run, step: int) -> dict:
    """One optimizer step on --prompts-per-step rows, the step's slice of the epochs (data.rows_for_step):
    gradients accumulate over micro-batches, every mean divides by the whole batch's response-token count. Returns
    the logged row."""
    args, timer = run.args, metrics.StepTimer(run.device)
    _, mine = data.rows_for_step(len(run.train_rows), args.prompts_per_step, args.seed, step, run.rank, run.world)
    examples = [run.train_rows[i] for i in mine]
    n_tok = distributed.global_sum(sum(len(e.response_ids) for e in examples))[0] / run.world
    loss_sum, correct_sum = 0.0, 0.0
    for i in range(0, len(examples), args.micro_batch_size):
        input_ids, attention_mask, mask, P = batch_tensors(examples[i : i + args.micro_batch_size],
                                                           run.tok.pad_token_id, run.device)
        logits = logprobs_lib.completion_logits(run.policy, input_ids, attention_mask, P)  # (b, T, V)
        targets = input_ids[:, P:]  # (b, T)
        logprobs, _ = logprobs_lib.TokenLogprobs.apply(logits, targets, 1.0)  # (b, T), entropy unused
        loss = sft_loss(logprobs, mask, n_tok)  # ()
        loss.backward()
        loss_sum += loss.item()
        correct_sum += ((logits.detach().argmax(-1) == targets).float() * mask).sum().item() / n_tok
    update = optim.optimizer_step(run, args.max_grad_norm)
    timer.lap("update")
    loss_sum, correct_sum = (x / run.world for x in distributed.global_sum(loss_sum, correct_sum))
    seconds = timer.total()
    return {"loss": loss_sum, "token_accuracy": correct_sum} | update | {"step_time_s": seconds,
                                                                         "tokens_per_s": n_tok * run.world / seconds}
