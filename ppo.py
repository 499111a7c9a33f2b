"""PPO for language models: the clipped surrogate (and GSPO's), the critic loss, entropy, KL reward shaping, the
sampler correction, diagnostics.

Implements document 000 ("The Critic Bottleneck in PPO": "The Mathematics of PPO and Its Critic", "Manual Numerical
Walkthrough" steps 4-7), document 002 ("GRPO vs. PPO for LLM RL": "The PPO Clipping Mechanism", "Understanding the
Per-Token Surrogate", "KL Regularization and Trust Regions", "The Complete PPO Objective") and document 004
("PPO & GRPO for LLM Alignment": "Generalized Advantage Estimation (GAE)" for per-token KL shaping, "The full PPO
objective for RLHF").

    ρ_t   = π_θ(a_t|s_t) / π_θold(a_t|s_t) = exp(log π_θ − log π_θold)                       importance ratio
    L^CLIP_t = −min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t)                                        per-token policy loss
    L^V_t = (V_ψ(s_t) − R_t)²,   R_t = A_t + V_ψold(s_t)                                     per-token critic loss
    H_t   = −Σ_a π_θ(a|s_t) log π_θ(a|s_t)                                                   per-token entropy
    r_t   = −β (log π_θ(a_t|s_t) − log π_ref(a_t|s_t))  (+ reward-model score at the last token)   KL shaping
    L     = mean_t L^CLIP_t + c_v·mean_t L^V_t − c_h·mean_t H_t  (−J_PPO + c_v·L_V − c_h·H)    composite loss
    stop the epochs when approx_kl > KL_target, or β_{t+1} = β_t·max(1 + (n/H)·e_t, ½),                KL control
        e_t = clip(KL_t/KL_target − 1, −0.2, 0.2)
    s_i   = exp((1/|y_i|) Σ_t m_t (log π_θ − log π_θold))                      GSPO's sequence ratio (Zheng et al. 2025)
    L^GSPO_t = −min(s_{i,t} A_i, clip(s_{i,t}, 1−ε, 1+ε_high) A_i),  s_{i,t} = sg[s_i]·π_θ(y_t)/sg[π_θ(y_t)]  GSPO-token
    w_t   = min(π_θold(y_t)/p_sampler(y_t), C), 0 on sequences with Π_t π_θold/p_sampler ∉ [1/C, C]   sampler correction

The last three lines are the 2024–25 variants: GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization") and
the sampler–trainer correction (Yao et al. 2025, truncated importance sampling); sg[·] is the stop-gradient.

Document 000's walkthrough misses an active clip at token 3 (its printed L_PPO and L drop it): docs/errata.md;
tests/test_worked_example.py pins the clipped values.

Shapes: B sequences, T completion tokens, V vocabulary.

| symbol        | variable          | shape     | meaning                                                   |
|---------------|-------------------|-----------|-----------------------------------------------------------|
| log π_θ       | logprobs          | (B, T)    | current policy's log-prob of each sampled token            |
| ρ_t           | ratio             | (B, T)    | importance ratio; r_t(θ) in document 002, c_t in 004       |
| log π_θold    | old_logprobs      | (B, T)    | the same under the rollout policy                          |
| log π_ref     | ref_logprobs      | (B, T)    | the same under the frozen reference                        |
| A_t           | advantages        | (B, T)    | GAE advantages (gae.py) or a broadcast group advantage     |
| V_ψ, V_ψold   | values, old_values| (B, T)    | critic now and at rollout time (ψ as in 004; 000, 002 write φ) |
| R_t           | returns           | (B, T)    | value targets                                              |
| m_t           | mask              | (B, T)    | 1 for completion tokens                                    |
| ε, ε_high    | eps, eps_high     | scalar    | clip range 1−ε … 1+ε_high (DAPO's clip-higher: ε_high > ε) |
| c             | dual_clip         | scalar    | dual-clip bound for A < 0 (Ye et al. 2020), c > 1          |
| H_t           | entropy           | (B, T)    | per-token entropy of π_θ                                   |
| c_v, c_h      | vf_coef, ent_coef | scalar    | value-loss and entropy-bonus coefficients                  |
| β             | beta              | scalar    | KL coefficient (InstructGPT used 0.02, document 004)       |
| KL_target, H  | kl_target, horizon| scalar    | adaptive-KL target and horizon (Ziegler et al. 2019)       |
| logits        | logits            | (B, T, V) | policy logits that produced logprobs                       |
| s_i           | sequence_ratio(…) | (B,)      | GSPO's sequence ratio, normalised by the length Σ_t m_t    |
| log p_sampler | sampler_logprobs  | (B, T)    | log-prob of each token under the sampler that drew it      |
| w_t, C        | weights, cap      | (B, T), scalar | truncated importance weight π_θold/p_sampler and its cap |
"""

