"""PPO pieces: the clipping case analysis of document 002 by autograd, value clipping, entropy, KL shaping, metrics."""

import math

import numpy as np
import pytest
import torch

from gae import compute_gae
from logprobs import TokenLogprobs, token_logprobs_reference
from ppo import (
    adaptive_kl_beta,
    approx_kl,
    clip_fraction,
    clipped_surrogate_loss,
    entropy_from_logits,
    explained_variance,
    kl_early_stop,
    kl_shaped_rewards,
    masked_mean,
    policy_diagnostics,
    ppo_loss,
    value_loss,
)

EPS = 0.2
# (ratio, advantage, gradient is zero?) — document 002, "Understanding the Per-Token Surrogate":
# A > 0: L = min(ρ, 1+ε)A, flat once ρ > 1+ε;  A < 0: L = max(ρ, 1−ε)A, flat once ρ < 1−ε.
CASES = [
    (1.00, +1.0, False), (1.10, +1.0, False), (1.30, +1.0, True), (0.70, +1.0, False),
    (1.00, -1.0, False), (0.90, -1.0, False), (0.70, -1.0, True), (1.30, -1.0, False),
    (1.30, +2.5, True), (0.50, -0.3, True), (1.19, +1.0, False), (0.81, -1.0, False),
]


@pytest.mark.parametrize("ratio,adv,zero", CASES)
def test_clipping_case_analysis_by_autograd(ratio, adv, zero):
    old = torch.tensor([[-1.3]], dtype=torch.float64)
    logp = (old + math.log(ratio)).clone().requires_grad_(True)
    loss = clipped_surrogate_loss(logp, old, torch.tensor([[adv]], dtype=torch.float64), eps=EPS)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    if zero:
        assert grad.item() == 0.0
    else:
        # inside the band: ∂(−ρA)/∂log π = −ρA (document 002: the REINFORCE direction scaled by the ratio)
        assert math.isclose(grad.item(), -ratio * adv, rel_tol=1e-12)
    expected = -min(ratio * adv, min(max(ratio, 1 - EPS), 1 + EPS) * adv)
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)


def test_ratio_one_gives_minus_mean_advantage():
    adv = torch.randn(3, 5)
    logp = torch.randn(3, 5)
    loss = clipped_surrogate_loss(logp, logp.clone(), adv)
    torch.testing.assert_close(loss.mean(), -adv.mean())


