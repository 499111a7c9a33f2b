"""The documents' errata that carry a number, each shown by an independent computation (docs/errata.md).

Each test recomputes the claim from the document's own inputs; where the library is used, its answer is checked
against a formula written here.
"""

import math

import torch
import torch.nn as nn

from gae import compute_gae
from grpo import aggregate_loss, group_advantages, kl_k3
from ppo import clipped_surrogate_loss, kl_shaped_rewards

# Document 000, "PyTorch: The Real PPO Loss": D, H, V, layers of its toy policy and critic.
D, H, V_VOCAB, N_LAYERS = 256, 4, 32000, 4


class Block(nn.Module):
    """The snippet's TransformerBlock (pre-norm attention + 4D MLP, two LayerNorms); causal=True is our fix."""

    def __init__(self, causal: bool = False):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, H, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))
        self.n1, self.n2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.causal = causal

    def forward(self, x):  # (B, T, D)
        T = x.shape[1]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1) if self.causal else None  # (T, T) True = hidden
        h = self.n1(x)  # (B, T, D)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]  # (B, T, D)
        return x + self.mlp(self.n2(x))  # (B, T, D)


class Net(nn.Module):
    """Policy (head D→V, no bias) or Critic (head D→1), as in the snippet."""

    def __init__(self, out: int, bias: bool, causal: bool = False):
        super().__init__()
        self.embed = nn.Embedding(V_VOCAB, D)
        self.blocks = nn.ModuleList([Block(causal) for _ in range(N_LAYERS)])
        self.head = nn.Linear(D, out, bias=bias)

    def forward(self, tokens):  # (B, T)
        h = self.embed(tokens)  # (B, T, D)
        for blk in self.blocks:
            h = blk(h)  # (B, T, D)
        return self.head(h)  # (B, T, out)


def test_doc000_snippet_parameter_counts():
    """000: "~25M" each and "within 0.1% of each other". The snippet's own modules give 19,543,040 and 11,351,297:
    the V×D head is 8.2M of the policy's 19.5M, so the critic is 58% of the policy, not 99.9%."""
    block = (3 * D * D + 3 * D) + (D * D + D) + (D * 4 * D + 4 * D) + (4 * D * D + D) + 2 * (2 * D)  # qkv, out, MLP, 2 LN
    policy_formula = V_VOCAB * D + N_LAYERS * block + D * V_VOCAB
    critic_formula = V_VOCAB * D + N_LAYERS * block + (D + 1)
    torch.manual_seed(0)
    policy, critic = Net(V_VOCAB, bias=False), Net(1, bias=True)
    p_n = sum(p.numel() for p in policy.parameters())
    c_n = sum(p.numel() for p in critic.parameters())
    assert (p_n, c_n) == (policy_formula, critic_formula) == (19_543_040, 11_351_297)
    assert abs(p_n - c_n) / p_n > 0.4  # not within 0.1%
    assert round(c_n / p_n, 3) == 0.581


def snippet_logprobs(net, tokens, shift):
    """Log-prob of each token: the snippet's gather at the same position (shift=False) or the causal-LM one
    (logits at t−1 score token t)."""
    logp = torch.log_softmax(net(tokens), -1)  # (B, T, V)
    if shift:
        return logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)  # (B, T−1) scores tokens 1..T−1
    return logp.gather(-1, tokens[:, :, None]).squeeze(-1)  # (B, T) scores tokens 0..T−1


@torch.no_grad()
def test_doc000_snippet_logprobs_see_the_future():
    """000's snippet: no causal mask and no one-token shift, so the "log-prob" of token 2 changes when token 5 does
    (and position t sees the very token it scores). With the mask and the shift, earlier positions are unaffected."""
    torch.manual_seed(1)
    tokens = torch.randint(0, V_VOCAB, (1, 8))
    changed = tokens.clone()
    changed[0, 5] = (tokens[0, 5] + 1) % V_VOCAB
    leaky = Net(V_VOCAB, bias=False).eval()
    a, b = snippet_logprobs(leaky, tokens, shift=False), snippet_logprobs(leaky, changed, shift=False)
    assert (a[0, :5] - b[0, :5]).abs().max() > 1e-4  # positions before the change moved: the future leaks
    fixed = Net(V_VOCAB, bias=False, causal=True).eval()
    fixed.load_state_dict(leaky.state_dict())
    a, b = snippet_logprobs(fixed, tokens, shift=True), snippet_logprobs(fixed, changed, shift=True)
    # shifted entry j scores token j+1 from the prefix 0..j: tokens 1..4 come from prefixes without position 5
    torch.testing.assert_close(a[0, :4], b[0, :4], rtol=0, atol=1e-5)
    assert (a[0, 4] - b[0, 4]).abs() > 1e-4  # entry 4 scores the changed token itself


def test_doc000_h100_count():
    """000: a ~2.7 TB footprint on "16–32 H100s". Its own rows: 4 fp16 models × 2 B + 2 AdamW states × 14 B at 70B
    params, plus 120 GB activations and 80 GB overhead = 2720 GB; 2720 / 80 GB = 34 GPUs > 32."""
    params_b = 70  # billions
    total_gb = 4 * 2 * params_b + 2 * 14 * params_b + 120 + 80
    assert total_gb == 2720
    assert total_gb / 80 == 34 and 32 * 80 < total_gb


