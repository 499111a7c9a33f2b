"""GRPO: group-relative advantages, the KL estimators k1/k2/k3, and the GRPO loss with its three aggregations.

Implements document 001 ("GRPO — drop the critic": "The algorithm in two lines", "Why the group mean is a valid
baseline", "Why divide by std?", "The loss in code"), document 004 ("8. GRPO: Dropping the Critic") and document 002
("KL Regularization and Trust Regions").

    A_i  = (R_i − mean_j R_j) / (std_j R_j + ε)     group-relative advantage, broadcast to every token of rollout i
    A_i  =  R_i − mean_j R_j                         Dr.GRPO (Liu et al. 2025): no std division (scale=False)
    ρ_t  = exp(log π_θ − log π_θold)
    ℓ_t  = −min(ρ_t A_i, clip(ρ_t, 1−ε, 1+ε) A_i) + β·k3_t
    k1_t = log π_θ − log π_ref;   k2_t = ½ (log π_θ − log π_ref)²;   k3_t = π_ref/π_θ − log(π_ref/π_θ) − 1

std is Bessel-corrected (divides by G − 1): document 001's code calls `rewards.std()`, torch's default. A group whose
rewards are all equal has std 0 and gets A = 0/(0 + ε) = 0: no signal, never NaN. G = 1 has no defined std.

On the baseline (document 001, "Why the group mean is a valid baseline"): the text says the group mean depends only
on the prompt x. It does not: mean_j R_j contains R_i, the sample's own reward. Exact enumeration
(tests/test_grpo.py::test_baseline_by_exact_enumeration) shows, with R_i − mean_j R_j = (1 − 1/G)(R_i − mean_{j≠i} R_j),
    E[∇log π(y_i)·(R_i − mean_j R_j)] = (1 − 1/G)·∇J
so the mean-centred estimator is the true gradient shrunk by (G−1)/G: same direction, biased in scale, and exactly
unbiased if the sample is left out of its own baseline (RLOO). A state-only baseline b(x) gives ∇J exactly. Dividing
by the group std is not a positive constant either: it changes the expected direction (Dr.GRPO's point).

Shapes: P prompts, G completions per prompt, B = P·G sequences, T completion tokens.

| symbol      | variable      | shape  | meaning                                                |
|-------------|---------------|--------|--------------------------------------------------------|
| R_i         | rewards       | (P, G) | sequence reward of each completion                     |
| A_i         | advantages    | (P, G) | group-relative advantage; (B,) or (B, T) in the loss    |
| log π_θ     | logprobs      | (B, T) | current policy log-prob of each sampled token           |
| log π_θold  | old_logprobs  | (B, T) | rollout-time policy log-probs                           |
| log π_ref   | ref_logprobs  | (B, T) | frozen reference log-probs                              |
| m_t         | mask          | (B, T) | 1 for completion tokens                                 |
| ε, β        | eps, beta     | scalar | clip range, KL coefficient                              |
| L_max       | max_len       | scalar | Dr.GRPO's constant normaliser (e.g. max new tokens)     |
"""

import torch

