"""The 2024–25 variants: RLOO and REINFORCE++-baseline advantages, GSPO's sequence ratio and surrogate, the
sampler–trainer correction, DAPO's overlong penalty. Every expected value is computed here independently: naive loops
over Python lists, exact enumeration, or a hand derivation with its arithmetic written out."""

import itertools
import math
from fractions import Fraction

import pytest
import torch

from grpo import (
    aggregate_loss,
    group_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from ppo import (
    clipped_surrogate_loss,
    gspo_surrogate_loss,
    sampler_correction,
    sequence_ratio,
)
from rewards import overlong_penalty

F64 = torch.float64


# ── RLOO ───────────────────────────────────────────────────────────────────────────────────────────────────────


def naive_rloo(rewards: list[list[float]], valid: list[list[bool]]) -> list[list[float]]:
    """A_i = R_i − mean of the other valid rewards of the group; 0 when invalid or when no other member is valid."""
    out = []
    for row, ok in zip(rewards, valid, strict=True):
        adv = []
        for i, r in enumerate(row):
            others = [row[j] for j in range(len(row)) if j != i and ok[j]]
            adv.append(r - sum(others) / len(others) if ok[i] and others else 0.0)
        out.append(adv)
    return out


def test_rloo_against_a_naive_loop_with_invalid_members_and_small_groups():
    rewards = [[1.0, 0.0, 0.5, 0.25], [2.0, -1.0, 3.0, 0.0], [0.3, 0.7, 0.1, 0.9], [5.0, 4.0, 3.0, 2.0]]
    valid = [[True] * 4, [True, False, True, True], [False, True, True, False], [False, True, False, False]]
    got = rloo_advantages(torch.tensor(rewards, dtype=F64), torch.tensor(valid))
    torch.testing.assert_close(got, torch.tensor(naive_rloo(rewards, valid), dtype=F64))
    # by hand, group 2 (two valid members 0.7 and 0.1): A = 0.7 − 0.1 = 0.6 and 0.1 − 0.7 = −0.6
    torch.testing.assert_close(got[2], torch.tensor([0.0, 0.6, -0.6, 0.0], dtype=F64))
    # group 3 has a single valid member: no baseline, A = 0
    assert torch.equal(got[3], torch.zeros(4, dtype=F64))


def test_rloo_sums_to_zero_in_each_group_and_is_exactly_zero_for_equal_rewards():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(5, 6, generator=g, dtype=F64)
    valid = torch.rand(5, 6, generator=g) > 0.3
    A = rloo_advantages(r, valid)
    # Σ_i (R_i − (S − R_i)/(n−1)) = S − (nS − S)/(n−1) = 0 over the valid members
    torch.testing.assert_close((A * valid).sum(-1), torch.zeros(5, dtype=F64))
    assert torch.equal(A[~valid], torch.zeros_like(A[~valid]))
    equal = torch.full((3, 8), 1.2)  # a float32 mean of eight 1.2s is inexact; the float64 shift is not
    assert torch.equal(rloo_advantages(equal), torch.zeros(3, 8))
    part = torch.tensor([[True, False, True, True, False, True, True, True]] * 3)
    assert torch.equal(rloo_advantages(equal, part), torch.zeros(3, 8))


def test_rloo_is_dr_grpo_scaled_by_n_over_n_minus_1():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(4, 5, generator=g, dtype=F64)
    # all valid, n = 5: A_RLOO = 5/4 · (R − mean)
    torch.testing.assert_close(rloo_advantages(r), 5 / 4 * group_advantages(r, scale=False))
    valid = torch.tensor([[True] * 5, [True, True, False, True, False], [False, True, True, False, False],
                          [True, True, True, True, False]])
    n = valid.sum(-1, keepdim=True).to(F64)  # 5, 3, 2, 4
    torch.testing.assert_close(rloo_advantages(r, valid), n / (n - 1) * group_advantages(r, scale=False, valid=valid))


def test_rloo_baseline_is_independent_of_the_own_reward_by_exact_enumeration():
    """G = 3 Bernoulli(p) rewards, all 2^3 outcomes enumerated with exact probabilities.

    Baseline b_i = R_i − A_i. E[b_i | R_i = r] = E[R] = p for r = 0 and r = 1: the baseline does not depend on the
    sample's own reward, which is what makes E[∇log π(y_i)·b_i] = 0. The group mean contains R_i: E[mean | R_i = r] =
    (r + 2p)/3, which does depend on r (document 001's erratum)."""
    p, G = Fraction(1, 3), 3
    for r_own in (0, 1):
        cond_b, cond_mean, mass = Fraction(0), Fraction(0), Fraction(0)
        for rs in itertools.product((0, 1), repeat=G):
            if rs[0] != r_own:
                continue
            prob = math.prod(p if x else 1 - p for x in rs)
            A = rloo_advantages(torch.tensor([rs], dtype=F64))[0, 0].item()
            cond_b += prob * Fraction(rs[0] - A).limit_denominator(1000)
            cond_mean += prob * Fraction(sum(rs), G)
            mass += prob
        assert cond_b / mass == p
        assert cond_mean / mass == (r_own + 2 * p) / 3


def test_rloo_policy_gradient_is_unbiased_by_exact_enumeration():
    """A categorical policy over K = 3 answers, G = 3 samples, all 27 groups enumerated:
    E[(1/G) Σ_i ∇log π(y_i)·A_i] with A from rloo_advantages equals ∇J = Σ_y ∇π(y) R(y), computed by autograd."""
    K, G = 3, 3
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=F64, requires_grad=True)
    R = torch.tensor([0.0, 0.4, 1.0], dtype=F64)
    p = torch.softmax(theta, 0)
    (grad_J,) = torch.autograd.grad((p * R).sum(), theta)
    p = p.detach()
    score = torch.eye(K, dtype=F64) - p  # ∇_θ log π(y) = onehot(y) − π
    est = torch.zeros(K, dtype=F64)
    for ys in itertools.product(range(K), repeat=G):
        A = rloo_advantages(R[list(ys)][None])[0]  # (G,)
        est += math.prod(p[y].item() for y in ys) * sum(score[y] * A[i] for i, y in enumerate(ys)) / G
    torch.testing.assert_close(est, grad_J)


