"""Generalized Advantage Estimation (GAE) for token-level PPO.

Implements document 000 ("The Critic Bottleneck in PPO", section "The Mathematics of PPO and Its Critic" and the
"Manual Numerical Walkthrough", steps 1-3 and 6), document 002 ("GRPO vs. PPO for LLM RL", section "The Gradient
Estimator") and document 004 ("PPO & GRPO for LLM Alignment", section "Generalized Advantage Estimation (GAE)").

    δ_t = r_t + γ·V(s_{t+1}) − V(s_t)                 TD error, with V(s_{T}) = 0 after the last token
    A_t = Σ_{k≥0} (γλ)^k δ_{t+k}  =  δ_t + γλ·A_{t+1}  computed backwards in time (document 000, step 3)
    R_t = A_t + V(s_t)                                 the critic's regression target (document 000, step 6)

λ = 0 gives the one-step TD error A_t = δ_t; λ = 1 gives the Monte-Carlo return minus the baseline,
A_t = Σ_k γ^k r_{t+k} − V(s_t). Which λ holds where: document 000 calls λ = 0.95 typical and its walkthrough uses
it (tests/test_worked_example.py); the trainer's default is λ = 1 (`--lam`, verl's default): with γ = 1 and a sparse
terminal reward, A_t = R − V(s_t) uses V only as a baseline, so the policy gradient is unbiased whatever the critic,
while λ < 1 lowers the variance by trusting V(s_{t+k}), biased while the critic is still learning. compute_gae has
no default λ, so every caller says which. Document 004's γ ≈ 0.99 leaves 0.99^499 ≈ 0.0066 of a terminal reward
500 tokens away at the first token (docs/errata.md).

Shapes: B sequences in the batch, T completion tokens (padded to the longest).

| symbol   | variable      | shape  | meaning                                                   |
|----------|---------------|--------|-----------------------------------------------------------|
| r_t      | rewards       | (B, T) | per-token reward (score at the last token, −β·KL shaping)  |
| V(s_t)   | values        | (B, T) | critic's V_ψ before token t is emitted (ψ as in 004; 000, 002 write φ) |
| m_t      | mask          | (B, T) | 1 for completion tokens, 0 for padding                     |
| γ, λ     | gamma, lam    | scalar | discount and GAE interpolation                             |
| δ_t      | deltas        | (B, T) | TD errors                                                  |
| A_t      | advantages    | (B, T) | GAE advantages, 0 on padding                               |
| R_t      | returns       | (B, T) | value targets A_t + V(s_t), 0 on padding                   |
| Â_t      | whiten(...)   | (B, T) | whitened advantages (x − mean)/(std + ε)                   |
"""

import torch


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None, *, gamma: float = 1.0, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns for a padded batch; padding never leaks into valid tokens. lam (λ) is required:
    document 000 takes 0.95, the trainer 1 (module docstring).

    The value after a row's last valid token is taken as 0 (the episode ends there: document 000, step 1,
    "shift V left and append 0"). Runs under no_grad: the critic gets its gradient only from the value loss
    (document 000, "GAE in PyTorch", the classic bug of routing the policy loss through the critic).
    bf16/fp16 inputs are upcast: the backward recursion runs, and returns, in float32 (a 500-token sum in bf16
    keeps 8 bits of mantissa).
    """
    with torch.no_grad():
        dtype = torch.promote_types(rewards.dtype, values.dtype)
        dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        values, rewards = values.to(dtype), rewards.to(dtype)  # (B, T), (B, T)
        mask = torch.ones_like(values) if mask is None else mask.to(values.dtype)  # (B, T)
        values = values * mask  # (B, T) padded values never enter a TD error
        rewards = rewards * mask  # (B, T)
        B, T = values.shape
        # V(s_{t+1}): shift V left, append 0; zero where token t+1 is padding (end of the row's episode)
        next_values = torch.cat([values[:, 1:], values.new_zeros(B, 1)], dim=1)  # (B, T)
        next_mask = torch.cat([mask[:, 1:], mask.new_zeros(B, 1)], dim=1)  # (B, T)
        # δ_t = r_t + γ V(s_{t+1}) − V(s_t)
        deltas = rewards + gamma * next_values * next_mask - values  # (B, T)
        advantages = torch.zeros_like(values)  # (B, T)
        running = values.new_zeros(B)  # (B,) A_{t+1}
        for t in reversed(range(T)):
            # A_t = δ_t + γλ A_{t+1}, with A_{t+1} = 0 when token t+1 is padding
            running = deltas[:, t] + gamma * lam * running * next_mask[:, t]  # (B,)
            advantages[:, t] = running * mask[:, t]  # (B,)
        # R_t = A_t + V(s_t)
        returns = (advantages + values) * mask  # (B, T)
    return advantages, returns


def masked_mean(x: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """Σ m·x / N with N = Σ m, or a given N (the global token count / world size when ranks split a batch).
    The same function as ppo.masked_mean: each module keeps its own copy, so that either can be copied alone."""
    n = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    # x̄ = Σ_t m_t x_t / N
    return (x * mask).sum() / n  # ()


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over positions where mask is 1 (Bessel-corrected by default, like torch.std in document 000)."""
    mean = masked_mean(x, mask)  # ()
    # s² = Σ m·(x − x̄)² / (Σ m − 1)
    sq = ((x - mean) ** 2 * mask).sum()  # ()
    n = mask.sum()  # ()
    return sq / (n - 1).clamp(min=1) if unbiased else sq / n.clamp(min=1)  # ()


def whiten(
    x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Advantage whitening over valid tokens: (x − mean)/(std + ε), 0 on padding.

    Document 000, "PyTorch: The Real PPO Loss", line 79 of its listing
    (`adv = (adv - adv.mean()) / (adv.std() + 1e-8)`), with masked statistics so padding does not move the mean.
    shift_mean=False normalises the spread and keeps the mean, (x − mean)/(std + ε) + mean (TRL's `whiten`), so a
    constant input comes back unchanged.
    Exact on constant input: the statistics are taken in float64 of x − x_0, x_0 the first valid element, so equal
    values give differences of exactly 0, mean 0, std 0 and Â = 0/(0 + ε) = 0 (a float32 mean of equal values is
    inexact and would leave a std of ~1e-7 that ε = 1e-8 cannot hide). Returned in x's dtype.
    """
    mask = torch.ones_like(x) if mask is None else mask.to(x.dtype)  # (B, T)
    m = mask.double()  # (B, T)
    x0 = x.flatten()[torch.argmax(m.flatten())].double()  # () first valid element (argmax takes the first 1)
    d = (x.double() - x0) * m  # (B, T) shifted, exact 0 where x = x_0
    mean = masked_mean(d, m)  # ()
    std = masked_var(d, m).sqrt()  # ()
    # Â = (A − mean(A)) / (std(A) + ε)
    out = (d - mean) / (std + eps)  # (B, T)
    if not shift_mean:
        # Â = (A − mean(A)) / (std(A) + ε) + mean(A)
        out = out + (mean + x0)  # (B, T)
    return (out * m).to(x.dtype)  # (B, T)
