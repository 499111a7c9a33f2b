"""sampling.py — drawing completions from exactly the policy that the loss scores, and greedy evaluation.

The importance ratio ρ = π_θ/π_θold (document 002, "The Importance Sampling Ratio") assumes that the tokens were drawn
from π_θold. transformers' generate() applies whatever its GenerationConfig asks for (top-k, top-p, repetition
penalty, ...), and fills every unset field from the checkpoint's own generation_config. So the sampler here is made
neutral: a GenerationConfig with every such field at its neutral value and only the temperature left, a check that
generate() builds no other logits processor, and a record of the probability each drawn token had inside generate(),
logged as `rollout_logprob_diff` against the trainer's own log-probs.

Under FSDP2 the policy's parameters are gathered once per rollout (`models.unsharded`), not once per decoded token.
Shapes: B sequences, P prompt tokens (left-padded), T completion tokens, S = P + T.
"""

import contextlib
import math
import warnings
from typing import NamedTuple

import torch

import distributed
import models
import rewards as rewards_lib
import scoring
from distributed import UserError


class Sampler(NamedTuple):
    """How completions are drawn: the sampling and greedy GenerationConfigs, and every token id that ends one."""

    sample_config: object  # GenerationConfig: softmax(logits/τ), nothing else
    greedy_config: object  # GenerationConfig: argmax
    eos_ids: list[int]


class Completions(NamedTuple):
    """What generate() returns: prompts and completions as one token matrix, and the masks the loss needs."""

    input_ids: torch.Tensor  # (B, S) prompt (left-padded) + completion (pad after the first EOS)
    attention_mask: torch.Tensor  # (B, S)
    completion_mask: torch.Tensor  # (B, T) 1 on sampled tokens, through the first EOS
    truncated: torch.Tensor  # (B,) True where no EOS came within T tokens
    texts: list[str]  # B completions, decoded up to the first EOS
    sampler_logprobs: torch.Tensor | None  # (B, T) log p(token) inside generate(); None when greedy


def make_sampler(policy, tok, max_new_tokens: int, temperature: float, hf_generation_config) -> Sampler:
    """The two GenerationConfigs, after replacing the policy's own generation config by an empty one (EOS and pad
    ids only): nothing of the checkpoint's sampling settings may reach generate(). Refuses any logits processor
    but the temperature."""
    from transformers import GenerationConfig

    eos_ids = eos_token_ids(tok, policy.config, hf_generation_config)
    policy.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=tok.pad_token_id,
                                                bos_token_id=tok.bos_token_id)
    sample_config = neutral_generation_config(max_new_tokens, temperature, eos_ids, tok.pad_token_id)
    check_sampler_is_neutral(policy, sample_config)
    greedy_config = neutral_generation_config(max_new_tokens, None, eos_ids, tok.pad_token_id)
    return Sampler(sample_config=sample_config, greedy_config=greedy_config, eos_ids=eos_ids)


