"""GRPO: group-relative advantages (and RLOO's, REINFORCE++-baseline's), the KL estimators k1/k2/k3, the GRPO loss
and its aggregations.

Implements document 001 ("GRPO — drop the critic"), sections "The algorithm in two lines", "Why the group mean is a
valid baseline", "Why divide by std?" and "The loss in code"; document 004 ("PPO & GRPO for LLM Alignment"), "8. GRPO:
Dropping the Critic"; document 002 ("GRPO vs. PPO for LLM RL"), "KL Regularization and Trust Regions".

    A_i  = (R_i − mean_j R_j) / (std_j R_j + ε_std)   group-relative advantage, broadcast to every token of rollout i
    A_i  =  R_i − mean_j R_j                         Dr.GRPO (Liu et al. 2025): no std division (scale=False)
    A_i  =  R_i − (1/(n−1)) Σ_{j≠i} R_j  =  n/(n−1)·(R_i − mean_j R_j)    RLOO (Kool et al. 2019; Ahmadian et al. 2024)
    Â_i  = (c_i − μ)/√(s² + ε),  c_i = R_i − mean_j R_j    REINFORCE++-baseline (Hu et al. 2025); μ, s² over the batch
    ℓ_t  = ℓ^CLIP_t + β·k_t,   ℓ^CLIP_t = −min(ρ_t A_i, clip(ρ_t, 1−ε, 1+ε_high) A_i)   (ppo.clipped_surrogate_loss)
    k1_t = log π_θ − log π_ref;   k2_t = ½ (log π_θ − log π_ref)²;   k3_t = π_ref/π_θ − log(π_ref/π_θ) − 1

std is Bessel-corrected (divides by G − 1): document 001's code calls `rewards.std()`, torch's default. A group whose
rewards are all equal has std 0 and gets A = 0/(0 + ε_std) = 0 exactly (see group_advantages): no signal, never NaN.
What each estimator's gradient estimates (k3's is ∇KL(π_ref ‖ π_θ), the other direction from the one the loss names),
and why the group mean is not a baseline "that depends only on x" as document 001 says: docs/derivations.md
and "Errata in the documents"; tests/test_grpo.py checks both by exact enumeration.

Shapes: P prompts, G completions per prompt, B = P·G sequences, T completion tokens.

| symbol      | variable      | shape  | meaning                                                         |
|-------------|---------------|--------|-----------------------------------------------------------------|
| G           | rewards.shape[1] | scalar | group size; K in document 001                                 |
| R_i         | rewards       | (P, G) | sequence reward of each completion                              |
| A_i         | advantages    | (P, G) | group-relative advantage; (B,) or (B, T) in the loss             |
| valid_i     | valid         | (P, G) | False for members the trainer drops (e.g. truncated): A_i = 0    |
| log π_θ     | logprobs      | (B, T) | current policy log-prob of each sampled token                    |
| log π_ref   | ref_logprobs  | (B, T) | frozen reference log-probs                                       |
| ρ_t         | (in pg_loss)  | (B, T) | π_θ/π_θold; r_t(θ) in document 002, c_t in document 004          |
| ℓ^CLIP_t    | pg_loss       | (B, T) | per-token clipped surrogate from ppo.clipped_surrogate_loss      |
| k_t         | kl            | (B, T) | per-token KL estimate (k1, k2 or k3)                             |
| m_t         | mask          | (B, T) | 1 for completion tokens                                          |
| ε_std       | eps           | scalar | guard in the std division (1e-6, document 001's code); not ε the clip range |
| β           | beta          | scalar | KL coefficient                                                   |
| L_max       | max_len       | scalar | Dr.GRPO's constant normaliser (e.g. max new tokens)              |
| n           | n             | (P, 1) | valid members of a group (RLOO, REINFORCE++-baseline)            |
| c_i         | c             | (B,)   | group-centred reward R_i − mean_j R_j of row i = p·G + g         |
| μ, s²       | mu, var       | scalar | mean and Bessel-corrected variance of c over all valid tokens    |
| ε           | eps           | scalar | in reinforce_pp_baseline_advantages: guard inside √(s² + ε)      |
"""

import torch

LOSS_AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


