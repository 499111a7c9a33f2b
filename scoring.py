"""scoring.py — how completions are scored in a run: the verifiable rewards named by --reward (built-in names of
rewards.py, or module:function), applied and checked one call at a time; and a reward model's score r_φ(x, y), read at
the last real token of prompt + response whatever the padding side; and `score`, the RL step's reward R_i of a
rollout (the gold reward logged beside a learned one).

rewards.py holds the reward functions and the Bradley–Terry loss as math; this file is the machinery around them
(imports by name, a forward hook on a transformers model).
"""

import importlib
import math
import os
import sys
from typing import Sequence

import torch

import distributed
import models
import rewards as rewards_lib
from distributed import UserError


def load_reward_functions(spec: str) -> list:
    """[(name, weight, fn(completion, answer) -> float)] from 'math=1,format=0.2', 'my_module:my_fn=0.5' or 'none' (no
    verifiable reward: a reward model then scores alone). Built-in names and their weights are parsed by
    rewards.parse_reward_spec; module:function terms are imported from the working directory first (as `python -m`
    would), then from sys.path."""
    if spec.strip() == "none":
        return []
    terms = [t.strip() for t in spec.split(",") if t.strip()]
    custom = [t for t in terms if ":" in t.partition("=")[0]]
    builtin = ",".join(t for t in terms if t not in custom)
    try:
        parsed = rewards_lib.parse_reward_spec(builtin) if builtin else []
    except ValueError as e:
        raise UserError(f"--reward: {e} (or module:function, or none)") from None
    out = [(n, w, rewards_lib.REWARD_FUNCTIONS[n]) for n, w in parsed]
    if custom and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for term in custom:
        name, _, w = (x.strip() for x in term.partition("="))
        try:
            weight = float(w) if w else 1.0
            module, _, fn = name.partition(":")
            out.append((name, weight, getattr(importlib.import_module(module), fn)))
        except ValueError:
            raise UserError(f"--reward: weight {w!r} of {name!r} is not a number") from None
        except (ImportError, AttributeError) as e:
            raise UserError(f"--reward: cannot import {name!r}: {e}") from None
    if not out:
        raise UserError("--reward is empty (give 'none' for no verifiable reward)")
    return out


def apply_rewards(reward_fns: list, texts: list, answers: list, where) -> tuple[torch.Tensor, UserError | None]:
    """Σ_k w_k·reward_k(text_i, answer_i) for each i: (B,) float32, and the first problem: a reward that raised or
    returned a non-finite value, named with where(i) (e.g. "sample 3 of step 12"); the caller stops every rank on it."""
    total, problem = torch.zeros(len(texts)), None
    for name, weight, fn in reward_fns:
        for i, (text, answer) in enumerate(zip(texts, answers)):
            try:
                value = float(fn(text, answer))
            except Exception as e:
                said = " ".join(str(e).split())[:200]
                problem = problem or UserError(f"reward {name!r} raised {type(e).__name__}: {said} on {where(i)} "
                                               f"(completion {text[:60]!r})")
                continue
            if not math.isfinite(value):
                problem = problem or UserError(f"reward {name!r} returned {value} on {where(i)} (completion "
                                               f"{text[:60]!r}); rewards must be finite")
            total[i] += weight * value
    return total, problem