def test_asymmetric_and_dual_clip():
    old = torch.zeros(1, 4, dtype=torch.float64)
    ratio = torch.tensor([[1.25, 1.35, 0.75, 5.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    logp = ratio.log().requires_grad_(True)
    loss = clipped_surrogate_loss(logp, old, adv, eps=0.2, eps_high=0.28, dual_clip=3.0)
    # 1.25 < 1.28: unclipped −1.25; 1.35 > 1.28: −1.28; 0.75 < 0.8 with A<0: 0.8; ρ=5, A=−1: min(5, 3) = 3
    torch.testing.assert_close(loss, torch.tensor([[-1.25, -1.28, 0.8, 3.0]], dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    torch.testing.assert_close(grad, torch.tensor([[-1.25, 0.0, 0.0, 0.0]], dtype=torch.float64))


def test_value_loss_and_clipping():
    v = torch.tensor([1.0, 0.0, 2.0])
    R = torch.tensor([0.5, 1.0, 2.0])
    torch.testing.assert_close(value_loss(v, R), torch.tensor([0.25, 1.0, 0.0]))
    old = torch.tensor([0.0, 0.0, 2.5])
    # clip 0.2: V_clip = [0.2, 0.0, 2.3]; max((V−R)², (V_clip−R)²) = [max(.25,.09), max(1,1), max(0,.09)]
    torch.testing.assert_close(value_loss(v, R, old, clip=0.2), torch.tensor([0.25, 1.0, 0.09]))


def test_entropy_from_logits_matches_definition():
    logits = torch.randn(2, 3, 11, dtype=torch.float64) * 3
    p = logits.softmax(-1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))
    assert torch.isclose(entropy_from_logits(torch.zeros(1, 1, 8)), torch.tensor(math.log(8.0)))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_from_logits_agrees_with_the_trainers_token_logprobs(temperature):
    """The reference entropy_from_logits(z/τ) against what the trainer runs, logprobs.TokenLogprobs (and its plain
    form token_logprobs_reference), on the same random logits: the same H and the same gradient ∂Σ w·H/∂z.

    Catches: the trainer's H taken at another temperature than its log π (z instead of z/τ), or a drift between the
    documented H = logsumexp(z) − Σ p·z and the chunked forward or hand-written backward the trainer uses."""
    g = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn(2, 5, 13, generator=g, dtype=torch.float64)).requires_grad_(True)  # (B, T, V)
    targets = torch.randint(0, 13, (2, 5), generator=g)  # (B, T)
    weights = torch.randn(2, 5, generator=g, dtype=torch.float64)  # (B, T) an arbitrary upstream gradient
    ours = entropy_from_logits(logits / temperature)  # (B, T)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), logits)  # (B, T, V)
    for trainer_form in (TokenLogprobs.apply, token_logprobs_reference):
        _, theirs = trainer_form(logits, targets, temperature)  # (B, T)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        (grad_theirs,) = torch.autograd.grad((theirs * weights).sum(), logits)  # (B, T, V)
        torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-10, atol=1e-12)


def test_kl_shaped_rewards_loop():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.1, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -0.4, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = torch.tensor([2.0, -1.0])
    r = kl_shaped_rewards(scores, logp, ref, mask, beta=0.1)
    expected = torch.zeros(2, 3)
    for b in range(2):
        L = int(mask[b].sum())
        for t in range(L):
            expected[b, t] = -0.1 * (logp[b, t] - ref[b, t]) + (scores[b] if t == L - 1 else 0.0)
    torch.testing.assert_close(r, expected)


def test_explained_variance_matches_numpy():
    g = torch.Generator().manual_seed(0)
    R = torch.randn(3, 6, generator=g, dtype=torch.float64)
    V = R + 0.5 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.float64)
    mask[1, 4:] = 0
    m = mask.bool().numpy()
    r, v = R.numpy()[m], V.numpy()[m]
    assert math.isclose(explained_variance(V, R, mask).item(), 1 - np.var(r - v) / np.var(r), rel_tol=1e-9)
    assert explained_variance(R, R, mask).item() == 1.0


def test_approx_kl_and_clipfrac():
    """Uneven log-ratios {0.3, −0.1, 0.7}: catches approx_kl with its arguments swapped (k3 of the reverse ratio,
    e^{−x} − 1 + x, gives 0.0806 instead of 0.1206 here); symmetric ratios {0, ±0.5} could not tell them apart."""
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.tensor([[0.3, -0.1, 0.7]], dtype=torch.float64)
    mask = torch.ones(1, 3)
    expected = sum(math.exp(x) - 1 - x for x in [0.3, -0.1, 0.7]) / 3  # E[(ρ − 1) − log ρ], log ρ = logp − old
    swapped = sum(math.exp(-x) - 1 + x for x in [0.3, -0.1, 0.7]) / 3
    assert abs(expected - swapped) > 0.03
    assert math.isclose(approx_kl(logp, old, mask).item(), expected, rel_tol=1e-12)
    sym = torch.tensor([[0.0, 0.5, -0.5]], dtype=torch.float64)
    ratio = sym.exp()
    # ρ = e^0.5 > 1.2 with A > 0 is clipped; ρ = e^-0.5 < 0.8 with A > 0 is not (gradient still flows)
    assert clip_fraction(ratio, torch.ones(1, 3), mask).item() == pytest.approx(1 / 3)


def test_masked_mean_global_normaliser_split():
    """Two ranks' halves, each divided by the global count / 2, average to the whole batch's mean (the trainer's
    normaliser: FSDP averages the two gradients)."""
    g = torch.Generator().manual_seed(1)
    B, T = 4, 5
    x = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.arange(T)[None] < torch.tensor([5, 1, 3, 4])[:, None]).double()
    whole = masked_mean(x, mask)
    n = mask.sum().item() / 2
    halves = [masked_mean(x[s], mask[s], n) for s in (slice(0, 2), slice(2, 4))]
    assert torch.isclose(whole, sum(halves) / 2)
    assert torch.isclose(whole, (x * mask).sum() / 13)  # 5 + 1 + 3 + 4 valid tokens