def _shifted(rewards: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 R_i − R_first (R_first the group's first valid reward), 0 where invalid; and the valid mask, float64."""
    v = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()  # (P, G)
    first = torch.argmax(v.to(torch.uint8), dim=-1, keepdim=True)  # (P, 1) argmax returns the first maximum
    r = rewards.double()  # (P, G)
    # d_i = R_i − R_first: exactly 0 for equal rewards, exact (Sterbenz) for close ones
    return torch.where(v, r - r.gather(-1, first), torch.zeros_like(r)), v.double()  # (P, G), (P, G)


def group_advantages(
    rewards: torch.Tensor, eps: float = 1e-6, scale: bool = True, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """A = (R − mean)/(std + ε_std) over each row of a (P, G) reward matrix; scale=False is Dr.GRPO's R − mean.

    valid: optional (P, G) bool; invalid members get A = 0 and are left out of their group's mean and std.
    Exact zeros: the statistics are computed in float64 on R_i − R_first, so a group whose valid rewards are all
    equal has differences, mean and std of exactly 0 and A = 0/(0 + ε_std) = 0 whatever the value and dtype (a
    float32 mean of eight 1.2s is inexact, and its ~1e-7 std is not hidden by ε_std = 1e-6). A group with fewer than
    2 valid members gets A = 0. The result is returned in rewards' dtype; degenerate_groups names the groups with
    A ≡ 0.
    """
    if scale and rewards.shape[-1] < 2:
        raise ValueError("group_advantages: the group std needs G >= 2 completions per prompt")
    d, v = _shifted(rewards, valid)  # (P, G), (P, G)
    n = v.sum(-1, keepdim=True)  # (P, 1) valid members
    # R_i − mean_j R_j  (the shift cancels)
    centred = (d - d.sum(-1, keepdim=True) / n.clamp(min=1)) * v  # (P, G)
    if not scale:
        return centred.to(rewards.dtype)  # (P, G)
    std = ((centred**2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()  # (P, 1) Bessel-corrected
    # A_i = (R_i − mean(R)) / (std(R) + ε_std), 0 when fewer than 2 members are valid
    adv = torch.where(n >= 2, centred / (std + eps), torch.zeros_like(centred))  # (P, G)
    return adv.to(rewards.dtype)  # (P, G)


def degenerate_groups(rewards: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(P,) True where a group's valid rewards are all equal or fewer than 2 are valid: exactly the groups that
    group_advantages gives A ≡ 0 (the trainer's frac_reward_zero_std)."""
    d = _shifted(rewards, valid)[0]  # (P, G)
    # degenerate ⇔ R_i = R_first for every valid i  (true as well when fewer than 2 are valid: then every d_i = 0)
    return (d == 0).all(-1)  # (P,)


def rloo_advantages(rewards: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """RLOO: A_i = R_i − (1/(n−1)) Σ_{j≠i} R_j, the mean of the group's other valid members as baseline; (P, G).

    Kool, van Hoof, Welling 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!" (the leave-one-out baseline);
    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in
    LLMs" (RLOO). The baseline of sample i never contains R_i, so E[∇log π(y_i)·b_i] = 0 exactly: this is the
    unbiased baseline of docs/errata.md (the group-mean erratum), where R_i − mean_j R_j gives ∇J shrunk by (n−1)/n.
    With S = Σ_j R_j, R_i − (S − R_i)/(n−1) = n/(n−1)·(R_i − S/n): RLOO is Dr.GRPO's advantage
    (group_advantages(scale=False)) scaled by n/(n−1), which undoes exactly that shrinkage.
    valid: optional (P, G) bool; invalid members get A = 0 and are left out of n and of every baseline. A group with
    fewer than 2 valid members has no baseline and gets A = 0. Exact zeros: the sums run in float64 on R_i − R_first
    (_shifted, as in group_advantages), so equal valid rewards give A = 0 exactly. Returned in rewards' dtype.
    """
    d, v = _shifted(rewards, valid)  # (P, G), (P, G)
    n = v.sum(-1, keepdim=True)  # (P, 1) valid members
    # b_i = (Σ_{j valid} R_j − R_i) / (n − 1)   (the shift R_first cancels in R_i − b_i)
    baseline = (d.sum(-1, keepdim=True) - d) / (n - 1).clamp(min=1)  # (P, G)
    # A_i = R_i − b_i, 0 for invalid members and in groups with fewer than 2 valid members
    adv = torch.where((n >= 2) & (v > 0), d - baseline, torch.zeros_like(d))  # (P, G)
    return adv.to(rewards.dtype)  # (P, G)


def reinforce_pp_baseline_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """REINFORCE++-baseline: R_i minus its group mean, whitened over every valid token of the batch; rewards (P, G),
    mask (P·G, T) → (P·G,), one value per sequence (the same at each of its tokens); row p·G + g is member g of p.

    Hu et al. 2025, "REINFORCE++" (its variant with a baseline, for several samples per prompt; the title and the
    numbering changed across the paper's versions): c_i = R_i − mean_j R_j is broadcast to each token of completion
    i, then Â = (c − μ)/√(s² + ε), μ and s² the mean and Bessel-corrected variance over all valid tokens of the batch,
    so a sequence of |y_i| tokens counts |y_i| times. verl's reinforce_plus_plus_baseline estimator takes the same
    steps (masked_whiten: variance over N − 1 tokens, ε = 1e-8 inside the square root; a group of one keeps its raw
    reward there, 0 here); OpenRLHF's reinforce_baseline divides by N and first folds the k1 KL penalty into
    per-token returns, so its values vary along a sequence.
    valid: optional (P, G) bool; invalid members are left out of their group's mean and of μ, s², and get 0, as do
    rows with no valid token. Exact on constant rewards: c is computed in float64 on R_i − R_first (_shifted), so a
    group of equal rewards has c ≡ 0 exactly and a batch of such groups gives 0/√ε = 0 (the c of a group sum to 0,
    so equal c can only be 0: the batch statistics need no further shift).
    """
    if mask.shape[0] != rewards.numel():
        raise ValueError(f"mask has {mask.shape[0]} rows for {rewards.numel()} completions; it must be (P·G, T)")
    d, v = _shifted(rewards, valid)  # (P, G), (P, G)
    n = v.sum(-1, keepdim=True)  # (P, 1) valid members
    # c_i = R_i − mean_{j valid} R_j   (the shift cancels)
    c = ((d - d.sum(-1, keepdim=True) / n.clamp(min=1)) * v).reshape(-1)  # (B,)
    # w_i = |y_i| for a valid member, 0 otherwise: each sequence counts once per token
    w = mask.double().sum(-1) * v.reshape(-1)  # (B,)
    N = w.sum()  # () valid tokens in the batch
    # μ = Σ_i w_i c_i / N
    mu = (w * c).sum() / N.clamp(min=1)  # ()
    # s² = Σ_i w_i (c_i − μ)² / (N − 1)
    var = (w * (c - mu) ** 2).sum() / (N - 1).clamp(min=1)  # ()
    # Â_i = (c_i − μ) / √(s² + ε), 0 for rows with no valid token
    adv = torch.where(w > 0, (c - mu) / torch.sqrt(var + eps), torch.zeros_like(c))  # (B,)
    return adv.to(rewards.dtype)  # (B,)


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


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


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
    seq-mean-token-sum-norm  Dr.GRPO: Σ over all tokens / (rollouts · L_max), a constant normaliser (max_len required)
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
        if max_len is None:
            raise ValueError("seq-mean-token-sum-norm (Dr.GRPO) needs max_len, the constant L_max (max new tokens)")
        # Σ_{i,t} ℓ_{i,t} / (B · L_max)
        return (per_token * mask).sum() / (n_seq * max_len)  # ()
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {', '.join(LOSS_AGGREGATIONS)}")


def grpo_loss(
    pg_loss: torch.Tensor, kl: torch.Tensor | None, mask: torch.Tensor, beta: float = 0.04,
    loss_agg: str = "seq-mean-token-mean", max_len: int | None = None,
) -> dict[str, torch.Tensor]:
    """GRPO's loss: the per-token clipped surrogate plus β·k to the reference, aggregated (document 001, "The loss
    in code").

    Reference form: the trainer computes this in train.py:minibatch_gradients (from the same pieces: it aggregates
    the surrogate and k apart with the minibatch's global sequence and token counts, then adds β times the second);
    tests/test_grpo.py::test_grpo_loss_agrees_with_the_trainers_minibatch_gradients checks the two agree.

    pg_loss: (B, T) PPO's clipped surrogate with A_i broadcast to every token (document 001 "(b) PPO-clip surrogate"),
    i.e. ppo.clipped_surrogate_loss(logprobs, old_logprobs, A[:, None], ...): one surrogate for both algorithms.
    kl: (B, T) a KL estimate per token, e.g. kl_k3(logprobs, ref_logprobs), or None (no reference).
    A row whose mask is all 0 (a completion the trainer drops, --mask-truncated) is no rollout: the per-sequence
    modes divide by the number of rows with a token, as the trainer does. Returns "loss", "policy_loss" (aggregated
    pg_loss, detached) and "kl" (aggregated k, detached; absent when kl is None or beta == 0).
    """
    mask = mask.to(pg_loss.dtype)  # (B, T)
    # rows that hold a token: the rollouts the per-sequence means divide by
    n_seq = float((mask.sum(-1) > 0).sum().clamp(min=1))
    out = {"policy_loss": aggregate_loss(pg_loss.detach(), mask, loss_agg, max_len, n_seq)}
    per_token = pg_loss  # (B, T)
    if kl is not None and beta != 0.0:
        # ℓ_t = ℓ^CLIP_t + β k_t
        per_token = pg_loss + beta * kl  # (B, T)
        out["kl"] = aggregate_loss(kl.detach(), mask, loss_agg, max_len, n_seq)
    out["loss"] = aggregate_loss(per_token, mask, loss_agg, max_len, n_seq)
    return out