@torch.no_grad()
def generate(policy, tok, prompt_ids: list, sampler: Sampler, greedy: bool = False, repeat: int = 1) -> Completions:
    """Collective (every rank calls it, as often as the others): `repeat` completions of each prompt (a list of
    token-id lists), sampled or greedy. T is the longest completion on any rank, so that every rank's tensors have
    the same width; the parameters are gathered once for the whole call."""
    pad, device = tok.pad_token_id, next(policy.parameters()).device
    ids, mask = rewards_lib.pad_batch(prompt_ids, pad_id=pad, padding_side="left")  # (B, P)
    ids, mask = (x.repeat_interleave(repeat, 0).to(device) for x in (ids, mask))  # (B, P)
    drawn = []  # log p_sampler of each sampled token, one (B,) tensor per decoding step
    config = sampler.greedy_config if greedy else sampler.sample_config
    with models.unsharded(policy), recording_sampler(drawn):
        out = policy.generate(input_ids=ids, attention_mask=mask, synced_gpus=False, generation_config=config)
    P, n_new = ids.shape[1], out.shape[1] - ids.shape[1]
    T = int(distributed.all_reduce(torch.tensor([n_new]), op=torch.distributed.ReduceOp.MAX))  # the collective
    completion = torch.nn.functional.pad(out[:, P:], (0, T - n_new), value=pad)  # (B, T)
    is_eos = torch.isin(completion, torch.tensor(sampler.eos_ids, device=device))  # (B, T)
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), T)  # (B,) T when there is none
    completion_mask = (torch.arange(T, device=device)[None] <= first_eos[:, None]).float()  # (B, T)
    completion = torch.where(completion_mask.bool(), completion, pad)  # (B, T)
    kept = [c[:e] for c, e in zip(completion.tolist(), first_eos.tolist())]
    sampler_logprobs = None
    if drawn and not greedy:
        sampler_logprobs = torch.nn.functional.pad(torch.stack(drawn[:n_new], 1), (0, T - n_new))  # (B, T)
    return Completions(input_ids=torch.cat([ids, completion], 1),
                       attention_mask=torch.cat([mask, torch.ones_like(completion)], 1),
                       completion_mask=completion_mask, truncated=first_eos >= T,
                       texts=tok.batch_decode(kept, skip_special_tokens=True), sampler_logprobs=sampler_logprobs)


@torch.no_grad()
def greedy_eval(policy, tok, rows: list, sampler: Sampler, reward_fns: list) -> tuple[dict, list[dict]]:
    """Collective: greedy completions of `rows` (PromptRow), split across ranks, scored by the verifiable checker.

    eval_accuracy is the fraction whose 'math' reward (rewards.math_reward) is 1, whatever --reward says; with
    verifiable rewards in --reward, eval_reward_mean is their weighted sum on the same completions. Every rank makes
    the same number of generate() calls: a rank with no rows left decodes one padding row, not counted.
    Returns the metrics and every rank's samples (prompt, completion, answer, correct)."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mine, samples, reward_sum, problem = rows[rank::world], [], 0.0, None
    for i in range(0, math.ceil(len(rows) / world), 64):
        chunk = mine[i : i + 64]
        done = generate(policy, tok, [r.ids for r in chunk or rows[:1]], sampler, greedy=True)
        texts, answers = done.texts[: len(chunk)], [r.answer for r in chunk]
        rewards, failed = scoring.apply_rewards(reward_fns, texts, answers,
                                                 lambda k: f"evaluation prompt {rank + (i + k) * world}")
        reward_sum, problem = reward_sum + rewards.sum().item(), problem or failed
        samples += [{"prompt": r.text, "completion": t, "answer": r.answer,
                     "correct": rewards_lib.math_reward(t, r.answer) == 1.0} for r, t in zip(chunk, texts)]
    distributed.stop_if_any_rank(problem)
    correct, n, reward_sum = distributed.global_sum(sum(s["correct"] for s in samples), len(samples), reward_sum)
    metrics = {"eval_accuracy": correct / n, "eval_n": int(n)}
    metrics |= {"eval_reward_mean": reward_sum / n} if reward_fns else {}
    return metrics, [s for part in distributed.all_gather_objects(samples) for s in part]


def eos_token_ids(tok, model_config, generation_config) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and each EOS the checkpoint's configs list (Qwen2.5-Instruct
    lists <|im_end|> and <|endoftext|>)."""
    ids = {tok.eos_token_id}
    for cfg in (model_config, generation_config):
        value = getattr(cfg, "eos_token_id", None)
        ids |= set(value) if isinstance(value, (list, tuple)) else {value}
    return sorted(i for i in ids if i is not None)


