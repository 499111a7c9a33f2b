"""Rewards: verifiable math and format rewards, DAPO's overlong penalty, and the Bradley–Terry reward model (its loss
and how it scores).

Implements document 004 ("PPO & GRPO for LLM Alignment"), sections "4. The Reward Model" (a scalar head on an LM,
trained on (chosen, rejected) pairs with the Bradley–Terry model, frozen during RL) and "Rule-based rewards vs learned
reward models" (for verifiable tasks, score with rules); document 001 ("GRPO — drop the critic"), "What's wrong with
PPO at scale" (a verifier returns 1 at the end, 0 otherwise); document 003 ("GRPO vs PPO: Eliminating the Critic
Model"), "Group Sampling and Relative Reward Baseline Estimation" (binary rewards for accuracy and for format). The
documents name the format reward without spelling it out: `<think>…</think><answer>…</answer>` is DeepSeek-R1's
convention. Document 004 lost its two display equations; the ones below are the standard Bradley–Terry forms that
its prose describes (docs/errata.md).

Equations
  R_acc(y, y*)  = 1[ parse(extract(y)) ≈ parse(extract(y*)) ]          numeric equality within a tolerance
  R_fmt(y)      = 1[ y = <think>…</think> <answer>…</answer> ]          whitespace allowed around the blocks
  R(y, y*)      = Σ_k w_k R_k(y, y*)                                    spec "math=1.0,format=0.2"
  R_length(y)   = clamp(((L_max − L_cache) − |y|)/L_cache, −1, 0)    DAPO's soft overlong punishment (Yu et al. 2025)
  P(y_c ≻ y_r | x) = σ(r_φ(x, y_c) − r_φ(x, y_r)),   σ(z) = 1 / (1 + e^{−z})
  L_RM(φ)       = −E_{(x, y_c, y_r)} [ log σ(r_φ(x, y_c) − r_φ(x, y_r) − m) ]       m: optional margin (0 by default)

Symbol → variable → shape (B = pairs or sequences in the batch, L = padded token length)
  x                  prompts                          list of B str
  y, y*              completion(s), answer(s)         str, or list of B str
  w_k, R_k           weight, REWARD_FUNCTIONS[name]   float, Callable[[str, str], float]
  r_φ(x, y_c)        chosen_rewards                   (B,)
  r_φ(x, y_r)        rejected_rewards                 (B,)
  m                  margin                           (B,) or None
  Δ = r_c − r_r − m  delta                            (B,)
  L_RM               loss                             ()
  token ids, mask    input_ids, attention_mask        (B, L)
  r_φ(x, y)          scores                           (B,)
  |y|, L_max, L_cache  lengths, max_len, buffer       (B,), int, int   (completion tokens)
"""

import math
import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# ── Answer extraction and number parsing ───────────────────────────────────────────────────────────────────

# One number: 1,234  42  -3.5  .5  2e3  $12  50%  3/4. Commas only in groups of three (so "1,2,3" is three numbers).
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
# A sign counts only where it cannot be a binary minus: not right after a word, ")" or "}" (so "3-5" ends in 5).
_NUMBER = re.compile(r"(?:(?<![\w)}])[-+−])?(?:\$\s?)?" + _UNSIGNED + r"(?:\s*/\s*" + _UNSIGNED + r")?%?")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")  # \frac{3}{4}, \dfrac, \tfrac → 3/4
_LATEX_NOISE = (("\\$", "$"), ("\\%", "%"), ("{,}", ","), ("\\!", ""), ("\\,", ""))  # 1{,}000 and 1\,000 → 1,000
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _normalize_latex(text: str) -> str:
    """Rewrite the LaTeX spellings of numbers into plain ones: \\frac{a}{b} → a/b, \\$ → $, 1{,}000 → 1,000."""
    text = _FRAC.sub(r"\1/\2", text)
    for latex, plain in _LATEX_NOISE:
        text = text.replace(latex, plain)
    return text


def _to_float(token: str) -> float | None:
    """One matched number token ("-$1,234.5", "3/4", "50%") → float; None if it overflows, is nan, or divides by 0.

    "$" and "%" are dropped, so "50%" means 50: GSM8K writes percentages as bare numbers after "####".
    """
    clean = "".join(token.replace("−", "-").replace("$", "").replace("%", "").replace(",", "").split())
    numerator, _, denominator = clean.partition("/")
    try:
        value = float(numerator) / float(denominator) if denominator else float(numerator)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return value if math.isfinite(value) else None  # "1e999" → inf → None: huge numbers never score