def test_doc002_per_sequence_normalisation_weights_tokens_by_length():
    """002: "1/|o| neutralizes length bias". Per-token gradient weights of seq-mean-token-mean are A_i/(B·|o_i|):
    a token of a 2-token answer weighs 4x a token of an 8-token one (Dr.GRPO, Liu et al. 2025)."""
    lengths, A = [2, 8], torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    mask = (torch.arange(8)[None] < torch.tensor(lengths)[:, None]).double()  # (2, 8)
    for mode, expected in (("seq-mean-token-mean", [1 / (2 * 2), 1 / (2 * 8)]), ("token-mean", [1 / 10, 1 / 10]),
                           ("seq-mean-token-sum-norm", [1 / 16, 1 / 16])):
        logp = torch.zeros(2, 8, dtype=torch.float64, requires_grad=True)
        loss = aggregate_loss(clipped_surrogate_loss(logp, logp.detach(), A), mask, mode, max_len=8)
        (g,) = torch.autograd.grad(loss, logp)
        # ∂L/∂log π_t = −A_i·w_i at ρ = 1
        assert math.isclose(-g[0, 0].item(), expected[0]) and math.isclose(-g[1, 0].item(), expected[1]), mode


def test_doc001_std_normalisation_is_scale_free_not_a_learning_rate():
    """001: rescaling rewards gives updates "identical modulo a constant learning rate". With std normalisation the
    advantages are the same (up to ε), so nothing changes; only without it (Dr.GRPO) does ×100 act as a step size."""
    r = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    mean = 3 / 5
    std = math.sqrt((2 * mean**2 + 3 * (1 - mean) ** 2) / 4)  # Bessel
    hand = torch.tensor([[(x - mean) / std for x in [0.0, 1.0, 1.0, 0.0, 1.0]]], dtype=torch.float64)
    torch.testing.assert_close(group_advantages(r, eps=0.0), hand)
    torch.testing.assert_close(group_advantages(100 * r, eps=0.0), hand)  # {0, 100}: the same advantages
    assert (group_advantages(100 * r) - group_advantages(r)).abs().max() < 1e-5  # with ε = 1e-6: up to ε
    torch.testing.assert_close(group_advantages(100 * r, scale=False), 100 * (r - mean))  # no std: ×100


def test_doc004_gamma_099_against_doc000_gamma_1():
    """004: γ ≈ 0.99; 000: γ = 1. With a terminal reward after 500 tokens (V = 0, λ = 1) the first token receives
    γ^499 of it: 0.0066 at γ = 0.99, all of it at γ = 1."""
    rewards = torch.zeros(1, 500, dtype=torch.float64)
    rewards[0, -1] = 1.0
    values = torch.zeros(1, 500, dtype=torch.float64)
    for gamma, first in ((0.99, 0.99**499), (1.0, 1.0)):
        A, _ = compute_gae(rewards, values, gamma=gamma, lam=1.0)
        assert math.isclose(A[0, 0].item(), first, rel_tol=1e-12)
    assert round(0.99**499, 4) == 0.0066


def test_doc001_doc004_kl_anchors_are_not_the_same():
    """001 "Anchor ... Same", 004 "same KL penalty": PPO folds k1 into the reward (its gradient goes through the
    advantage, REINFORCE-style) and descends β∇KL(π_θ‖π_ref); GRPO adds β·k3 to the loss and descends
    β∇KL(π_ref‖π_θ). Exact expectation over a 6-token vocabulary, with samples a ∼ π_θ."""
    g = torch.Generator().manual_seed(11)
    theta = torch.randn(6, generator=g, dtype=torch.float64).requires_grad_(True)
    log_ref = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)[None]  # (1, 6) one token each
    beta = 0.1
    logp = torch.log_softmax(theta, 0)[None]  # (1, 6): row = token position, column = the sampled token a
    p = logp.exp().detach()
    # PPO: r = −β k1 at the only token (score 0), A = r (γ = 1, V = 0), loss −ρA at ρ = 1, A detached
    adv = kl_shaped_rewards(torch.zeros(6), logp.T.detach(), log_ref.T, torch.ones(6, 1), beta).T  # (1, 6)
    ppo_term = (p * clipped_surrogate_loss(logp, logp.detach(), adv)).sum()
    (ppo_grad,) = torch.autograd.grad(ppo_term, theta, retain_graph=True)
    (grpo_grad,) = torch.autograd.grad((p * beta * kl_k3(logp, log_ref)).sum(), theta, retain_graph=True)
    (fwd,) = torch.autograd.grad(beta * (logp.exp() * (logp - log_ref)).sum(), theta, retain_graph=True)
    (rev,) = torch.autograd.grad(beta * (log_ref.exp() * (log_ref - logp)).sum(), theta)
    torch.testing.assert_close(ppo_grad, fwd)  # β∇KL(π_θ ‖ π_ref)
    torch.testing.assert_close(grpo_grad, rev)  # β∇KL(π_ref ‖ π_θ)
    assert (ppo_grad - grpo_grad).norm() > 0.1 * ppo_grad.norm()