# The logits processors generate() builds from a GenerationConfig field, by class name: a sampler that applies any
# of them is not the policy that the loss scores. Only the temperature is allowed (the loss uses the same one).
PROCESSOR_FIELDS = {
    "RepetitionPenaltyLogitsProcessor": "repetition_penalty", "TopKLogitsWarper": "top_k", "TopPLogitsWarper": "top_p",
    "MinPLogitsWarper": "min_p", "TypicalLogitsWarper": "typical_p", "EpsilonLogitsWarper": "epsilon_cutoff",
    "EtaLogitsWarper": "eta_cutoff", "NoRepeatNGramLogitsProcessor": "no_repeat_ngram_size",
    "NoBadWordsLogitsProcessor": "bad_words_ids", "MinLengthLogitsProcessor": "min_length",
    "MinNewTokensLengthLogitsProcessor": "min_new_tokens", "SequenceBiasLogitsProcessor": "sequence_bias",
    "SuppressTokensLogitsProcessor": "suppress_tokens", "SuppressTokensAtBeginLogitsProcessor": "begin_suppress_tokens",
    "ForcedBOSTokenLogitsProcessor": "forced_bos_token_id", "ForcedEOSTokenLogitsProcessor": "forced_eos_token_id",
    "InfNanRemoveLogitsProcessor": "remove_invalid_values",
    "ExponentialDecayLengthPenalty": "exponential_decay_length_penalty"}


def neutral_generation_config(max_new_tokens: int, temperature: float | None, eos_ids: list[int], pad_id: int):
    """Sampling from exactly softmax(logits/τ) (temperature=None: greedy), stopping at any EOS. Every field that could
    add a logits processor is set to its neutral value explicitly: generate() fills unset (None) fields from the
    model's own generation_config."""
    from transformers import GenerationConfig

    sampling = dict(do_sample=True, temperature=temperature) if temperature else dict(do_sample=False)
    return GenerationConfig(**sampling, top_k=0, top_p=1.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
                            repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
                            encoder_no_repeat_ngram_size=0, num_beams=1, min_length=0,
                            max_new_tokens=max_new_tokens, remove_invalid_values=False, renormalize_logits=False,
                            eos_token_id=eos_ids, pad_token_id=pad_id, use_cache=True, return_dict_in_generate=False)


def check_sampler_is_neutral(model, generation_config) -> None:
    """Build the logits processors generate() will apply and refuse any but the temperature, naming the field."""
    try:
        prepared, _ = model._prepare_generation_config(generation_config)
        model._prepare_special_tokens(prepared, device="cpu")
        processors = model._get_logits_processor(prepared, input_ids_seq_length=1, device="cpu")
    except (AttributeError, TypeError) as e:  # a transformers release that renamed these private helpers
        warnings.warn(f"could not inspect generate()'s logits processors ({e}); rollout_logprob_diff still measures it")
        return
    for p in processors:
        if type(p).__name__ != "TemperatureLogitsWarper":
            field = PROCESSOR_FIELDS.get(type(p).__name__, "an option of the model's own generate()")
            raise UserError(f"the model's generation settings add {type(p).__name__} ({field}), which cannot "
                            "be neutralised: sampling would not be the policy that the loss scores")


@contextlib.contextmanager
def recording_sampler(record: list):
    """Record log p_sampler(token) at every decoding step: generate() draws each token with torch.multinomial from the
    probabilities it has after all its logits processors, so the drawn token's probability there is exactly what the
    sampler used. One (B,) tensor per step; nothing V-wide is kept."""
    draw = torch.multinomial

    def multinomial(probs, num_samples, *args, **kwargs):
        tokens = draw(probs, num_samples, *args, **kwargs)  # (B, 1)
        record.append(probs.gather(-1, tokens).squeeze(-1).float().log())  # (B,)
        return tokens

    # PROCESS-WIDE PATCH: torch.multinomial is replaced for every caller in this process until the block ends (the
    # finally below restores it). generate() offers no hook at the draw; the trainer runs nothing else meanwhile.
    torch.multinomial = multinomial
    try:
        yield record
    finally:
        torch.multinomial = draw
