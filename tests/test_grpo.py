"""GRPO: group advantages, the baseline argument by exact enumeration, KL estimators and their gradients by exact
expectation, the loss (built from ppo.clipped_surrogate_loss, the one surrogate of both algorithms)."""

import itertools
import math
from fractions import Fraction

import pytest
import torch

from grpo import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    aggregate_loss,
    degenerate_groups,
    group_advantages,
    grpo_loss,
    kl_k1,
    kl_k2,
    kl_k3,
    rloo_advantages,
)
from ppo import clipped_surrogate_loss


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
        # the advantages as the project computes them: Dr.GRPO's R − mean, GRPO's (R − mean)/(std + ε), RLOO's
        advantages = {"mean": group_advantages(r[None], scale=False)[0], "mean_std": group_advantages(r[None])[0],
                      "loo": rloo_advantages(r[None])[0]}
        for i, y in enumerate(ys):
            est["none"] += prob * score[y] * r[i] / G
            est["state"] += prob * score[y] * (r[i] - 0.37) / G  # any constant (a function of the prompt only)
            for name, a in advantages.items():
                est[name] += prob * score[y] * a[i] / G
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


def loss_inputs(seed=4):
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 7
    lengths = [7, 3, 5, 1]
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).double()
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    logp = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logp, old, ref, adv, mask, lengths


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_grpo_loss_equals_naive_loop(mode):
    logp, old, ref, adv, mask, lengths = loss_inputs()
    pg = clipped_surrogate_loss(logp, old, adv[:, None], eps=0.2)  # (B, T) A_i broadcast to every token
    out = grpo_loss(pg, kl_k3(logp, ref), mask, beta=0.04, loss_agg=mode, max_len=10)
    expected = naive_grpo_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), lengths, 0.2, 0.04, mode, 10)
    assert abs(out["loss"].item() - expected) < 1e-12
    no_kl = naive_grpo_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), lengths, 0.2, 0.0, mode, 10)
    assert abs(out["policy_loss"].item() - no_kl) < 1e-12 and not out["policy_loss"].requires_grad
    assert abs(out["kl"].item() - (expected - no_kl) / 0.04) < 1e-10


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_grpo_loss_kl_estimator_choice(name):
    """Each estimator of KL_ESTIMATORS against its formula typed out again: the "kl" key is the chosen one's mean."""
    logp, old, ref, adv, mask, lengths = loss_inputs(6)
    pg = clipped_surrogate_loss(logp, old, adv[:, None])
    out = grpo_loss(pg, KL_ESTIMATORS[name](logp, ref), mask, beta=0.1, loss_agg="token-mean")
    lp, lq = logp.tolist(), ref.tolist()
    hand = {"k1": lambda a, b: a - b, "k2": lambda a, b: 0.5 * (a - b) ** 2,
            "k3": lambda a, b: math.exp(b - a) - (b - a) - 1}[name]
    vals = [hand(lp[i][t], lq[i][t]) for i, L in enumerate(lengths) for t in range(L)]
    assert abs(out["kl"].item() - sum(vals) / len(vals)) < 1e-12
    assert KL_ESTIMATORS[name] is {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}[name]


def test_grpo_ratio_one_is_minus_mean_advantage():
    adv = torch.tensor([1.5, -0.5, 0.25])
    logp = torch.randn(3, 4)
    pg = clipped_surrogate_loss(logp, logp.clone(), adv[:, None])
    out = grpo_loss(pg, None, torch.ones(3, 4), beta=0.0)
    assert torch.isclose(out["loss"], -adv.mean())
    assert "kl" not in out


def test_dr_grpo_requires_max_len():
    """Catches the old silent fallback to the padded width T (which changes with the batch, so is no constant)."""
    with pytest.raises(ValueError, match="max_len"):
        aggregate_loss(torch.ones(2, 3), torch.ones(2, 3), "seq-mean-token-sum-norm")


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


INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
VALUES = [0.0, 1.0, 1.2, 0.7, -3.3, 1e-3, 123.456, 1e6 + 0.1]
SIZES = [2, 3, 4, 8, 16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_equal_rewards_give_exactly_zero(dtype):
    """Catches statistics taken in the input dtype: float32 mean of eight 1.2s is inexact and A came out +0.1057
    for all eight (std ~1e-7 is not hidden by ε = 1e-6)."""
    for value in VALUES:
        for G in SIZES:
            r = torch.full((3, G), value, dtype=dtype)
            for scale in (True, False):
                A = group_advantages(r, scale=scale)
                assert A.dtype == dtype and torch.equal(A, torch.zeros_like(A)), (value, G, scale)
            assert torch.all(degenerate_groups(r))


def exact_advantages(r, eps):
    """(R − mean)/(std + ε) from the exact inputs: mean and variance in rational arithmetic, one final sqrt."""
    R = [Fraction(x) for x in r]
    mean = sum(R) / len(R)
    var = sum((x - mean) ** 2 for x in R) / (len(R) - 1)
    std = math.sqrt(var)
    return [float(x - mean) / (std + eps) for x in R]


@pytest.mark.parametrize("dtype", DTYPES)
def test_last_bit_differences_follow_the_exact_formula(dtype):
    """Rewards one or two ulps apart: the result equals the exact-arithmetic formula (to the output dtype's rounding),
    averages to zero and keeps the rewards' order. Catches unshifted statistics in the input dtype (the mean's rounding
    error is as large as the differences) and a degenerate-group test with a tolerance (std < 1e-6 → 0) that drops
    real signal (both confirmed by breaking the code)."""
    tol = {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    offsets = [0, 1, 0, 2, 1, 0, 2, 1, 0, 1, 2, 0, 1, 0, 0, 2]
    for value in VALUES[1:]:
        for G in SIZES:
            base = torch.full((G,), value, dtype=dtype).view(INT_VIEW[dtype])
            r = (base + torch.tensor(offsets[:G], dtype=base.dtype)).view(dtype)[None]  # (1, G) neighbours in ulps
            A = group_advantages(r)
            exact = exact_advantages([float(x) for x in r[0].tolist()], 1e-6)
            scale = max(abs(a) for a in exact)
            assert scale > 0 and not degenerate_groups(r).item()
            assert all(abs(a - e) <= tol * scale for a, e in zip(A[0].double().tolist(), exact)), (value, G)
            assert abs(A.double().sum().item()) <= G * tol * scale  # zero group mean
            for i, j in itertools.permutations(range(G), 2):
                if r[0, i] > r[0, j]:
                    assert A[0, i] > A[0, j]


def test_valid_mask_hand_values():
    """Invalid members get 0 and stay out of the statistics. Catches masking the output only (the 100 would move the
    mean) and a NaN reward in an invalid slot leaking through the arithmetic."""
    r = torch.tensor([[1.0, 2.0, 3.0, 100.0], [5.0, 7.0, 7.0, 7.0], [4.0, float("nan"), 9.0, 9.0]])
    valid = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0]]).bool()
    A = group_advantages(r, valid=valid)
    # row 0: mean 2, Bessel std 1 → ∓1/(1+ε); row 1: valid rewards all 7 → 0; row 2: one valid member → 0
    e = 1 / (1 + 1e-6)
    torch.testing.assert_close(A, torch.tensor([[-e, 0.0, e, 0.0], [0.0] * 4, [0.0] * 4]))
    assert degenerate_groups(r, valid).tolist() == [False, True, True]
    torch.testing.assert_close(group_advantages(r[:1], scale=False, valid=valid[:1]), torch.tensor([[-1.0, 0, 1, 0]]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_degenerate_groups_are_exactly_the_zero_advantage_groups(dtype):
    """frac_reward_zero_std must count exactly the groups with A ≡ 0; catches a count from float std == 0 (which
    misses the inexact-mean groups) or one that ignores the valid mask."""
    g = torch.Generator().manual_seed(7)
    r = (torch.randint(0, 2, (400, 4), generator=g) * 0.3 + 1.2).to(dtype)  # many all-equal groups
    valid = torch.rand(400, 4, generator=g) > 0.3
    for v in (None, valid):
        deg = degenerate_groups(r, v)
        assert torch.equal(deg, (group_advantages(r, valid=v) == 0).all(-1))
        assert 0 < deg.sum() < 400


def kl_grads(theta, log_ref, k, weights):
    """Σ_a w(a)·∇_θ k(a; θ): the expected gradient with the sampling weights w held fixed (detached)."""
    logp = torch.log_softmax(theta, 0)
    (g,) = torch.autograd.grad((weights.detach() * k(logp, log_ref)).sum(), theta)
    return g


def true_kl_grads(theta, log_ref):
    logp = torch.log_softmax(theta, 0)
    (fwd,) = torch.autograd.grad((logp.exp() * (logp - log_ref)).sum(), theta, retain_graph=True)  # ∇KL(π_θ ‖ π_ref)
    (rev,) = torch.autograd.grad((log_ref.exp() * (log_ref - logp)).sum(), theta)  # ∇KL(π_ref ‖ π_θ)
    return fwd, rev


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_gradients_by_exact_enumeration(seed):
    """E_{a∼π_θ}[∇k1] = 0, E[∇k2] = ∇KL(π_θ‖π_ref), E[∇k3] = ∇KL(π_ref‖π_θ), over a 6-token vocabulary.

    Catches k2 without its ½ (gradient 2·∇KL), k3 written with the ratio inverted (π_θ/π_ref − log(π_θ/π_ref) − 1,
    whose gradient is not ∇KL(π_ref‖π_θ)); a sign-flipped k1 (same zero gradient) is caught by the hand value k1 = 1.
    """
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(6, generator=g, dtype=torch.float64).requires_grad_(True)
    log_ref = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    p = torch.softmax(theta, 0)  # the sampling distribution π_θ
    fwd, rev = true_kl_grads(theta, log_ref)
    assert (fwd - rev).norm() > 0.05 * fwd.norm()  # the two directions really differ here
    torch.testing.assert_close(kl_grads(theta, log_ref, kl_k1, p), torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(kl_grads(theta, log_ref, kl_k2, p), fwd)
    torch.testing.assert_close(kl_grads(theta, log_ref, kl_k3, p), rev)
    assert kl_k1(torch.tensor(-1.0), torch.tensor(-2.0)).item() == 1.0
    assert kl_k2(torch.tensor(-1.0), torch.tensor(-2.0)).item() == 0.5


def test_kl_gradients_off_policy():
    """Samples from π_θold ≠ π_θ (every minibatch after the first): E_{π_θold}[∇k] = ∇_θ E_{a∼π_θold}[k(a; θ)] is not
    the on-policy gradient except at θ = θold; the detached importance weight ρ = π_θ/π_θold recovers it exactly.
    Catches a claim (or an implementation) that the KL term's gradient is unaffected by reusing rollouts."""
    g = torch.Generator().manual_seed(3)
    theta_old = torch.randn(6, generator=g, dtype=torch.float64)
    theta = (theta_old + 0.5 * torch.randn(6, generator=g, dtype=torch.float64)).requires_grad_(True)
    log_ref = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    p_old, p = torch.softmax(theta_old, 0), torch.softmax(theta, 0)
    fwd, rev = true_kl_grads(theta, log_ref)
    for k, on_policy in ((kl_k2, fwd), (kl_k3, rev)):
        off = kl_grads(theta, log_ref, k, p_old)
        assert (off - on_policy).norm() > 0.05 * on_policy.norm()
        torch.testing.assert_close(kl_grads(theta, log_ref, k, p_old * (p / p_old)), on_policy)  # ρ-weighted
        at_old = theta_old.clone().requires_grad_(True)
        torch.testing.assert_close(kl_grads(at_old, log_ref, k, p_old), true_kl_grads(at_old, log_ref)[k is kl_k3])


def tiny_policy(vocab: int):
    """A one-layer Llama, the class the trainer loads for the policy."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, initializer_range=0.3)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("estimator", ["k3", "k2"])
@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_grpo_loss_agrees_with_the_trainers_minibatch_gradients(mode, estimator, one_process_group):
    """The reference grpo_loss, one backward, against train.minibatch_gradients on the same policy and rollout (2
    micro-batches of 2 rows, row 1 dropped as --mask-truncated drops it, asymmetric and dual clip, τ = 0.8, β = 0.04):
    the logged loss, policy_loss and kl_loss, and the gradient of every parameter, agree in each aggregation mode.

    Catches: grpo_loss dividing the per-sequence modes by every row, dropped ones included (the old behaviour: 4
    rows instead of 3, the loss scaled by 3/4), while the trainer counts the rows with a token; β·k or the KL
    estimator combined differently on the two sides; micro-batches normalised by their own counts."""
    import train
    from logprobs import token_logprobs_reference

    B, P, T, V = 4, 3, 5, 11
    policy = tiny_policy(V)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (B, P + T), generator=g)  # (B, S)
    attention = torch.ones(B, P + T, dtype=torch.long)  # (B, S)
    mask = (torch.arange(T)[None] < torch.tensor([5, 0, 4, 2])[:, None]).float()  # (B, T) row 1: no loss token
    args = train.Args(algo="grpo", loss_agg=mode, micro_batch_size=2, max_new_tokens=7, temperature=0.8, eps=0.2,
                      eps_high=0.28, dual_clip=3.0, ent_coef=0.0, kl_estimator=estimator)

    def logprobs():
        logits = policy(input_ids=ids, attention_mask=attention).logits[:, P - 1 : -1]  # (B, T, V)
        return token_logprobs_reference(logits, ids[:, P:], args.temperature)[0]  # (B, T)

    with torch.no_grad():
        logp = logprobs()
    old_logprobs, ref_logprobs = (logp + 0.3 * torch.randn(B, T, generator=g) for _ in range(2))  # (B, T)
    advantages = torch.randn(B, generator=g)  # (B,)
    batch = train.Rollout(input_ids=ids, attention_mask=attention, completion_mask=mask, loss_mask=mask, n_prompt=P,
                          prompts=[""] * B, answers=[""] * B, texts=[""] * B, old_logprobs=old_logprobs,
                          ref_logprobs=ref_logprobs, advantages=advantages)
    run = train.Run(args=args, rank=0, world=1, device=torch.device("cpu"), tok=None, train_rows=[], eval_rows=[],
                    optimizers={}, base_lr={}, policy=policy, ref=policy, beta=0.04)  # ref: its log-probs are above
    terms = train.minibatch_gradients(run, batch)
    trainer_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad(set_to_none=True)
    logp = logprobs()
    pg = clipped_surrogate_loss(logp, old_logprobs, advantages[:, None], 0.2, 0.28, 3.0)  # (B, T)
    out = grpo_loss(pg, KL_ESTIMATORS[estimator](logp, ref_logprobs), mask, beta=0.04, loss_agg=mode, max_len=7)
    out["loss"].backward()
    for ours, theirs in (("loss", "loss"), ("policy_loss", "policy_loss"), ("kl", "kl_loss")):
        assert terms[theirs] == pytest.approx(out[ours].item(), rel=1e-5, abs=1e-7), ours
    for p, theirs in zip(policy.parameters(), trainer_grads):
        assert p.grad.abs().max() > 0
        torch.testing.assert_close(theirs, p.grad, rtol=1e-4, atol=1e-6)