# ── REINFORCE++-baseline ───────────────────────────────────────────────────────────────────────────────────────


def lengths_mask(lengths: list[int], T: int) -> torch.Tensor:
    return torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])


def test_reinforce_pp_baseline_hand_values():
    """P = 2, G = 2, rewards [[1, 0], [0.5, 0.5]], lengths [2, 1, 3, 0].
    Group means 0.5 and 0.5: c = [0.5, −0.5, 0, 0]. Token weights w = [2, 1, 3, 0], N = 6.
    μ = (2·0.5 + 1·(−0.5) + 3·0)/6 = 0.5/6 = 1/12.
    s² = (2·(5/12)² + 1·(−7/12)² + 3·(−1/12)²)/(6 − 1) = (50 + 49 + 3)/144/5 = 102/720 = 17/120.
    Â = (c − μ)/√s² = [5/12, −7/12, −1/12, 0]/√(17/120), the last row having no token."""
    A = reinforce_pp_baseline_advantages(torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=F64),
                                         lengths_mask([2, 1, 3, 0], 3), eps=0.0)
    s = math.sqrt(17 / 120)
    torch.testing.assert_close(A, torch.tensor([5 / 12 / s, -7 / 12 / s, -1 / 12 / s, 0.0], dtype=F64))
    # with the default ε = 1e-8 inside the square root
    A = reinforce_pp_baseline_advantages(torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=F64),
                                         lengths_mask([2, 1, 3, 0], 3))
    s = math.sqrt(17 / 120 + 1e-8)
    torch.testing.assert_close(A, torch.tensor([5 / 12 / s, -7 / 12 / s, -1 / 12 / s, 0.0], dtype=F64))


def naive_reinforce_pp(rewards, valid, lengths, eps):
    """Group mean over valid members, then one list entry per valid token, its mean and Bessel variance."""
    G = len(rewards[0])
    centred = []
    for row, ok in zip(rewards, valid, strict=True):
        members = [r for r, v in zip(row, ok, strict=True) if v]
        mean = sum(members) / len(members) if members else 0.0
        centred += [r - mean if v else 0.0 for r, v in zip(row, ok, strict=True)]
    flat_valid = [v for ok in valid for v in ok]
    tokens = [c for c, v, n in zip(centred, flat_valid, lengths, strict=True) if v for _ in range(n)]
    mu = sum(tokens) / len(tokens)
    var = sum((x - mu) ** 2 for x in tokens) / (len(tokens) - 1)
    assert len(centred) == len(rewards) * G
    return [(c - mu) / math.sqrt(var + eps) if v and n > 0 else 0.0
            for c, v, n in zip(centred, flat_valid, lengths, strict=True)]