LOSS_AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6, scale: bool = True) -> torch.Tensor:
    """A = (r − mean)/(std + ε) over each row of a (P, G) reward matrix; scale=False is Dr.GRPO's r − mean."""
    if scale and rewards.shape[-1] < 2:
        raise ValueError("group_advantages: the group std needs G >= 2 completions per prompt")
    mean = rewards.mean(dim=-1, keepdim=True)  # (P, 1)
    if not scale:
        # A_i = R_i − mean(R)
        return rewards - mean  # (P, G)
    std = rewards.std(dim=-1, keepdim=True)  # (P, 1) Bessel-corrected, as document 001's code
    # A_i = (R_i − mean(R)) / (std(R) + ε)
    return (rewards - mean) / (std + eps)  # (P, G)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log π_θ − log π_ref: unbiased for KL(π_θ‖π_ref) under samples from π_θ, but often negative."""
    # k1_t = log π_θ(a_t) − log π_ref(a_t)
    return logprobs - ref_logprobs  # (B, T)


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π_θ − log π_ref)²: ≥ 0, low variance, biased (exact only to second order)."""
    # k2_t = ½ (log π_ref − log π_θ)²
    return 0.5 * (ref_logprobs - logprobs) ** 2  # (B, T)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = e^{log π_ref − log π_θ} − (log π_ref − log π_θ) − 1: unbiased for KL(π_θ‖π_ref), ≥ 0, 0 at equality.

    Schulman, "Approximating KL Divergence" (2020); the estimator of DeepSeekMath's GRPO and document 001's code.
    """
    logr = ref_logprobs - logprobs  # (B, T) log(π_ref/π_θ)
    # k3_t = r − log r − 1,  r = π_ref/π_θ   (expm1 keeps it exact near r = 1)
    return torch.expm1(logr) - logr  # (B, T)


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "seq-mean-token-mean",
    max_len: int | None = None,
    num_sequences: float | None = None,
    num_tokens: float | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar, the three ways document 001 discusses.

    seq-mean-token-mean      original GRPO: mean over each rollout's tokens, then mean over rollouts (1/|o_i| per row)
    token-mean               DAPO: Σ over all tokens / number of tokens (long rollouts weigh more, no length bias)
    seq-mean-token-sum-norm  Dr.GRPO: Σ over all tokens / (rollouts · L_max), a constant normaliser
    num_sequences / num_tokens replace the local counts when ranks split a batch (global count / world size).
    """
    mask = mask.to(per_token.dtype)  # (B, T)
    n_seq = per_token.shape[0] if num_sequences is None else num_sequences
    if mode == "seq-mean-token-mean":
        # (1/B) Σ_i (1/|o_i|) Σ_t ℓ_{i,t}
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
        return per_seq.sum() / n_seq  # ()
    if mode == "token-mean":
        # Σ_{i,t} ℓ_{i,t} / Σ_i |o_i|
        n_tok = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
        return (per_token * mask).sum() / n_tok  # ()
    if mode == "seq-mean-token-sum-norm":
        # Σ_{i,t} ℓ_{i,t} / (B · L_max)
        L = per_token.shape[1] if max_len is None else max_len
        return (per_token * mask).sum() / (n_seq * L)  # ()
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {', '.join(LOSS_AGGREGATIONS)}")


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    eps: float = 0.2,
    beta: float = 0.04,
    loss_agg: str = "seq-mean-token-mean",
    max_len: int | None = None,
    num_sequences: float | None = None,
    num_tokens: float | None = None,
) -> dict[str, torch.Tensor]:
    """GRPO's loss: clipped surrogate with A_i broadcast to every token, plus β·k3 to the reference, aggregated.

    advantages: (B,) per rollout (or (B, T) already broadcast). Returns the loss and detached parts for logging.
    """
    mask = mask.to(logprobs.dtype)  # (B, T)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    # ρ_t = exp(log π_θ − log π_θold)
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    # ℓ^CLIP_t = −min(ρ_t A_i, clip(ρ_t, 1−ε, 1+ε) A_i)
    pg = torch.maximum(-ratio * adv, -torch.clamp(ratio, 1.0 - eps, 1.0 + eps) * adv)  # (B, T)
    per_token = pg  # (B, T)
    out = {}
    if ref_logprobs is not None and beta != 0.0:
        kl = kl_k3(logprobs, ref_logprobs)  # (B, T)
        # ℓ_t = ℓ^CLIP_t + β k3_t
        per_token = pg + beta * kl  # (B, T)
        out["kl"] = aggregate_loss(kl.detach(), mask, loss_agg, max_len, num_sequences, num_tokens)
    out["policy_loss"] = aggregate_loss(pg.detach(), mask, loss_agg, max_len, num_sequences, num_tokens)
    out["loss"] = aggregate_loss(per_token, mask, loss_agg, max_len, num_sequences, num_tokens)
    return out
