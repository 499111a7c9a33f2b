"""GAE: gae.compute_gae on a padded (B, T) batch against a naive loop over each sequence's valid tokens.

compute_gae is vectorised over the batch (one torch op per time step for all B rows); the naive loop walks every
valid token of every sequence in plain Python floats (document 000, "Manual Numerical Walkthrough", step 3). Both are
timed on the same random batch with random lengths, and compared element by element while they are timed.
"""
import time

import torch

import gae


def naive_gae(rewards: torch.Tensor, values: torch.Tensor, lengths: list[int], gamma: float, lam: float):
    """Per sequence b, backwards over its L_b valid tokens: δ_t = r_t + γV_{t+1} − V_t, A_t = δ_t + γλA_{t+1}."""
    B, T = values.shape
    adv, ret = torch.zeros(B, T, dtype=values.dtype), torch.zeros(B, T, dtype=values.dtype)  # (B, T)
    for b, L in enumerate(lengths):
        r, v = rewards[b, :L].tolist(), values[b, :L].tolist()
        a_b, running = [0.0] * L, 0.0
        for t in reversed(range(L)):
            v_next = v[t + 1] if t + 1 < L else 0.0  # V(s_L) = 0 after the last token
            # δ_t = r_t + γ V(s_{t+1}) − V(s_t);  A_t = δ_t + γλ A_{t+1}
            running = r[t] + gamma * v_next - v[t] + gamma * lam * running
            a_b[t] = running
        adv[b, :L] = torch.tensor(a_b, dtype=values.dtype)  # (L,)
        ret[b, :L] = adv[b, :L] + values[b, :L]  # R_t = A_t + V(s_t)
    return adv, ret


def batch(B: int, T: int, seed: int, dtype=torch.float32):
    """Random rewards/values, lengths in [T/2, T] (row 0 full), a prefix mask, as train.sample produces it."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dtype)  # (B, T)
    rewards = torch.randn(B, T, generator=g, dtype=dtype) * 0.01  # (B, T) small per-token KL-like terms
    rewards[torch.arange(B), lengths - 1] += 1.0  # terminal score on the last valid token
    values = torch.randn(B, T, generator=g, dtype=dtype)  # (B, T)
    return rewards, values, mask, lengths.tolist()


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run(lengths_T: list[int], B: int, repeats: int = 3, gamma: float = 1.0, lam: float = 0.95, log=print) -> list[dict]:
    rows = []
    for T in lengths_T:
        rewards, values, mask, lengths = batch(B, T, seed=T)
        t_vec, (A, R) = best_of(lambda: gae.compute_gae(rewards, values, mask, gamma=gamma, lam=lam), repeats)
        t_naive, (A0, R0) = best_of(lambda: naive_gae(rewards, values, lengths, gamma, lam), repeats)
        # float32 recursion (torch) vs float64 recursion (Python floats); γλ < 1 damps rounding error, so 1e-4 of the
        # advantages' scale is loose for float32 and still catches any indexing or masking mistake (errors of order 1)
        err = max((A - A0).abs().max().item(), (R - R0).abs().max().item())
        scale = max(A0.abs().max().item(), 1.0)
        rows.append({"T": T, "B": B, "tokens": sum(lengths), "t_vectorised_ms": 1e3 * t_vec,
                     "t_naive_ms": 1e3 * t_naive, "speedup": t_naive / t_vec, "max_abs_diff": err,
                     "agree": err <= 1e-4 * scale})
        log(f"  gae: T={T} done", flush=True)
    return rows


COLUMNS = [("T", "T"), ("B", "B"), ("tokens", "valid tokens"), ("t_vectorised_ms", "compute_gae ms"),
           ("t_naive_ms", "naive loop ms"), ("speedup", "compute_gae speed-up ×"), ("max_abs_diff", "max |Δ|"),
           ("agree", "agree")]