def test_reinforce_pp_baseline_against_a_naive_token_loop():
    g = torch.Generator().manual_seed(2)
    P, G, T = 3, 4, 6
    rewards = torch.rand(P, G, generator=g, dtype=F64)
    valid = torch.tensor([[True, True, False, True], [True, True, True, True], [False, True, True, False]])
    lengths = [3, 6, 2, 0, 1, 4, 5, 6, 2, 2, 3, 1]  # row p·G + g
    got = reinforce_pp_baseline_advantages(rewards, lengths_mask(lengths, T), valid)
    want = naive_reinforce_pp(rewards.tolist(), valid.tolist(), lengths, 1e-8)
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64))


def test_reinforce_pp_baseline_whitens_over_all_valid_tokens():
    g = torch.Generator().manual_seed(3)
    P, G, T = 4, 3, 7
    mask = (torch.rand(P * G, T, generator=g) > 0.4).to(F64)
    A = reinforce_pp_baseline_advantages(torch.randn(P, G, generator=g, dtype=F64), mask, eps=0.0)
    tokens = A[:, None].expand(-1, T)[mask.bool()]  # each sequence's value repeated at each of its tokens
    torch.testing.assert_close(tokens.mean(), torch.tensor(0.0, dtype=F64))
    torch.testing.assert_close(tokens.std(), torch.tensor(1.0, dtype=F64))  # torch.std is Bessel-corrected


def test_reinforce_pp_baseline_is_exactly_zero_on_constant_rewards():
    mask = lengths_mask([3, 1, 2, 4, 4, 2], 4)
    assert torch.equal(reinforce_pp_baseline_advantages(torch.full((2, 3), 1.2), mask), torch.zeros(6))
    valid = torch.tensor([[True, False, True], [True, True, True]])
    rewards = torch.tensor([[0.7, 5.0, 0.7], [1.1, 1.1, 1.1]])  # the invalid 5.0 is left out of its group's mean
    assert torch.equal(reinforce_pp_baseline_advantages(rewards, mask, valid), torch.zeros(6))
    with pytest.raises(ValueError, match="P·G, T"):
        reinforce_pp_baseline_advantages(torch.ones(2, 3), torch.ones(5, 4))


# ── GSPO ───────────────────────────────────────────────────────────────────────────────────────────────────────


def seq_mean_token_mean_grad(loss_fn, old, mask):
    """Gradient w.r.t. log π_θ (a leaf equal to old) of the seq-mean-token-mean aggregate of loss_fn(lp)."""
    lp = old.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(aggregate_loss(loss_fn(lp), mask, "seq-mean-token-mean"), lp)
    return grad


def test_gspo_gradient_at_theta_old_equals_the_token_level_clipped_surrogate():
    """At θ = θold every ratio is 1: both losses give −A_i/(B·|y_i|) at each valid token, 0 on padding."""
    g = torch.Generator().manual_seed(4)
    old = -torch.rand(3, 5, generator=g, dtype=F64) * 3
    mask = lengths_mask([5, 2, 3], 5).to(F64)
    A = torch.tensor([1.5, -0.5, 2.0], dtype=F64)
    gspo = seq_mean_token_mean_grad(lambda lp: gspo_surrogate_loss(lp, old, A, mask), old, mask)
    ppo = seq_mean_token_mean_grad(lambda lp: clipped_surrogate_loss(lp, old, A[:, None]), old, mask)
    torch.testing.assert_close(gspo, ppo)
    hand = -A[:, None] / (3 * torch.tensor([[5.0], [2.0], [3.0]], dtype=F64)) * mask
    torch.testing.assert_close(gspo, hand)