def test_ppo_loss_parts_by_hand():
    """Every part of the composite loss against a hand computation with uneven log-ratios and non-default
    coefficients.

    Catches: a flipped entropy sign (+c_h·H), dropped old_values/value_clip (unclipped value loss), a hard-coded
    or wrong vf_coef (0.5 instead of 0.7), eps_high/dual_clip not passed through to the surrogate.
    """
    logr = [0.3, -0.4, 0.1, 0.25]  # log ρ
    adv = [1.0, -2.0, 0.5, -1.5]
    V, R, V_old = [1.0, 0.2, -0.5, 0.9], [0.4, 0.5, -0.3, 2.0], [0.8, 0.5, -0.45, 0.5]
    H = [2.0, 1.5, 0.5, 3.0]
    eps, eps_high, c, vf, ent, vclip = 0.2, 0.28, 1.2, 0.7, 0.03, 0.1
    pg = []
    for x, a in zip(logr, adv):
        rho = math.exp(x)
        li = -min(rho * a, min(max(rho, 1 - eps), 1 + eps_high) * a)
        pg.append(min(li, -c * a) if a < 0 else li)
    vl = [max((v - r) ** 2, (vo + min(max(v - vo, -vclip), vclip) - r) ** 2) for v, r, vo in zip(V, R, V_old)]
    # hand: ρ = [1.3499, 0.6703, 1.1052, 1.2840]; token 0 clipped at 1.28 → −1.28; token 1: −2·max(0.6703, 0.8)
    # → 1.6; token 3: A<0, ρ = 1.284 → loss 1.926, dual clip caps at 1.2·1.5 = 1.8
    assert math.isclose(pg[0], -1.28) and math.isclose(pg[1], 1.6) and math.isclose(pg[3], 1.8)
    # V_clip = [0.9, 0.2, -0.5, 0.6]: token 0 max(0.36, 0.25) = 0.36; token 3 max(1.21, 1.96) = 1.96
    assert math.isclose(vl[3], 1.96) and vl[3] > (V[3] - R[3]) ** 2
    policy, value, entropy = sum(pg) / 4, sum(vl) / 4, sum(H) / 4
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    mask, old = torch.ones(1, 4), torch.zeros(1, 4, dtype=torch.float64)
    pg_mean = masked_mean(clipped_surrogate_loss(t(logr), old, t(adv), eps, eps_high, c), mask)
    v_mean = masked_mean(value_loss(t(V), t(R), t(V_old), vclip), mask)
    h_mean = masked_mean(t(H), mask)
    assert math.isclose(pg_mean.item(), policy, rel_tol=1e-12)
    assert math.isclose(v_mean.item(), value, rel_tol=1e-12)
    assert math.isclose(h_mean.item(), entropy, rel_tol=1e-12)
    # L = −J_PPO + c_v L_V − c_h H
    loss = ppo_loss(pg_mean, v_mean, h_mean, vf_coef=vf, ent_coef=ent)
    assert math.isclose(loss.item(), policy + vf * value - ent * entropy, rel_tol=1e-12)
    out = policy_diagnostics(t(logr), old, t(adv), mask, (eps, eps_high))
    assert out["clipfrac"].item() == pytest.approx(2 / 4)  # token 0 (ρ > 1.28, A > 0), token 1 (ρ < 0.8, A < 0)