def reward_model_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """The token ids a reward model scores, in training and in RL alike: prompt + response, read at its last token.

    Document 004 reads the score at "the last token position of the response (the EOS token)", and TRL appends an
    EOS to plain text. Here nothing is appended: an SFT model predicts EOS but never reads one as input, so at an
    appended EOS its hidden state starts untrained. Measured on the embedded task (same comparisons, same steps):
    held-out pair accuracy 0.835 with an EOS appended, 0.945 without (docs/pipeline.md). Special tokens (a
    BOS) are added unless the text already begins with one (a chat template writes its own)."""
    text = prompt + response
    special = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def last_token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r_φ(x, y) of each row: the score head's output at the row's last real token, found from the attention mask,
    whatever the padding side; (b, L), (b, L) → (b,), with the graph (so it trains as well as it scores).

    A transformers *ForSequenceClassification pools at the rightmost token that is not config.pad_token_id. Where pad
    = EOS (common), an EOS the text ends with counts as padding, and the score comes from the token before it
    (transformers #35352). So for this one call a forward hook on the head replaces its per-position output (b, L, 1)
    by the value at each row's last real token, at every position: whichever position the model's own pooling then
    picks, it returns that value. The score comes out of the model's own forward, so a sharded model's backward hooks
    (FSDP2's, registered on its outputs) run as for any loss. A (b, 1) head output is an encoder that pools before
    its head (BERT's [CLS]): it is left as it is."""
    # last real position = L − 1 − (index of the first 1 in the reversed mask; argmax returns the first maximum)
    last = attention_mask.shape[1] - 1 - attention_mask.flip(1).float().argmax(1)  # (b,)

    def at_last_token(module, inputs, output):
        if output.dim() == 2:
            return output  # (b, 1)
        return output[torch.arange(len(last)), last][:, None].expand_as(output)  # (b, L, 1)

    head = getattr(model, "score", None) or getattr(model, "classifier")
    hook = head.register_forward_hook(at_last_token)
    try:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (b, L) left padding: first real token at 0
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits  # (b, 1)
    finally:
        hook.remove()
    return logits[:, 0]  # (b,)


@torch.no_grad()
def score_with_reward_model(model, tokenizer, prompts: Sequence[str], completions: Sequence[str], *,
                            batch_size: int = 8) -> torch.Tensor:
    """r_φ(x, y) for B (prompt, completion) pairs from a frozen num_labels=1 classifier → (B,) float32 on CPU.

    Duck-typed: a transformers sequence-classification model (its head `score` or `classifier`) and tokenizer. The
    text is reward_model_ids(prompt, completion): apply a chat template to the prompt before, if any.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if config.pad_token_id is None:  # transformers refuses a batch without one (its pooling, unused here, needs it)
        config.pad_token_id = pad_id
    ids = [reward_model_ids(tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
    device = next(model.parameters()).device
    model.eval()  # frozen during RL (004 "Training details"): no dropout
    scores = [torch.zeros(0)]
    for start in range(0, len(ids), batch_size):
        input_ids, attention_mask = rewards_lib.pad_batch(ids[start : start + batch_size], pad_id=pad_id,
                                                          padding_side="left")  # (b, L)
        scores.append(last_token_scores(model, input_ids.to(device), attention_mask.to(device)).float().cpu())  # (b,)
    return torch.cat(scores)  # (B,)


def score(run, batch, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Collective: a train.Rollout's sequence rewards R_i = Σ_k w_k·reward_k(completion_i, answer_i) +
    w·r_φ(prompt_i + completion_i), r_φ standardised by the reward model's stored mean and std when
    --reward-model-normalize; and, when a reward model is in R and the answers are numbers, the gold reward: the
    'math' checker's verdict, logged, never trained on.

    A reward that raises or is not finite, on any rank, stops every rank before anything reaches the optimizer; the
    first such rank names the reward and the sample (numbered across ranks, as in the global batch)."""
    first = run.rank * len(batch)
    total, problem = apply_rewards(run.reward_fns, batch.texts, batch.answers,
                                   lambda i: f"sample {first + i} of step {step}")  # (B,)
    distributed.stop_if_any_rank(problem)
    if run.reward_model is None:
        return total.to(run.device), None
    with models.unsharded(run.reward_model):  # its parameters gathered once for the batch, not once per chunk
        rm = score_with_reward_model(run.reward_model, run.rm_tok, batch.prompts, batch.texts,
                                     batch_size=run.args.micro_batch_size)  # (B,)
    bad = (~torch.isfinite(rm)).nonzero()
    distributed.stop_if_any_rank(UserError(f"the reward model returned {rm[int(bad[0])].item()} on sample "
                                           f"{first + int(bad[0])} of step {step}") if len(bad) else None)
    if run.rm_norm is not None:  # r ← (r − mean)/std with the held-out statistics stored in the checkpoint
        rm = (rm - run.rm_norm[0]) / run.rm_norm[1]  # (B,)
    total += run.args.reward_model_weight * rm
    gold = torch.tensor([rewards_lib.math_reward(t, a) for t, a in zip(batch.texts, batch.answers)]) \
        if run.verifiable else None  # (B,)
    return total.to(run.device), gold
