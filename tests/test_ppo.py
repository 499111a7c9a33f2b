"""PPO pieces: the clipping case analysis of document 002 by autograd, value clipping, entropy, KL shaping, metrics."""

import math

import numpy as np
import pytest
import torch

from ppo import (approx_kl, clip_fraction, clipped_surrogate_loss, entropy_from_logits, explained_variance,
                 kl_shaped_rewards, ppo_loss, value_loss)

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
    loss = clipped_surrogate_loss(logp, old, adv, eps_low=0.2, eps_high=0.28, dual_clip=3.0)
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
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.tensor([[0.0, 0.5, -0.5]], dtype=torch.float64)
    mask = torch.ones(1, 3)
    expected = sum(math.exp(x) - 1 - x for x in [0.0, 0.5, -0.5]) / 3
    assert math.isclose(approx_kl(logp, old, mask).item(), expected, rel_tol=1e-12)
    ratio = logp.exp()
    # ρ = e^0.5 > 1.2 with A > 0 is clipped; ρ = e^-0.5 < 0.8 with A > 0 is not (gradient still flows)
    assert clip_fraction(ratio, torch.ones(1, 3), mask).item() == pytest.approx(1 / 3)


def test_ppo_loss_global_normaliser_split():
    g = torch.Generator().manual_seed(1)
    B, T = 4, 5
    args = [torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(5)]
    mask = (torch.arange(T)[None] < torch.tensor([5, 1, 3, 4])[:, None]).double()
    whole = ppo_loss(args[0], args[1], args[2], mask, values=args[3], returns=args[4])["loss"]
    n = mask.sum().item() / 2
    halves = [ppo_loss(*(a[s] for a in args[:3]), mask[s], values=args[3][s], returns=args[4][s], num_tokens=n)["loss"]
              for s in (slice(0, 2), slice(2, 4))]
    assert torch.isclose(whole, sum(halves) / 2)
