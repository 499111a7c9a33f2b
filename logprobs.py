"""logprobs.py — log π(token) and the entropy of π at every completion position, from one forward pass.

Both losses need them: the clipped surrogate's ratio ρ = exp(log π_θ − log π_θold) (document 000, "The Mathematics of
PPO and Its Critic") and the entropy bonus H = −Σ_a π log π (document 004, "The full PPO objective for RLHF"); the
supervised loss is −log π of the response tokens (document 004, "1. Background: From Pre-training to SFT").

    log π(y_t | y_<t) = z_y/τ − logsumexp(z/τ)          H_t = logsumexp(z/τ) − Σ_a p_a z_a/τ,   p = softmax(z/τ)

`token_logprobs_reference` is that, in four lines of plain PyTorch. `TokenLogprobs` computes the same values and the
same gradients with less memory, and is what the trainer uses: autograd through log_softmax keeps a V-wide fp32
tensor per position for backward (b·T·V·4 bytes: 8 × 512 × 151,936 × 4 = 2.5 GB for one micro-batch of Qwen2.5), and
the entropy keeps another. TokenLogprobs keeps only the logits (in the compute dtype) and recomputes the softmax in
backward, a chunk of rows at a time; benchmarks/README.md, "Memory of the --model path", measures what it saves.
tests/test_model_path.py checks that the two agree in value and gradient.

Shapes: b sequences, P prompt tokens (left-padded), T completion tokens, S = P + T, V vocabulary.
"""

import torch


def completion_logits(model, input_ids, attention_mask, n_prompt: int) -> torch.Tensor:
    """The logits that score each completion token, with the one-token shift: the logits at position p score the token
    at p + 1, so completion token t (at position P + t) is scored at P + t − 1. Only those T positions go through the
    LM head (logits_to_keep): no (b, S, V) tensor is made."""
    keep = torch.arange(n_prompt - 1, input_ids.shape[1] - 1, device=input_ids.device)  # (T,) positions P−1 … S−2
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (b, S) left padding: first real token at 0
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                 logits_to_keep=keep).logits  # (b, T, V)


def sequence_logprobs(model, input_ids, attention_mask, n_prompt: int, temperature: float):
    """log π(completion token t | everything before it) and the entropy of π at each completion position, under the
    tempered policy softmax(z/τ): ((b, T), (b, T))."""
    logits = completion_logits(model, input_ids, attention_mask, n_prompt)  # (b, T, V)
    return TokenLogprobs.apply(logits, input_ids[:, n_prompt:], temperature)  # (b, T), (b, T)


def token_logprobs_reference(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """The plain version of TokenLogprobs: the same values and gradients, with a V-wide tensor kept for backward."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # (b, T, V) fp32 at least
    logp_all = torch.log_softmax(z, dim=-1)  # (b, T, V) log p_a
    # log p_y
    logp = logp_all.gather(-1, targets[..., None])[..., 0]  # (b, T)
    # H = −Σ_a p_a log p_a
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (b, T)
    return logp, entropy


class TokenLogprobs(torch.autograd.Function):
    """log softmax(z/τ)[target] and H(softmax(z/τ)) per position, lean in memory: the forward keeps only z (in the
    compute dtype) and two (b, T) fp32 tensors for backward; the V-wide softmax is recomputed there a chunk at a time.

        ∂log p_y/∂z_a = (1[a = y] − p_a)/τ      ∂H/∂z_a = −p_a (log p_a + H)/τ
    """

    CHUNK = 2**25  # elements of each fp32 scratch tensor per chunk (128 MB); two are alive at a time

    @staticmethod
    def forward(ctx, logits, targets, temperature):
        z, y = logits.flatten(0, 1), targets.flatten()  # (b·T, V), (b·T,)
        acc = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least, whatever the compute dtype
        lse, ent, logp = (torch.empty(len(y), device=z.device, dtype=acc) for _ in range(3))  # (b·T,)
        for rows in TokenLogprobs.chunks(z):
            zf = z[rows].to(acc, copy=True).div_(temperature)  # (n, V) z/τ
            lse[rows] = torch.logsumexp(zf, -1)  # (n,)
            logp[rows] = zf.gather(-1, y[rows, None])[:, 0] - lse[rows]  # (n,) log p_y = z_y/τ − lse
            ent[rows] = lse[rows] - torch.softmax(zf, -1).mul_(zf).sum(-1)  # (n,) H = lse − Σ p·z/τ
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.temperature = temperature
        return logp.view(targets.shape), ent.view(targets.shape)  # (b, T), (b, T)

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        logits, targets, lse, ent = ctx.saved_tensors
        z, y, tau = logits.flatten(0, 1), targets.flatten(), ctx.temperature  # (b·T, V), (b·T,)
        g_lp = grad_logp.flatten().to(lse.dtype) if grad_logp is not None else torch.zeros_like(lse)  # (b·T,)
        grad = torch.empty_like(z)  # (b·T, V)
        for rows in TokenLogprobs.chunks(z):
            logp_all = z[rows].to(lse.dtype, copy=True).div_(tau).sub_(lse[rows, None])  # (n, V) log p_a
            p = logp_all.exp()  # (n, V)
            if grad_ent is not None:  # −p_a (log p_a + H)·g_H − p_a·g_lp, in the two buffers
                g_h = grad_ent.flatten()[rows, None].to(lse.dtype)  # (n, 1)
                g = logp_all.add_(ent[rows, None]).mul_(p).mul_(-g_h).sub_(p.mul_(g_lp[rows, None]))  # (n, V)
            else:
                g = p.mul_(-g_lp[rows, None])  # (n, V) −p_a·g_lp
            g.scatter_add_(-1, y[rows, None], g_lp[rows, None])  # + 1[a = y]·g_lp
            grad[rows] = g.div_(tau).to(grad.dtype)
        return grad.view(logits.shape), None, None

    @staticmethod
    def chunks(z: torch.Tensor) -> list[slice]:
        n = max(1, TokenLogprobs.CHUNK // z.shape[-1])
        return [slice(i, i + n) for i in range(0, z.shape[0], n)]