import math

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """Σ m·x / N with N = Σ m, or a given N (the global token count / world size when ranks split a batch).
    The same function as gae.masked_mean: each module keeps its own copy, so that either can be copied alone."""
    n = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    # E_t[x] = Σ_t m_t x_t / N
    return (x * mask).sum() / n  # ()


def clipped_surrogate_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    eps: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
) -> torch.Tensor:
    """Per-token −min(ρA, clip(ρ, 1−ε, 1+ε_high)A), unreduced (B, T); ε_high = ε unless given. Mask and reduce it.

    Gradient (document 002, "Understanding the Per-Token Surrogate"): −ρA·∇log π inside the band; exactly 0 when
    A > 0 and ρ > 1+ε_high, or A < 0 and ρ < 1−ε. With dual_clip = c, a token with A < 0 and ρ > c has its
    loss capped at −c·A (gradient 0), bounding the damage of a huge ratio on a bad token.
    """
    eps_high = eps if eps_high is None else eps_high
    if not eps_high >= eps > 0:
        raise ValueError(f"clip range needs eps_high >= eps > 0, got eps={eps}, eps_high={eps_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (it caps the loss at -c·A for A < 0), got {dual_clip}")
    # ρ_t = exp(log π_θ − log π_θold)
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    # −ρ_t A_t  and  −clip(ρ_t, 1−ε, 1+ε) A_t
    unclipped = -ratio * advantages  # (B, T)
    clipped = -torch.clamp(ratio, 1.0 - eps, 1.0 + eps_high) * advantages  # (B, T)
    # L^CLIP_t = −min(ρA, clip(ρ)A) = max(−ρA, −clip(ρ)A)
    loss = torch.maximum(unclipped, clipped)  # (B, T)
    if dual_clip is not None:
        # dual clip, A < 0 only: L_t = min(L^CLIP_t, −c·A_t)
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)  # (B, T)
    return loss