def parse_number(text: str | None) -> float | None:
    """The first number in `text` as a float ("$1,000.00" → 1000.0, "\\frac{3}{4} cm" → 0.75), else None."""
    if not isinstance(text, str):
        return None
    match = _NUMBER.search(_normalize_latex(text))
    return None if match is None else _to_float(match.group())


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{…}, braces matched by depth so \\boxed{\\frac{1}{2}} → \\frac{1}{2}."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    brace = start + len("\\boxed")
    while brace < len(text) and text[brace].isspace():
        brace += 1
    if brace >= len(text) or text[brace] != "{":
        return None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : i]
    return None  # unbalanced braces: the model broke its own box


def _last_number(text: str) -> str | None:
    """The last number-looking token in the text (the fallback when no marker is present)."""
    numbers = _NUMBER.findall(_normalize_latex(text))
    return numbers[-1] if numbers else None


def extract_answer(text: str | None) -> str | None:
    """The answer span of a completion or of a GSM8K answer field; None when there is none.

    Priority: the content of the last <answer>…</answer> (R1 format), and inside that region: the rest of the line
    after the last "####" (GSM8K), else the last \\boxed{…} (MATH), else the last number. Once a marker is used,
    it must be well formed: unbalanced <answer> tags or an unclosed \\boxed{ give None, not a stray number.
    The span is raw text ("$1,000", "\\frac{1}{2}"); parse_number turns it into a value.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    if "<answer>" in text or "</answer>" in text:
        contents = _ANSWER_TAG.findall(text)
        if text.count("<answer>") != text.count("</answer>") or not contents:
            return None
        text = contents[-1]
    if "####" in text:
        span = text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
        return span or None
    if "\\boxed" in text:
        return _last_boxed(text)
    return _last_number(text)


# ── Rule-based rewards (004 "Rule-based rewards vs learned reward models") ─────────────────────────────────


def math_reward(completion: str | None, answer: str | None, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> float:
    """Accuracy reward: 1.0 when the completion's answer equals the ground truth numerically, else 0.0.

    `answer` may be a bare "42" or a full GSM8K answer field ending in "#### 42"; both sides are extracted alike.
    Numeric, not string, equality: "42.0" == "42", "1,000" == "1000", "0.75" == "3/4". Never raises.
    """
    predicted = parse_number(extract_answer(completion))
    target = parse_number(extract_answer(answer))
    if predicted is None or target is None:
        return 0.0
    # R_acc = 1[ |ŷ − y*| ≤ max(rel_tol · max(|ŷ|, |y*|), abs_tol) ]
    return 1.0 if math.isclose(predicted, target, rel_tol=rel_tol, abs_tol=abs_tol) else 0.0


_R1_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
_R1_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(completion: str | None, answer: str | None = None) -> float:
    """R1 format reward: 1.0 iff the text is exactly <think>…</think> then <answer>…</answer>, whitespace around.

    Each tag must appear exactly once, so nested, repeated or unbalanced tags score 0. `answer` is ignored; it is
    accepted so every entry of REWARD_FUNCTIONS has the same (completion, answer) signature.
    """
    if not isinstance(completion, str) or any(completion.count(tag) != 1 for tag in _R1_TAGS):
        return 0.0
    return 1.0 if _R1_FORMAT.fullmatch(completion) else 0.0


REWARD_FUNCTIONS: dict[str, Callable[[str, str], float]] = {
    "math": math_reward,  # accuracy: verifiable numeric answer
    "format": format_reward,  # R1 <think>/<answer> layout
}


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """ "math=1.0,format=0.2" → [("math", 1.0), ("format", 0.2)]; a bare name has weight 1.0.

    Raises ValueError (one line) for an unknown name, a weight that is not a finite number, or a repeated name.
    """
    known = ", ".join(sorted(REWARD_FUNCTIONS))
    terms: list[tuple[str, float]] = []
    for item in spec.split(","):
        name, has_weight, weight_text = (part.strip() for part in item.partition("="))
        if name not in REWARD_FUNCTIONS:
            raise ValueError(f"unknown reward {name!r} in spec {spec!r}; known rewards: {known}")
        try:
            weight = float(weight_text) if has_weight else 1.0
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ValueError(f"bad weight {weight_text!r} for reward {name!r} in spec {spec!r}; expected a number")
        if name in (seen for seen, _ in terms):
            raise ValueError(f"reward {name!r} appears twice in spec {spec!r}")
        terms.append((name, weight))
    return terms


def combined_reward(completion: str | None, answer: str | None, spec: str | Sequence[tuple[str, float]]) -> float:
    """Weighted sum of the named rewards; `spec` is a string for parse_reward_spec or its parsed list.

    Reference form: the trainer computes this in scoring.py:apply_rewards (Σ_k w_k·fn_k over the functions that
    scoring.load_reward_functions builds from --reward, module:function terms included, each call guarded so that a
    reward that raises is named); tests/test_rewards.py::test_rule_based_rewards_agree_with_the_trainers_apply_rewards
    checks the two agree.
    """
    terms = parse_reward_spec(spec) if isinstance(spec, str) else spec
    # R(y, y*) = Σ_k w_k R_k(y, y*)
    return float(sum(weight * REWARD_FUNCTIONS[name](completion, answer) for name, weight in terms))


def rule_based_rewards(completions: Sequence[str], answers: Sequence[str], spec: str) -> torch.Tensor:
    """combined_reward for a batch of B completions, as the float32 tensor the advantage code consumes.

    Reference form: the trainer computes this in scoring.py:apply_rewards (the same sum, accumulated in a float32
    tensor, reward by reward); tests/test_rewards.py::test_rule_based_rewards_agree_with_the_trainers_apply_rewards
    checks the two agree.
    """
    terms = parse_reward_spec(spec)  # parse once, fail before scoring anything
    rewards = [combined_reward(c, a, terms) for c, a in zip(completions, answers, strict=True)]
    return torch.tensor(rewards, dtype=torch.float32)  # (B,)


# ── Length shaping (DAPO, Yu et al. 2025, section 3.4) ────────────────────────────────────────────────────────


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment R_length, a reward term added to each completion's reward; (B,) → (B,).

    Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", section 3.4 (Overlong Reward
    Shaping), its equation for R_length, with |y| = lengths, L_max = max_len and L_cache = buffer:
      R_length(y) = 0                                  |y| ≤ L_max − L_cache
                  = ((L_max − L_cache) − |y|) / L_cache  L_max − L_cache < |y| ≤ L_max
                  = −1                                 L_max < |y|
    The middle piece falls linearly from 0 at |y| = L_max − L_cache to −1 at |y| = L_max, so the three pieces are
    that line clamped to [−1, 0]. A completion cut off at the generation limit gets −1 when max_len is that limit.
    lengths: completion token counts, integer or float; the result is float32, or lengths' dtype if floating.
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong_penalty needs 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")
    n = lengths.double()  # (B,) |y|
    # ((L_max − L_cache) − |y|) / L_cache
    ramp = ((max_len - buffer) - n) / buffer  # (B,)
    # R_length = min(max(ramp, −1), 0): 0 before the buffer, the ramp inside it, −1 past L_max
    penalty = ramp.clamp(min=-1.0, max=0.0)  # (B,)
    return penalty.to(lengths.dtype if lengths.is_floating_point() else torch.float32)  # (B,)


# ── Learned reward model (004 "4. The Reward Model") ───────────────────────────────────────────────────────


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None,
                       num_pairs: float | None = None) -> torch.Tensor:
    """L_RM = −(1/N) Σ log σ(r_c − r_r − m) over B preference pairs; (B,), (B,) → scalar.

    margin m (B,): an optional per-pair margin the chosen reward must clear (Llama 2's reward model; TRL's `margin`
    column). num_pairs N: the normaliser, B by default; the trainer passes the minibatch's global pair count / world
    size, so that averaging gradients over ranks gives the gradient of the global mean.
    F.logsigmoid(Δ) = −softplus(−Δ) is finite for any margin; log(torch.sigmoid(Δ)) is −inf by Δ ≈ −89 (float32).
    """
    if chosen_rewards.shape != rejected_rewards.shape:  # (B, 1) − (B,) would broadcast to (B, B) silently
        shapes = f"chosen {tuple(chosen_rewards.shape)} vs rejected {tuple(rejected_rewards.shape)}"
        raise ValueError(f"shape mismatch: {shapes}; both must be (B,)")
    # Δ = r_φ(x, y_c) − r_φ(x, y_r) − m
    delta = chosen_rewards - rejected_rewards - (0.0 if margin is None else margin)  # (B,)
    # L_RM = −(1/N) Σ log σ(Δ)
    return -F.logsigmoid(delta).sum() / (len(delta) if num_pairs is None else num_pairs)  # ()


def preference_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs ranked correctly, r_c > r_r strictly (a tie counts as wrong); (B,), (B,) → scalar."""
    return (chosen_rewards > rejected_rewards).float().mean()  # ()


def pad_batch(sequences: Sequence[Sequence[int]], *, pad_id: int, padding_side: str) -> tuple[torch.Tensor, ...]:
    """Ragged token-id lists → input_ids and attention_mask, both (B, L), padded on the left or the right."""
    longest = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)  # (B, L)
    for row, ids in enumerate(sequences):
        cols = slice(longest - len(ids), longest) if padding_side == "left" else slice(0, len(ids))
        input_ids[row, cols] = torch.tensor(ids, dtype=torch.long)  # (len(ids),)
        attention_mask[row, cols] = 1  # (len(ids),)
    return input_ids, attention_mask