def test_gspo_inside_the_band_by_hand():
    """One sequence, tokens log π_θ − log π_θold = [1e-4, 3e-4] and a padding token.
    log s = (1e-4 + 3e-4)/2 = 2e-4, s = e^{2e-4} = 1.00020002000133… ∈ [1 − 3e-4, 1 + 4e-4] (inside the band).
    With A = 1.5 the seq-mean-token-mean loss is −s·A = −1.50030003000200…; the gradient at each valid token is
    −(1/|y|)·s·A = −(1/2)·1.00020002·1.5 = −0.75015001500100…, and 0 at the padding token."""
    old = torch.tensor([[-1.0, -2.0, -3.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=F64)
    lp = (old + torch.tensor([[1e-4, 3e-4, 5.0]], dtype=F64)).requires_grad_(True)
    s = 1.0002000200013334  # e^{0.0002} = 1 + 2e-4 + 2e-8 + 1.3333e-12 + …
    loss = aggregate_loss(gspo_surrogate_loss(lp, old, torch.tensor([1.5], dtype=F64), mask), mask)
    torch.testing.assert_close(loss, torch.tensor(-1.5 * s, dtype=F64))
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, torch.tensor([[-0.5 * s * 1.5, -0.5 * s * 1.5, 0.0]], dtype=F64))
    # sequence_ratio itself carries the gradient ∂s/∂log π_t = s/|y| = s/2 at valid tokens, 0 at padding
    lp2 = lp.detach().clone().requires_grad_(True)
    ratio = sequence_ratio(lp2, old, mask)
    torch.testing.assert_close(ratio, torch.tensor([s], dtype=F64))
    (grad_s,) = torch.autograd.grad(ratio.sum(), lp2)
    torch.testing.assert_close(grad_s, torch.tensor([[s / 2, s / 2, 0.0]], dtype=F64))


def test_gspo_clip_acts_on_the_whole_sequence():
    """Both tokens log-ratio 1e-3: s = e^{1e-3} = 1.0010005 > 1 + 4e-4.
    A = +1: the clipped branch −(1 + 4e-4)·A = −1.0004 is the larger loss, a constant: gradient 0 at every token.
    A = −1: the unclipped branch −s·A = s is the larger loss (the pessimistic side keeps its gradient):
    gradient −(1/|y|)·s·A = s/2 = 0.50050025 at each valid token."""
    old = torch.tensor([[-1.0, -2.0, -0.5]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=F64)
    s = math.exp(1e-3)
    for adv, want_loss, want_grad in ((1.0, -1.0004, [0.0, 0.0, 0.0]), (-1.0, s, [s / 2, s / 2, 0.0])):
        lp = (old + torch.tensor([[1e-3, 1e-3, 0.0]], dtype=F64)).requires_grad_(True)
        loss = aggregate_loss(gspo_surrogate_loss(lp, old, torch.tensor([[adv]], dtype=F64), mask), mask)
        torch.testing.assert_close(loss, torch.tensor(want_loss, dtype=F64))
        (grad,) = torch.autograd.grad(loss, lp)
        torch.testing.assert_close(grad, torch.tensor([want_grad], dtype=F64))


def test_gspo_shapes_defaults_and_validation():
    old = torch.zeros(2, 3)
    mask = torch.ones(2, 3)
    loss = gspo_surrogate_loss(old + torch.tensor([[3.5e-4] * 3, [0.0] * 3]), old, torch.tensor([1.0, 1.0]), mask)
    # s_0 = e^{3.5e-4} is inside [1 − 3e-4, 1 + 4e-4]: unclipped, −s_0 (the default ε_high is the paper's 4e-4)
    torch.testing.assert_close(loss[0], torch.full((3,), -math.exp(3.5e-4)))
    with pytest.raises(ValueError, match="one advantage per sequence"):
        gspo_surrogate_loss(old, old, torch.ones(2, 3), mask)
    with pytest.raises(ValueError, match="eps_high >= eps > 0"):
        gspo_surrogate_loss(old, old, torch.ones(2), mask, eps=1e-3)  # ε_high defaults to 4e-4 < ε
    with pytest.raises(ValueError, match="eps_high >= eps > 0"):
        gspo_surrogate_loss(old, old, torch.ones(2), mask, eps=0.0, eps_high=0.1)


def test_sequence_ratio_empty_rows_and_the_clamp():
    old = torch.zeros(2, 3, dtype=F64)
    mask = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=F64)
    lp = torch.tensor([[7.0, 7.0, 7.0], [50.0, 50.0, 50.0]], dtype=F64, requires_grad=True)
    ratio = sequence_ratio(lp, old, mask)
    # a row with no tokens: exp(0/1) = 1; log s = 50 is clamped to 10: s = e^10 = 22026.465…, finite
    torch.testing.assert_close(ratio, torch.tensor([1.0, math.exp(10.0)], dtype=F64))
    (grad,) = torch.autograd.grad(ratio.sum(), lp)
    assert torch.equal(grad, torch.zeros_like(grad))  # empty row: no token; clamped row: s is constant beyond 10
    half = torch.tensor([[-60.0, -60.0], [-60.0, -60.0]], dtype=torch.float16)
    assert torch.isfinite(sequence_ratio(-half, torch.zeros_like(half), torch.ones(2, 2))).all()


# ── Sampler–trainer correction ─────────────────────────────────────────────────────────────────────────────────


def test_sampler_correction_is_exactly_one_when_the_sampler_agrees():
    g = torch.Generator().manual_seed(5)
    old = -torch.rand(3, 4, generator=g) * 5
    mask = lengths_mask([4, 2, 0], 4)
    for seq in (False, True):
        out = sampler_correction(old, old.clone(), mask, sequence_mask=seq)
        assert torch.equal(out["weights"], mask)
        assert not out["truncated"].any() and not out["masked"].any()


def test_sampler_correction_truncates_by_hand():
    """log π_θold − log p_sampler = [log 3, log 1.5, −log 2] → ratios [3, 1.5, 0.5]; with C = 2 the first is
    truncated: weights [min(3, 2), 1.5, 0.5] = [2, 1.5, 0.5]."""
    sampler = torch.tensor([[-1.0, -2.0, -0.3]], dtype=F64)
    old = sampler + torch.tensor([[math.log(3), math.log(1.5), -math.log(2)]], dtype=F64)
    out = sampler_correction(old, sampler, torch.ones(1, 3), cap=2.0)
    torch.testing.assert_close(out["weights"], torch.tensor([[2.0, 1.5, 0.5]], dtype=F64))
    assert out["truncated"].tolist() == [[True, False, False]] and out["masked"].tolist() == [False]


def test_sampler_correction_masks_sequences_outside_one_over_c_to_c():
    """C = 2, the sequence ratio Π_t ρ_t against [1/2, 2]:
    row 0: 1.5 · 1.2 = 1.8        inside  → kept, weights [1.5, 1.2]
    row 1: 1.5 · 1.5 = 2.25 > 2   outside → masked, weights [0, 0]
    row 2: 0.6 · 0.7 = 0.42 < 0.5 outside → masked
    row 3: 3 · 0.25 = 0.75        inside  → kept; the token ratio 3 is still truncated: weights [2, 0.25]
    row 4: 1.5, then a padding token whose ratio e^20 counts nowhere → kept, weights [1.5, 0]"""
    ratios = [[1.5, 1.2], [1.5, 1.5], [0.6, 0.7], [3.0, 0.25], [1.5, math.exp(20.0)]]
    sampler = torch.full((5, 2), -2.0, dtype=F64)
    old = sampler + torch.tensor(ratios, dtype=F64).log()
    mask = torch.tensor([[1.0, 1.0]] * 4 + [[1.0, 0.0]])
    out = sampler_correction(old, sampler, mask, cap=2.0, sequence_mask=True)
    assert out["masked"].tolist() == [False, True, True, False, False]
    want = torch.tensor([[1.5, 1.2], [0.0, 0.0], [0.0, 0.0], [2.0, 0.25], [1.5, 0.0]], dtype=F64)
    torch.testing.assert_close(out["weights"], want)
    assert out["truncated"].tolist() == [[False, False]] * 3 + [[True, False], [False, False]]
    off = sampler_correction(old, sampler, mask, cap=2.0)  # without the sequence mask nothing is masked
    assert not off["masked"].any()
    torch.testing.assert_close(off["weights"][1], torch.tensor([1.5, 1.5], dtype=F64))


def test_sampler_correction_padding_gradients_and_validation():
    old = torch.tensor([[-1.0, 0.0]], requires_grad=True)
    sampler = torch.tensor([[-1.2, -1000.0]])  # padding: a log-ratio of 1000 would overflow exp
    out = sampler_correction(old, sampler, torch.tensor([[1.0, 0.0]]), sequence_mask=True)
    torch.testing.assert_close(out["weights"], torch.tensor([[math.exp(0.2), 0.0]]))
    assert not out["weights"].requires_grad and not out["truncated"][0, 1]
    for cap in (1.0, 0.5):
        with pytest.raises(ValueError, match="must be > 1"):
            sampler_correction(old, sampler, torch.ones(1, 2), cap=cap)


# ── DAPO's overlong penalty ────────────────────────────────────────────────────────────────────────────────────


def test_overlong_penalty_pieces_by_hand():
    """L_max = 20, L_cache = 5: the ramp starts at L_max − L_cache = 15.
    |y| = 10 → 0;  15 → 0 (boundary);  16 → (15 − 16)/5 = −0.2;  17 → (15 − 17)/5 = −0.4;  20 → (15 − 20)/5 = −1;
    21 → −1 (past L_max)."""
    got = overlong_penalty(torch.tensor([10, 15, 16, 17, 20, 21]), max_len=20, buffer=5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.2, -0.4, -1.0, -1.0]))
    # buffer = max_len: the ramp spans the whole range, −|y|/L_max
    torch.testing.assert_close(overlong_penalty(torch.tensor([0.0, 2.0, 8.0, 9.0], dtype=F64), 8, 8),
                               torch.tensor([0.0, -0.25, -1.0, -1.0], dtype=F64))


@pytest.mark.parametrize("max_len, buffer", [(20, 0), (20, -1), (20, 21), (0, 0)])
def test_overlong_penalty_validation(max_len, buffer):
    with pytest.raises(ValueError, match="0 < buffer <= max_len"):
        overlong_penalty(torch.tensor([1, 2]), max_len=max_len, buffer=buffer)
