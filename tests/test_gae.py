"""GAE invariants: padded batch == naive per-sequence loop; λ = 0 is TD(0); λ = 1 is Monte-Carlo return − V."""

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
    A, R = compute_gae(torch.randn(2, 4), values)
    assert not A.requires_grad and not R.requires_grad
