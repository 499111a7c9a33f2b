"""GRPO: group advantages, the baseline argument by exact enumeration, KL estimators by exact expectation, the loss."""

import itertools
import math

import pytest
import torch

from grpo import LOSS_AGGREGATIONS, aggregate_loss, group_advantages, grpo_loss, kl_k1, kl_k2, kl_k3


def test_group_advantages_hand_values():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    # mean 0.5, Bessel std sqrt((4·0.25)/3) = sqrt(1/3)
    s = math.sqrt(1 / 3)
    torch.testing.assert_close(group_advantages(r, eps=0.0), torch.tensor([[0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s]]))
    torch.testing.assert_close(group_advantages(r, scale=False), torch.tensor([[0.5, -0.5, -0.5, 0.5]]))


def test_group_advantages_invariants():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(6, 8, generator=g, dtype=torch.float64)
    A = group_advantages(r)
    torch.testing.assert_close(A.mean(-1), torch.zeros(6, dtype=torch.float64))  # zero mean within each group
    torch.testing.assert_close(group_advantages(100 * r + 3, eps=0.0), group_advantages(r, eps=0.0))  # scale-free
    equal = torch.full((2, 4), 0.7)
    assert torch.equal(group_advantages(equal), torch.zeros(2, 4))  # degenerate group: zeros, never NaN
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))


def test_baseline_by_exact_enumeration():
    """Expected policy gradient on a categorical policy, enumerating all K^G groups exactly.

    Derivation (document 001's baseline argument, corrected): for baseline b independent of y_i,
    E[∇log π(y_i) b] = b Σ_y ∇π(y) = 0. The group mean is not independent of y_i: R_i − mean_j R_j =
    (1 − 1/G)(R_i − mean_{j≠i} R_j), so E[∇log π(y_i)(R_i − mean_j R_j)] = (1 − 1/G)∇J. Leave-one-out is exact.
    """
    K, G = 3, 3
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    R = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
    p = torch.softmax(theta, 0)
    (grad_J,) = torch.autograd.grad((p * R).sum(), theta)  # ∇J = Σ_y ∇π(y) R(y), exactly
    p = p.detach()
    score = torch.eye(K, dtype=torch.float64) - p  # ∇_θ log π(y) = onehot(y) − π, row y
    est = {name: torch.zeros(K, dtype=torch.float64) for name in ["none", "state", "mean", "loo", "mean_std"]}
    for ys in itertools.product(range(K), repeat=G):
        prob = math.prod(p[y].item() for y in ys)
        r = R[list(ys)]
        mean, std = r.mean(), r.std()
        for i, y in enumerate(ys):
            loo = (r.sum() - r[i]) / (G - 1)
            est["none"] += prob * score[y] * r[i] / G
            est["state"] += prob * score[y] * (r[i] - 0.37) / G  # any constant (a function of the prompt only)
            est["mean"] += prob * score[y] * (r[i] - mean) / G
            est["loo"] += prob * score[y] * (r[i] - loo) / G
            est["mean_std"] += prob * score[y] * ((r[i] - mean) / (std + 1e-6)) / G
    torch.testing.assert_close(est["none"], grad_J)
    torch.testing.assert_close(est["state"], grad_J)
    torch.testing.assert_close(est["loo"], grad_J)
    torch.testing.assert_close(est["mean"], (1 - 1 / G) * grad_J)  # biased in scale by (G−1)/G, same direction
    cos = torch.dot(est["mean_std"], grad_J) / (est["mean_std"].norm() * grad_J.norm())
    assert cos > 0.5  # still an ascent direction here ...
    assert cos < 1 - 1e-4  # ... but not a multiple of ∇J: std normalisation changes the direction


def kl_exact(p, q):
    return (p * (p / q).log()).sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_estimators_exact_expectation(seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)  # π_θ, the sampling distribution
    q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)  # π_ref
    lp, lq = p.log(), q.log()
    kl = kl_exact(p, q)
    # E_{a∼π_θ}[k] = Σ_a π_θ(a) k(a): exact expectation, no sampling
    assert torch.isclose((p * kl_k1(lp, lq)).sum(), kl)  # unbiased
    assert torch.isclose((p * kl_k3(lp, lq)).sum(), kl)  # unbiased
    assert not torch.isclose((p * kl_k2(lp, lq)).sum(), kl, rtol=1e-3)  # biased
    assert torch.all(kl_k3(lp, lq) >= 0) and torch.all(kl_k2(lp, lq) >= 0)
    assert torch.any(kl_k1(lp, lq) < 0)  # k1 can be negative sample by sample
    assert torch.equal(kl_k3(lp, lp), torch.zeros(6, dtype=torch.float64))


def test_kl_k3_monte_carlo():
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    a = torch.multinomial(p, 200_000, replacement=True, generator=g)
    mc = kl_k3(p.log()[a], q.log()[a])
    assert abs(mc.mean() - kl_exact(p, q)) < 4 * mc.std() / math.sqrt(len(a))


def naive_grpo_loss(logp, old, ref, adv, lengths, eps, beta, mode, L_max):
    """Document 001's formula, one token at a time."""
    per_seq, total, n_tok = [], 0.0, 0
    for i, L in enumerate(lengths):
        s = 0.0
        for t in range(L):
            rho = math.exp(logp[i][t] - old[i][t])
            pg = -min(rho * adv[i], min(max(rho, 1 - eps), 1 + eps) * adv[i])
            lr = ref[i][t] - logp[i][t]
            s += pg + beta * (math.exp(lr) - lr - 1)
        per_seq.append(s / L)
        total, n_tok = total + s, n_tok + L
    return {"seq-mean-token-mean": sum(per_seq) / len(lengths), "token-mean": total / n_tok,
            "seq-mean-token-sum-norm": total / (len(lengths) * L_max)}[mode]


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_grpo_loss_equals_naive_loop(mode):
    g = torch.Generator().manual_seed(4)
    B, T = 4, 7
    lengths = [7, 3, 5, 1]
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).double()
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    logp = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    out = grpo_loss(logp, old, adv, mask, ref_logprobs=ref, eps=0.2, beta=0.04, loss_agg=mode, max_len=10)
    expected = naive_grpo_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), lengths, 0.2, 0.04, mode, 10)
    assert abs(out["loss"].item() - expected) < 1e-12


def test_grpo_ratio_one_is_minus_mean_advantage():
    adv = torch.tensor([1.5, -0.5, 0.25])
    logp = torch.randn(3, 4)
    out = grpo_loss(logp, logp.clone(), adv, torch.ones(3, 4), beta=0.0)
    assert torch.isclose(out["loss"], -adv.mean())


def test_split_across_ranks_matches_global():
    """Two halves with global normalisers, averaged (what FSDP does to gradients), equal the whole batch."""
    g = torch.Generator().manual_seed(5)
    per_token = torch.randn(6, 5, generator=g, dtype=torch.float64)
    mask = (torch.arange(5)[None] < torch.tensor([5, 2, 4, 1, 3, 5])[:, None]).double()
    for mode in LOSS_AGGREGATIONS:
        whole = aggregate_loss(per_token, mask, mode, max_len=5)
        n_tok = mask.sum().item() / 2
        halves = [aggregate_loss(per_token[s], mask[s], mode, 5, num_sequences=3, num_tokens=n_tok)
                  for s in (slice(0, 3), slice(3, 6))]
        assert torch.isclose(whole, sum(halves) / 2)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(per_token, mask, "bogus")