def sequence_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence ratio s_i = (π_θ(y_i)/π_θold(y_i))^{1/|y_i|}, the geometric mean of the token ratios; (B,).

    Zheng et al. 2025, "Group Sequence Policy Optimization", the s_i(θ) of its objective (Equation 5). Not detached:
    ∇s_i = s_i·(1/|y_i|) Σ_t m_t ∇log π_θ(y_t). A row with no tokens gets s = 1. log s_i is clamped at 10 before the
    exp (verl's bound in compute_policy_loss_gspo): e^10 ≈ 2.2e4 is finite even in float16, whose largest value 65504
    is e^11.1, while an overflow to s = inf would make the loss −s·A infinite, and 0·inf = NaN for a sequence with
    A = 0. The bound costs nothing: GSPO's band is 1 ± 4e-4, so a sequence anywhere near e^10 is far outside it.
    Beyond the clamp s is constant (its gradient 0).
    """
    mask = mask.to(logprobs.dtype)  # (B, T)
    # log s_i = (1/|y_i|) Σ_t m_t (log π_θ(y_t) − log π_θold(y_t))
    log_s = ((logprobs - old_logprobs) * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
    # s_i = exp(min(log s_i, 10))
    return torch.exp(torch.clamp(log_s, max=10.0))  # (B,)


def gspo_surrogate_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    eps: float = 3e-4, eps_high: float | None = 4e-4,
) -> torch.Tensor:
    """GSPO's per-token loss −min(s_{i,t}A_i, clip(s_{i,t}, 1−ε, 1+ε_high)A_i), unreduced (B, T), 0 on padding.

    Zheng et al. 2025, "Group Sequence Policy Optimization", in the token form of its GSPO-token variant: s_{i,t} =
    sg[s_i]·π_θ(y_t)/sg[π_θ(y_t)] is s_i at every token of sequence i, with gradient s_i·∇log π_θ(y_t). One advantage
    per sequence: advantages (B,) or (B, 1). Aggregated with grpo.aggregate_loss's "seq-mean-token-mean" it is GSPO's
    objective (Equation 5): −(1/B) Σ_i (1/|y_i|) Σ_t min(s_i A_i, clip(s_i)A_i) = −(1/B) Σ_i min(s_i A_i, clip(s_i)A_i)
    in value, and inside the band its gradient is −(1/B) Σ_i s_i A_i (1/|y_i|) Σ_t ∇log π_θ(y_t), GSPO's; the clip
    takes all tokens of a sequence or none. Another aggregation weighs the sequences otherwise and is not GSPO.
    Defaults are the paper's clip ranges, ε = 3e-4 and ε_high = 4e-4; eps_high=None means ε, as in
    clipped_surrogate_loss. verl's
    compute_policy_loss_gspo builds the same s_{i,t} but clamps log s_{i,t} at 10, so there a token's gradient is 0
    beyond e^10; here s_i is capped at e^10 (sequence_ratio) and the gradient stays e^10·∇log π_θ.
    """
    eps_high = eps if eps_high is None else eps_high
    if not eps_high >= eps > 0:
        raise ValueError(f"clip range needs eps_high >= eps > 0 (GSPO's: 3e-4, 4e-4); got {eps}, {eps_high}")
    adv = advantages.reshape(advantages.shape[0], -1)  # (B, 1)
    if adv.shape[1] != 1:
        raise ValueError(f"GSPO takes one advantage per sequence, (B,) or (B, 1); got {tuple(advantages.shape)}")
    s = sequence_ratio(logprobs, old_logprobs, mask).detach()  # (B,) sg[s_i]
    # s_{i,t} = sg[s_i] · π_θ(y_t) / sg[π_θ(y_t)] = sg[s_i] · exp(log π_θ − sg[log π_θ])
    ratio = s[:, None] * torch.exp(logprobs - logprobs.detach())  # (B, T)
    # −s_{i,t} A_i  and  −clip(s_{i,t}, 1−ε, 1+ε_high) A_i
    unclipped = -ratio * adv  # (B, T)
    clipped = -torch.clamp(ratio, 1.0 - eps, 1.0 + eps_high) * adv  # (B, T)
    # L^GSPO_t = max(−s_{i,t}A_i, −clip(s_{i,t})A_i), 0 on padding
    return torch.maximum(unclipped, clipped) * mask.to(logprobs.dtype)  # (B, T)


def sampler_correction(
    old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor, cap: float = 2.0,
    sequence_mask: bool = False,
) -> dict[str, torch.Tensor]:
    """Truncated importance weights for the sampler–trainer mismatch, w_t = min(π_θold(y_t)/p_sampler(y_t), C).

    The sampler (vLLM, or generate() with other kernels) and the trainer's forward pass differ in kernels and
    precision, so the tokens are drawn from p_sampler, not π_θold. Yao et al. 2025, "Your Efficient RL Framework
    Secretly Brings You Off-Policy RL Training" (truncated importance sampling, TIS); the truncation min(ρ, C) is
    Ionides 2008, "Truncated Importance Sampling". The trainer multiplies the per-token clipped surrogate by the
    weights before aggregating; the KL term is not weighted (as in TRL). Returns
      "weights"    (B, T) w_t, detached; 0 on padding and on masked sequences
      "truncated"  (B, T) bool: valid tokens whose ratio exceeded C
      "masked"     (B,) bool: with sequence_mask, sequences whose ratio Π_t π_θold/p_sampler leaves [1/C, C]
                   (tested as |Σ_t m_t log ρ_t| > log C, so no long sequence overflows); all False otherwise
    TRL (GRPOConfig.vllm_importance_sampling_correction): sequence_mask=False is vllm_importance_sampling_mode=
    "token_truncate" with vllm_importance_sampling_cap = C; TRL defaults to "sequence_mask" and C = 3, which zeroes
    only sequences above C and weights the others by their sequence ratio. verl (rollout_corr_helper):
    rollout_is="token" with rollout_is_threshold = C (2.0 in compute_rollout_correction_weights); sequence_mask adds
    rollout_rs="seq_sum_k1" with threshold C, whose lower bound defaults to 1/C.
    """
    if not cap > 1:
        raise ValueError(f"sampler_correction: the cap C must be > 1, got {cap}")
    valid = mask.bool()  # (B, T)
    # log ρ_t = log π_θold(y_t) − log p_sampler(y_t), 0 on padding
    logratio = torch.where(valid, old_logprobs - sampler_logprobs, torch.zeros_like(old_logprobs)).detach()  # (B, T)
    ratio = torch.exp(logratio)  # (B, T)
    # w_t = min(ρ_t, C), 0 on padding
    weights = torch.clamp(ratio, max=cap) * valid  # (B, T)
    masked = torch.zeros(valid.shape[0], dtype=torch.bool, device=valid.device)  # (B,)
    if sequence_mask:
        # masked_i ⇔ Π_t ρ_t ∉ [1/C, C] ⇔ |Σ_t m_t log ρ_t| > log C
        masked = logratio.sum(-1).abs() > math.log(cap)  # (B,)
        weights = weights * ~masked[:, None]  # (B, T)
    return {"weights": weights, "truncated": (ratio > cap) & valid, "masked": masked}


def value_loss(
    values: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor | None = None, clip: float | None = None
) -> torch.Tensor:
    """Per-token critic loss (V − R)², document 000's L_V (no ½ factor: its walkthrough gives 0.216), unreduced.

    With clip (PPO2-style value clipping as in OpenAI baselines): V_clip = V_old + clip(V − V_old, −c, c) and
    the loss is max((V − R)², (V_clip − R)²), so the critic cannot move far from its rollout-time prediction.
    """
    if clip is not None and old_values is None:
        raise ValueError("value_loss: value clipping (clip set) needs old_values, the rollout-time predictions")
    # L^V_t = (V_ψ(s_t) − R_t)²
    loss = (values - returns) ** 2  # (B, T)
    if clip is not None:
        # V_clip = V_old + clip(V − V_old, −c, c)
        values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)  # (B, T)
        loss = torch.maximum(loss, (values_clipped - returns) ** 2)  # (B, T)
    return loss


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Exact per-token entropy H = −Σ_a p log p = logsumexp(z) − Σ_a p·z, from logits (B, T, V) → (B, T).

    Reference form: the trainer computes this in logprobs.py:TokenLogprobs (H of softmax(z/τ), from the same forward
    pass and chunked softmax as log π, so pass logits / τ here to compare);
    tests/test_ppo.py::test_entropy_from_logits_agrees_with_the_trainers_token_logprobs checks the two agree.
    """
    p = torch.softmax(logits, dim=-1)  # (B, T, V)
    # H = log Σ_a e^{z_a} − Σ_a p_a z_a
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(dim=-1)  # (B, T)


def kl_shaped_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-token rewards with the KL penalty folded in (document 004, "Generalized Advantage Estimation (GAE)").

    r_t = −β·KL_t at every token and r_T = R(p, r) − β·KL_T at the last valid token, KL_t = log π_θ − log π_ref
    (the k1 estimator, as InstructGPT). scores: (B,) sequence-level reward. The mask may be left- or right-padded:
    the score goes to the last position whose mask is 1; a row with no tokens gets nothing.
    """
    mask = mask.to(logprobs.dtype)  # (B, T)
    # KL_t = log π_θ(a_t|s_t) − log π_ref(a_t|s_t)
    kl = (logprobs - ref_logprobs) * mask  # (B, T)
    # r_t = −β KL_t
    rewards = -beta * kl  # (B, T)
    # last valid index per row: T − 1 − (first 1 of the reversed row); argmax returns the first maximum
    last = mask.shape[1] - 1 - torch.argmax(mask.flip(1), dim=1)  # (B,)
    has_tokens = (mask.sum(dim=1) > 0).to(rewards.dtype)  # (B,)
    # r_T += R(p, r)
    rewards[torch.arange(rewards.shape[0]), last] += scores.to(rewards.dtype) * has_tokens  # (B,)
    return rewards


def clip_fraction(
    ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, eps: float = 0.2, eps_high: float | None = None,
    num_tokens: float | None = None,
) -> torch.Tensor:
    """clipfrac: the fraction of valid tokens whose gradient the clip zeroes (A > 0, ρ > 1+ε_high or A < 0, ρ < 1−ε).

    cleanrl counts |ρ − 1| > ε instead, which also counts tokens where the min picks the unclipped branch and the
    gradient still flows; we count only the tokens the trust region actually stopped.
    """
    eps_high = eps if eps_high is None else eps_high
    # clipped_t = [A_t > 0 ∧ ρ_t > 1+ε_high] ∨ [A_t < 0 ∧ ρ_t < 1−ε]
    clipped = ((advantages > 0) & (ratio > 1.0 + eps_high)) | ((advantages < 0) & (ratio < 1.0 - eps))  # (B, T)
    return masked_mean(clipped.to(ratio.dtype), mask.to(ratio.dtype), num_tokens)  # ()


def approx_kl(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None
) -> torch.Tensor:
    """approx_kl: k3 estimate of KL(π_θold ‖ π_θ) on tokens sampled from π_θold, E[(ρ − 1) − log ρ] ≥ 0.

    Schulman, "Approximating KL Divergence" (2020); the same statistic cleanrl logs. Watch it during the inner
    epochs: a value above ~0.02 per token means the update left the region where the surrogate is trustworthy.
    """
    logratio = logprobs - old_logprobs  # (B, T)
    # k3 = (ρ − 1) − log ρ
    return masked_mean(torch.expm1(logratio) - logratio, mask.to(logratio.dtype), num_tokens)  # ()


def policy_diagnostics(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    clip_range: tuple[float, float], num_tokens: float | None = None,
) -> dict[str, torch.Tensor]:
    """The logged health of an update, the same for PPO and GRPO: clipfrac and approx_kl (detached).
    clip_range is (ε, ε_high); advantages are (B, T) or a per-sequence (B, 1) broadcast to every token."""
    logprobs = logprobs.detach()  # (B, T)
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    return {"clipfrac": clip_fraction(ratio, advantages, mask, *clip_range, num_tokens=num_tokens),
            "approx_kl": approx_kl(logprobs, old_logprobs, mask, num_tokens)}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, rtol: float = 1e-4):
    """explained_variance = 1 − Var[R − V] / Var[R] over valid tokens: 1 is a perfect critic, ≤ 0 a useless one.

    NaN when the returns do not vary up to rounding: std(R) ≤ rtol · max(|R|, |V|). Returns come from R_t = A_t + V_t,
    so they carry the values' float32 rounding (~1e-7·|V| per operation, more over a long GAE sum): all-zero rewards
    give returns of ±1e-8 once the critic has moved, and 1 − Var[R − V]/Var[R] would then read −2e15. The variances
    are taken in float64 of x − x_0 (x_0 the first valid element), so equal returns give Var[R] = 0 exactly.
    """
    m = mask.double()  # (B, T)
    n = m.sum().clamp(min=2)  # ()
    first = torch.argmax(m.flatten())  # () index of the first valid token
    r = (returns.double() - returns.flatten()[first].double()) * m  # (B, T) shifted returns
    err = returns.double() - values.double()  # (B, T)
    e = (err - err.flatten()[first]) * m  # (B, T) shifted errors
    var_r = (((r - r.sum() / n) ** 2) * m).sum() / (n - 1)  # ()
    var_err = (((e - e.sum() / n) ** 2) * m).sum() / (n - 1)  # ()
    scale = torch.maximum(returns.double().abs(), values.double().abs()).mul(m).max()  # () max |R|, |V| on valid tokens
    # EV = 1 − Var[R − V] / Var[R]   (NaN when std(R) is rounding: ≤ rtol · scale)
    ev = 1.0 - var_err / var_r if var_r.sqrt() > rtol * scale else torch.full_like(var_r, float("nan"))  # ()
    return ev.to(values.dtype)  # ()


def ppo_loss(
    policy_loss: torch.Tensor, value_loss: torch.Tensor, entropy: torch.Tensor, vf_coef: float = 0.5,
    ent_coef: float = 0.01,
) -> torch.Tensor:
    """The composite loss L = −J_PPO + c_v·L_V − c_h·H of documents 000 ("PyTorch: The Real PPO Loss") and 002 ("The
    Complete PPO Objective"), from the three terms already averaged over tokens: policy_loss = mean_t L^CLIP_t
    (−J_PPO), value_loss = mean_t L^V_t, entropy = mean_t H_t. Document 000 uses c_v ≈ 0.5, c_h ≈ 0.01.

    Reference form: the trainer computes this in train.py:minibatch_gradients (a backward of the policy's terms
    −J_PPO − c_h·H, then a second backward of c_v·L_V on the critic's own graph; ppo_loss there only gives the logged
    `loss`): the same gradients as one backward through L, one graph alive at a time;
    tests/test_ppo.py::test_ppo_loss_agrees_with_the_trainers_two_backward_passes checks the two agree.
    """
    # L = −J_PPO + c_v·L_V − c_h·H
    return policy_loss + vf_coef * value_loss - ent_coef * entropy  # ()


def kl_early_stop(approx_kl: float, target_kl: float | None) -> bool:
    """True when target_kl is set and approx_kl exceeds it (document 002: "stop early when KL exceeds a target").

    The trainer checks the global approx_kl of each minibatch before stepping the optimizer on it and, at the first
    one above the target, stops the step's remaining epochs without that update (the SB3/cleanrl rule).
    """
    # stop ⇔ KL_target set ∧ approx_kl > KL_target
    return target_kl is not None and approx_kl > target_kl


def adaptive_kl_beta(
    beta: float, kl: float, kl_target: float, horizon: float, n_samples: int, min_factor: float = 0.5
) -> float:
    """One step of the proportional β controller of Ziegler et al. 2019 (document 002: "adapt β to keep it in range"),
    its factor bounded below by min_factor so that β stays positive.

    "Fine-Tuning Language Models from Human Preferences", the controller behind InstructGPT, in their code's form (TRL
    and verl share it): e = clip(KL/KL_target − 1, ±0.2), β ← β·(1 + K_β e), K_β = n/H for n samples a step over a
    horizon H. For e = −0.2 the factor is 1 − n/(5H): 0 at the boundary n = 5H and negative beyond it, where a KL far
    below target flips β's sign (β = 0.5, n = 128, H = 10 reached −1588 in 8 steps) and the penalty becomes a bonus
    for leaving π_ref. Here the factor is max(1 + K_β e, min_factor), 1/2 by default, so β at most halves in a step:
    the linear form exactly whenever 1 + K_β e ≥ min_factor (always when n ≤ 2.5H, as |e| ≤ 0.2); at n = 5H the
    linear factor spans [0, 2] and the floor 1/2 undoes one full step up. After k steps β ≥ β_0·min_factor^k > 0.
    Their KL_t is per sequence (summed over tokens); the trainer feeds its logged per-token mean `kl` with a
    per-token target: the formula is the same.
    """
    if kl_target <= 0 or horizon <= 0 or not 0 < min_factor <= 1:
        raise ValueError(f"adaptive KL needs kl_target > 0, horizon > 0 and 0 < min_factor <= 1, got {kl_target}, "
                         f"{horizon}, {min_factor}")
    # e_t = clip(KL_t / KL_target − 1, −0.2, 0.2)
    error = min(max(kl / kl_target - 1.0, -0.2), 0.2)
    # β_{t+1} = β_t · max(1 + K_β e_t, min_factor),  K_β = n / H
    return beta * max(1.0 + n_samples / horizon * error, min_factor)