def test_surrogate_validates_clip_arguments():
    """Catches a silent dual_clip ≤ 1 (which would cap even in-band tokens) and an inverted asymmetric range."""
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        clipped_surrogate_loss(x, x, x, dual_clip=1.0)
    with pytest.raises(ValueError, match="eps_high >= eps > 0"):
        clipped_surrogate_loss(x, x, x, eps=0.3, eps_high=0.2)
    with pytest.raises(ValueError, match="eps_high >= eps > 0"):
        clipped_surrogate_loss(x, x, x, eps=0.0)


def test_value_clip_without_old_values_raises():
    """Catches the old behaviour: clip set but old_values None silently skipped the clipping."""
    with pytest.raises(ValueError, match="old_values"):
        value_loss(torch.zeros(3), torch.ones(3), clip=0.2)


def test_kl_shaped_rewards_left_and_right_padding():
    """The score lands on the last real token on either padding side; catches "last = Σ m − 1" (right padding only),
    which puts a left-padded row's score on a padding position."""
    logp = torch.tensor([[-1.0, -2.0, -0.5, -0.7], [-0.3, -0.1, -0.2, -0.4], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.zeros(3, 4)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]])  # left-padded, right-padded, empty
    scores = torch.tensor([2.0, -1.0, 5.0])
    r = kl_shaped_rewards(scores, logp, ref, mask, beta=0.5)
    expected = torch.tensor([[0.0, 0.0, 0.25, 0.35 + 2.0], [0.15, 0.05, 0.1 - 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(r, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("value", [1.2, 0.7, -3.3, 123.456])
def test_explained_variance_constant_returns_is_nan(value, dtype):
    """Catches statistics in the input dtype: a float32 mean of equal returns is inexact, Var[R] came out ~1e-14 > 0
    and explained_variance a huge garbage number instead of NaN."""
    R = torch.full((2, 7), value, dtype=dtype)
    V = torch.linspace(-1, 1, 14, dtype=dtype).reshape(2, 7)
    assert math.isnan(explained_variance(V, R, torch.ones(2, 7)).item())


def test_explained_variance_is_nan_for_all_zero_rewards_after_the_critic_moved():
    """All rewards 0 and a critic that has moved (V ≠ 0): GAE's returns R = A + V are 0 up to float32 rounding
    (±1e-8), and 1 − Var[R − V]/Var[R] would read about −1e15. The returns do not vary beyond rounding: NaN.
    Returns of 0 and 1, and returns that vary by 1e-3 of the values' scale, still give a number."""
    g = torch.Generator().manual_seed(0)
    V = torch.randn(64, 6, generator=g)  # (B, T) float32, the moved critic
    mask = (torch.arange(6)[None] < torch.randint(1, 7, (64, 1), generator=g)).float()  # (B, T) ragged completions
    _, R = compute_gae(torch.zeros(64, 6), V, mask, gamma=1.0, lam=1.0)  # (B, T)
    assert R.abs().max() > 0, "the rounding the test is about is there"
    assert R.abs().max() < 1e-6
    raw = 1 - torch.var(R.double() - V.double()) / torch.var(R.double())
    assert raw < -1e6, "what the old formula logged"
    assert math.isnan(explained_variance(V, R, mask).item())
    R01 = (torch.rand(64, 6, generator=g) > 0.5).float()
    assert math.isfinite(explained_variance(V, R01, mask).item())
    small = 1e-2 * (torch.rand(64, 6, generator=g) - 0.5)  # std ≈ 3e-3 against max |V| ≈ 3: above rtol = 1e-4
    assert math.isfinite(explained_variance(V, small, mask).item())


def test_kl_early_stop_rule():
    """Catches ≥ instead of > and a stop when no target is set."""
    assert kl_early_stop(0.021, 0.02) is True
    assert kl_early_stop(0.02, 0.02) is False  # equal is not "exceeds"
    assert kl_early_stop(0.5, None) is False  # no target: never stop


def test_adaptive_kl_beta_by_hand():
    """Ziegler et al. 2019: e = clip(KL/KL_target − 1, ±0.2), β ← β(1 + e·n/H). Catches a missing clip, a missing
    n/H gain, and a flipped sign (β must grow when KL is above target)."""
    # KL/target = 1.5 → e = 0.5 clipped to 0.2; K = 256/10000 = 0.0256; β = 0.1·(1 + 0.00512) = 0.100512
    assert math.isclose(adaptive_kl_beta(0.1, kl=0.15, kl_target=0.1, horizon=10000, n_samples=256), 0.100512)
    # KL/target = 0.9 → e = −0.1; β = 0.1·(1 − 0.00256) = 0.099744
    assert math.isclose(adaptive_kl_beta(0.1, kl=0.09, kl_target=0.1, horizon=10000, n_samples=256), 0.099744)
    # KL = 0 → e = −1 clipped to −0.2; n = H: β = 0.05·0.8 = 0.04
    assert math.isclose(adaptive_kl_beta(0.05, kl=0.0, kl_target=6.0, horizon=512, n_samples=512), 0.04)
    with pytest.raises(ValueError):
        adaptive_kl_beta(0.1, kl=0.1, kl_target=0.0, horizon=10, n_samples=1)


@pytest.mark.parametrize("n_over_h", [5, 12.8, 100])
def test_adaptive_kl_beta_stays_positive_at_and_beyond_n_equals_5h(n_over_h):
    """KL far below target (e = −0.2) for 200 steps at n = 5H, where the linear factor 1 − 0.2·n/H is 0, and beyond
    it (n = 128, H = 10: the run that ended at β = −1588). β stays > 0 and halves each step (the floor ½); KL far
    above target still moves β up by the linear factor 1 + 0.2·n/H.

    Catches: the factor left unbounded (β = 0 after one step at n = 5H, its sign flipping beyond), a floor applied to
    the upward side as well, or a floor other than the stated ½."""
    H = 10.0
    n = round(n_over_h * H)
    beta = 0.5
    for step in range(200):
        beta = adaptive_kl_beta(beta, kl=0.0, kl_target=0.001, horizon=H, n_samples=n)
        assert beta > 0, step
    assert math.isclose(beta, 0.5 * 0.5**200, rel_tol=1e-12)
    assert math.isclose(adaptive_kl_beta(0.5, kl=1.0, kl_target=0.001, horizon=H, n_samples=n), 0.5 * (1 + 0.2 * n / H))
    # between the floor's edge n = 2.5H and 5H: the linear factor where it is ≥ ½, the floor where it is not
    assert math.isclose(adaptive_kl_beta(0.5, kl=0.9, kl_target=1.0, horizon=10, n_samples=40), 0.5 * (1 - 0.1 * 4))
    assert math.isclose(adaptive_kl_beta(0.5, kl=0.0, kl_target=1.0, horizon=10, n_samples=40), 0.5 * 0.5)
    with pytest.raises(ValueError, match="min_factor"):
        adaptive_kl_beta(0.5, kl=0.0, kl_target=1.0, horizon=10, n_samples=40, min_factor=0.0)


def test_adaptive_kl_beta_is_the_linear_controller_for_n_much_smaller_than_h():
    """n ≪ H (64 samples a step, H = 10000, TRL's horizon): every step equals Ziegler's β(1 + e·n/H), e computed
    here, over KL ratios from 0 to 3 (so e both clipped and not). Catches the bound reaching into the normal regime
    (e.g. an exponential form, whose β·exp(e·n/H) differs in the 6th digit, or a floor above 1 − 0.2·n/H)."""
    beta, n, H = 0.1, 64, 10000.0
    for kl in np.linspace(0.0, 0.3, 31):
        e = min(max(kl / 0.1 - 1.0, -0.2), 0.2)
        expected = beta * (1.0 + e * n / H)
        beta = adaptive_kl_beta(beta, kl=float(kl), kl_target=0.1, horizon=H, n_samples=n)
        assert beta == pytest.approx(expected, rel=1e-15, abs=0), kl


def tiny_policy_and_critic(vocab: int):
    """A one-layer Llama policy and a Llama token-classification critic (one label), the classes the trainer loads."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, initializer_range=0.3, num_labels=1)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), LlamaForTokenClassification(cfg).eval()


def test_ppo_loss_agrees_with_the_trainers_two_backward_passes(one_process_group):
    """One backward through the reference ppo_loss(mean L^CLIP, mean L^V, mean H) against train.minibatch_gradients
    (the policy's terms, then c_v·L_V in a second backward; 2 micro-batches of 2 rows; ragged completions; asymmetric
    and dual clip, value clip, τ = 0.8): the logged `loss` and the gradient of every policy and critic parameter agree.

    Catches: c_v or the entropy's sign applied differently in the trainer's backward than in the documented loss, the
    value clip or ε_high dropped on one side, micro-batches normalised by their own token count instead of the
    minibatch's, the entropy taken at τ = 1 while log π is taken at τ."""
    import train

    B, P, T, V = 4, 3, 5, 11
    policy, critic = tiny_policy_and_critic(V)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (B, P + T), generator=g)  # (B, S)
    attention = torch.ones(B, P + T, dtype=torch.long)  # (B, S)
    mask = (torch.arange(T)[None] < torch.tensor([5, 2, 4, 3])[:, None]).float()  # (B, T)
    args = train.Args(algo="ppo", loss_agg="token-mean", micro_batch_size=2, max_new_tokens=T, temperature=0.8, eps=0.2,
                      eps_high=0.28, dual_clip=3.0, ent_coef=0.05, vf_coef=0.7, value_clip=0.3)

    def forward():
        logits = policy(input_ids=ids, attention_mask=attention).logits[:, P - 1 : -1]  # (B, T, V)
        values = critic(input_ids=ids, attention_mask=attention).logits[:, P - 1 : -1, 0]  # (B, T)
        return logits, token_logprobs_reference(logits, ids[:, P:], args.temperature)[0], values

    with torch.no_grad():
        _, logp, values = forward()
    old_logprobs = logp + 0.3 * torch.randn(B, T, generator=g)  # (B, T) ratios in and out of the clip range
    old_values, returns = values + 0.5 * torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)  # (B, T)
    advantages = torch.randn(B, T, generator=g)  # (B, T)
    batch = train.Rollout(input_ids=ids, attention_mask=attention, completion_mask=mask, loss_mask=mask, n_prompt=P,
                          prompts=[""] * B, answers=[""] * B, texts=[""] * B, old_logprobs=old_logprobs,
                          old_values=old_values, advantages=advantages, returns=returns)
    run = train.Run(args=args, rank=0, world=1, device=torch.device("cpu"), tok=None, train_rows=[], eval_rows=[],
                    optimizers={}, base_lr={}, policy=policy, critic=critic)
    params = list(policy.parameters()) + list(critic.parameters())
    terms = train.minibatch_gradients(run, batch)
    trainer_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    logits, logp, values = forward()
    policy_loss = masked_mean(clipped_surrogate_loss(logp, old_logprobs, advantages, 0.2, 0.28, 3.0), mask)
    critic_loss = masked_mean(value_loss(values, returns, old_values, clip=0.3), mask)
    entropy = masked_mean(entropy_from_logits(logits / args.temperature), mask)
    loss = ppo_loss(policy_loss, critic_loss, entropy, vf_coef=0.7, ent_coef=0.05)
    loss.backward()
    assert terms["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert terms["value_loss"] == pytest.approx(critic_loss.item(), rel=1e-5) and critic_loss.item() > 0.1
    for p, theirs in zip(params, trainer_grads):
        assert p.grad.abs().max() > 0
        torch.testing.assert_close(theirs, p.grad, rtol=1e-4, atol=1e-6)
