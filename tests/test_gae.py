"""GAE invariants: padded batch == naive per-sequence loop; λ = 0 is TD(0); λ = 1 is Monte-Carlo return − V."""

import math

import pytest
import torch

from gae import compute_gae, whiten


def naive_gae(rewards, values, gamma, lam):
    """Textbook definition A_t = Σ_k (γλ)^k δ_{t+k} as a double loop over one unpadded sequence (lists)."""
    T = len(rewards)
    v_next = [values[t + 1] if t + 1 < T else 0.0 for t in range(T)]
    deltas = [rewards[t] + gamma * v_next[t] - values[t] for t in range(T)]
    adv = [sum((gamma * lam) ** k * deltas[t + k] for k in range(T - t)) for t in range(T)]
    return adv, [a + v for a, v in zip(adv, values)]


def padded_batch(seed, B=5, T=9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()  # (B, T)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    # garbage in the padding must not leak into valid positions
    rewards = torch.where(mask.bool(), rewards, torch.full_like(rewards, 1e6))
    values = torch.where(mask.bool(), values, torch.full_like(values, -1e6))
    return rewards, values, mask, lengths


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
def test_padded_equals_naive_loop(gamma, lam):
    rewards, values, mask, lengths = padded_batch(0)
    A, R = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    for b, L in enumerate(lengths.tolist()):
        adv, ret = naive_gae(rewards[b, :L].tolist(), values[b, :L].tolist(), gamma, lam)
        torch.testing.assert_close(A[b, :L], torch.tensor(adv, dtype=torch.float64))
        torch.testing.assert_close(R[b, :L], torch.tensor(ret, dtype=torch.float64))
        assert torch.all(A[b, L:] == 0) and torch.all(R[b, L:] == 0)


def test_lambda_zero_is_td0():
    rewards, values, mask, lengths = padded_batch(1)
    A, _ = compute_gae(rewards, values, mask, gamma=0.97, lam=0.0)
    for b, L in enumerate(lengths.tolist()):
        for t in range(L):
            v_next = values[b, t + 1].item() if t + 1 < L else 0.0
            assert abs(A[b, t].item() - (rewards[b, t].item() + 0.97 * v_next - values[b, t].item())) < 1e-9


def test_lambda_one_is_monte_carlo_minus_value():
    rewards, values, mask, lengths = padded_batch(2)
    A, R = compute_gae(rewards, values, mask, gamma=0.95, lam=1.0)
    for b, L in enumerate(lengths.tolist()):
        for t in range(L):
            mc = sum(0.95**k * rewards[b, t + k].item() for k in range(L - t))
            assert abs(A[b, t].item() - (mc - values[b, t].item())) < 1e-9
            assert abs(R[b, t].item() - mc) < 1e-9  # with λ = 1 the value target is the plain return


def test_whiten_masked():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, 99.0, 99.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    expected = (vals - vals.mean()) / (vals.std() + 1e-8)  # torch.std is Bessel-corrected
    w = whiten(x, mask)
    torch.testing.assert_close(w[mask.bool()], expected)
    assert torch.all(w[~mask.bool()] == 0)


def test_no_grad_flows_into_values():
    values = torch.randn(2, 4, requires_grad=True)
    A, R = compute_gae(torch.randn(2, 4), values, lam=0.95)
    assert not A.requires_grad and not R.requires_grad


def test_lambda_has_no_default():
    """λ must be given, by name: document 000 uses 0.95, the trainer 1 (--lam), and a silent default picked one.
    Catches the old signature, where compute_gae(r, V, mask) ran with λ = 0.95 and γ could be passed by position.
    With γ = 1 and a terminal reward 1 on 3 tokens, V ≡ 0.5: λ = 1 gives A_t = 1 − 0.5 at every token, while
    λ = 0.95 gives A_0 = δ_0 + 0.95·δ_1 + 0.95²·δ_2 = 0 + 0 + 0.9025·0.5."""
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5)
    with pytest.raises(TypeError, match="lam"):
        compute_gae(rewards, values, None)
    with pytest.raises(TypeError):
        compute_gae(rewards, values, None, 1.0, 1.0)  # γ and λ by position
    torch.testing.assert_close(compute_gae(rewards, values, lam=1.0)[0], torch.tensor([[0.5, 0.5, 0.5]]))
    torch.testing.assert_close(compute_gae(rewards, values, lam=0.95)[0][0, 0], torch.tensor(0.9025 * 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("value", [1.2, 0.7, -3.3, 1e6 + 0.1, 1e-7])
def test_whiten_constant_input_is_exact(value, dtype):
    """Catches whitening in the input dtype: a float32 mean of equal 1.2s is inexact, and the residual ±1e-7 divided
    by std ≈ 1e-7 + 1e-8 gave ±O(1) garbage; shift_mean=False gave x/1e-8."""
    x = torch.full((3, 5), value, dtype=dtype)
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    assert torch.equal(whiten(x, mask), torch.zeros_like(x))
    kept = whiten(x, mask, shift_mean=False)
    assert kept.dtype == dtype
    assert torch.equal(kept[mask.bool()], x[mask.bool()]) and torch.all(kept[~mask.bool()] == 0)


def test_whiten_shift_mean_false_keeps_the_mean():
    """(x − mean)/(std + ε) + mean, TRL's semantics; catches the old "x/(std + ε)" (rescale only, mean not kept)."""
    x = torch.tensor([[1.0, 2.0, 6.0, 99.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.float64)
    mean = 3.0
    std = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)  # Bessel: sqrt(14/2)
    expected = [(v - mean) / (std + 1e-8) + mean for v in (1.0, 2.0, 6.0)] + [0.0]
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), torch.tensor([expected], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gae_upcasts_half_precision(dtype):
    """Catches a recursion run in bf16/fp16: 64 terminal-reward steps of 0.3 + 0.99·(...) drift by > 1e-3 in bf16."""
    T = 64
    rewards = torch.zeros(1, T)
    rewards[0, -1] = 1.0
    values = torch.full((1, T), 0.3)
    A, R = compute_gae(rewards.to(dtype), values.to(dtype), gamma=0.99, lam=0.97)
    assert A.dtype == torch.float32 and R.dtype == torch.float32
    adv, ret = naive_gae(rewards[0].tolist(), values.to(dtype).float()[0].tolist(), 0.99, 0.97)
    torch.testing.assert_close(A[0], torch.tensor(adv), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(R[0], torch.tensor(ret), rtol=1e-6, atol=1e-6)
