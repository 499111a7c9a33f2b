"""train.py — PPO and GRPO for language models: one loop, one process or many, CPU or GPU, FSDP2 throughout.

The RL step comes first, as documents 002 ("Implementation and Training Loop") and 004 ("PPO training loop: one
iteration") write it: sample G completions per prompt under π_θold → score them → log-probs under π_θold and π_ref,
values under V_φold → advantages (group-relative for GRPO, GAE for PPO) → epochs × minibatches of clipped-surrogate
steps. The math lives in gae.py, ppo.py, grpo.py and rewards.py; options, torchrun/FSDP2, model loading, checkpoints
and logging live in plumbing.py.

Run manual
----------
One process (CPU, the embedded offline task; a few minutes on 2 cores):
    python train.py --algo grpo
Several processes on one machine (gloo on CPU, NCCL with bf16 mixed precision on GPUs), the same code path:
    torchrun --nproc_per_node 2 train.py --algo ppo
A Hugging Face model and dataset (GSM8K's `question` / `answer` columns are the defaults):
    torchrun --nproc_per_node 8 train.py --algo grpo --model Qwen/Qwen2.5-0.5B-Instruct --chat-template \\
        --dataset openai/gsm8k --dataset-config main --max-new-tokens 512 --prompts-per-step 64 --beta 0.04
Two nodes (run on each node, same rendezvous endpoint; --out must be on a file system both nodes share):
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py --algo grpo ...
Resume the newest complete checkpoint in --out with the same arguments plus --resume.

Outputs in --out: metrics.jsonl (one JSON object per line), memory.json, checkpoints/step_XXXXXX (DCP), hf/ (the
policy as a Hugging Face checkpoint), eval_completions.jsonl (the last evaluation's greedy outputs), curves.png.

Shape legend: B sequences on this rank (prompts × G), b a minibatch or micro-batch of them, P prompt tokens
(left-padded), T completion tokens (padded to the longest completion of the step), S = P + T, V vocabulary.
"""

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

import gae
import grpo
import plumbing
import ppo
import rewards as rewards_lib
from plumbing import StepTimer, UserError, all_gather_cat, global_sum, seed_for


@dataclass
class Rollout:
    """The batch that travels through one RL step: what was sampled, then its scores, log-probs, values, advantages."""

    input_ids: torch.Tensor  # (B, S) prompt (left-padded) + completion (right-padded with pad after the first EOS)
    attention_mask: torch.Tensor  # (B, S)
    completion_mask: torch.Tensor  # (B, T) sampled tokens, through the first EOS
    loss_mask: torch.Tensor  # (B, T) the tokens the loss sees: completion_mask, minus truncated rows with --mask-truncated
    n_prompt: int  # P
    prompts: list  # B prompt texts exactly as the policy saw them (chat template applied)
    answers: list  # B reference answers
    texts: list  # B decoded completions (before the first EOS)
    sampler_logprobs: torch.Tensor | None = None  # (B, T) log p(token) under the distribution generate() drew from
    scores: torch.Tensor | None = None  # (B,) sequence rewards R_i
    old_logprobs: torch.Tensor | None = None  # (B, T) log π_θold
    ref_logprobs: torch.Tensor | None = None  # (B, T) log π_ref
    old_values: torch.Tensor | None = None  # (B, T) V_φold(s_t)
    advantages: torch.Tensor | None = None  # (B,) GRPO's A_i or (B, T) PPO's whitened GAE A_t
    returns: torch.Tensor | None = None  # (B, T) PPO's value targets R_t = A_t + V_φold(s_t)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows) -> "Rollout":
        """The rows `rows` (a slice or an index tensor) of every per-sequence field."""
        index = range(len(self))[rows] if isinstance(rows, slice) else rows.tolist()

        def pick(value):
            return value[rows] if torch.is_tensor(value) else [value[i] for i in index] if isinstance(value, list) else value

        return Rollout(**{f.name: pick(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def split(self, size: int) -> list["Rollout"]:
        return [self.select(slice(i, i + size)) for i in range(0, len(self), size)]


@dataclass
class Run:
    """Everything the loop needs, built once by plumbing.setup: the options, the models, the data, the samplers."""

    args: "Args"
    rank: int
    world: int
    device: torch.device
    tok: object  # the policy's tokenizer
    policy: torch.nn.Module  # π_θ (FSDP2)
    ref: torch.nn.Module | None  # π_ref, frozen, compute dtype (None when --beta 0)
    critic: torch.nn.Module | None  # V_φ (PPO)
    reward_model: torch.nn.Module | None  # frozen r_φ (--reward-model)
    rm_tok: object
    reward_fns: list  # [(name, weight, fn)]
    optimizers: list  # AdamW for the policy, and for the critic (PPO)
    train_rows: list  # [(prompt text as the policy sees it, answer, token ids)]
    eval_rows: list
    sample_config: object  # GenerationConfig: temperature only, every EOS
    greedy_config: object
    eos_ids: list
    hf_generation_config: object  # the checkpoint's own generation config, restored in the export
    beta: float  # β now (adapted with --kl-target)
    eval_samples: list = field(default_factory=list)

    def trained_models(self) -> list:
        return [m for m in (self.policy, self.critic) if m is not None]

    def optimizer_step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)


# ======================================================================================================================
# The RL step and the loop
# ======================================================================================================================
def rl_step(run, step: int) -> dict:
    """One iteration: sample → score → log-probs/values → advantages → epochs of clipped updates → the logged row."""
    args, timer = run.args, StepTimer(run.device)
    torch.manual_seed(seed_for(args.seed, step, run.rank))  # sampling noise: a pure function of (seed, step, rank)
    # 1. sample G completions per prompt under π_θold
    batch = sample(run, prompts_for_step(run, step), repeat=args.group_size)
    timer.lap("generate")
    # 2. score them: R_i = Σ_k w_k·reward_k(completion_i, answer_i) (+ w·reward model)
    batch.scores = score(run, batch, step)  # (B,)
    timer.lap("score")
    # 3. log π_θold, log π_ref and V_φold(s_t) of the sampled tokens; when the update is on-policy (one epoch, one
    #    minibatch, GRPO) log π_θold is its own first forward pass, detached, and this pass is skipped
    with torch.no_grad():
        if not reuses_first_forward(args):
            batch.old_logprobs = chunked_logprobs(run, run.policy, batch)  # (B, T)
        if run.ref is not None:
            batch.ref_logprobs = chunked_logprobs(run, run.ref, batch)  # (B, T)
        if run.critic is not None:
            batch.old_values = chunked_values(run, batch)  # (B, T)
    # 4. advantages
    batch.advantages, batch.returns = compute_advantages(run, batch)
    timer.lap("forward")
    # 5. epochs × minibatches of clipped-surrogate steps
    stats = update(run, batch, step)
    timer.lap("update")
    row = step_metrics(run, batch) | stats | timer.times | {"step_time_s": timer.total()}
    return row | {"tokens_per_s": row.pop("_tokens") / timer.total()} | plumbing.peak_memory_gib(run.device)


def train(run, start: int, metrics) -> None:
    """Steps start+1 … --steps; evaluation every --eval-every steps, a checkpoint and export every --save-every."""
    from tqdm import tqdm

    args = run.args
    if start == 0 and args.eval_size:
        row = evaluate(run)
        metrics.write({"step": 0} | row)
        log(run, f"step 0 eval_accuracy {row['eval_accuracy']:.3f} (of {row['eval_n']} prompts)")
    if start >= args.steps and args.steps > 0:
        log(run, f"the run in {args.out} is already complete at step {start} (--steps {args.steps}): nothing to do; "
                 "a larger --steps with --resume extends it")
        return
    bar = tqdm(range(start + 1, args.steps + 1), disable=run.rank != 0, desc=args.algo, dynamic_ncols=True)
    for step in bar:
        for opt, base in zip(run.optimizers, (args.lr, args.critic_lr)):  # a pure function of the step
            for group in opt.param_groups:
                group["lr"] = base * (1 - (step - 1) / args.steps if args.lr_schedule == "linear" else 1.0)
        row = rl_step(run, step) | {"lr": run.optimizers[0].param_groups[0]["lr"]}
        metrics.write({"step": step} | row)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl']:.4f}" if row["kl"] is not None else "-")
        if args.kl_target and row["kl"] is not None:  # β for the next step (Ziegler et al. 2019)
            run.beta = ppo.adaptive_kl_beta(run.beta, row["kl"], args.kl_target, args.kl_horizon, args.prompts_per_step * args.group_size)
        if args.eval_size and (step % args.eval_every == 0 or step == args.steps):
            ev = evaluate(run)
            metrics.write({"step": step} | ev)
            log(run, f"step {step} eval_accuracy {ev['eval_accuracy']:.3f} (of {ev['eval_n']}) reward_mean {row['reward_mean']:.3f}")
        if (args.save_every and step % args.save_every == 0) or step == args.steps:
            save(run, step)
    bar.close()


def save(run, step: int) -> None:
    """A checkpoint (models, optimizers, β), the Hugging Face export, the last evaluation's completions."""
    trainables = {"policy": (run.policy, run.optimizers[0])} | ({"critic": (run.critic, run.optimizers[1])} if run.critic else {})
    plumbing.save_checkpoint(run.args, step, trainables, {"beta": run.beta})
    if run.args.export:
        plumbing.export_hf(run.policy, run.tok, run.hf_generation_config, run.args.out)
    if run.rank == 0 and run.eval_samples:
        plumbing.write_jsonl(os.path.join(run.args.out, "eval_completions.jsonl"), run.eval_samples)


def log(run, text: str) -> None:
    """One line from rank 0, on its own line even while the progress bar is drawn."""
    if run.rank == 0:
        from tqdm import tqdm

        tqdm.write(text)  # on its own line, never glued to the progress bar
        sys.stdout.flush()


def prompts_for_step(run, step: int) -> list:
    """This rank's share of --prompts-per-step rows, drawn by a seed that depends on the step only."""
    args, per_rank = run.args, run.args.prompts_per_step // run.world
    picks = np.random.default_rng(seed_for(args.seed, step)).choice(len(run.train_rows), args.prompts_per_step,
                                                                     replace=len(run.train_rows) < args.prompts_per_step)
    return [run.train_rows[i] for i in picks[run.rank * per_rank : (run.rank + 1) * per_rank]]


def reuses_first_forward(args) -> bool:
    """On-policy update: the parameters do not move before the first (and only) optimizer step, so π_θold = π_θ there."""
    return args.algo == "grpo" and args.epochs == 1 and args.minibatch_size == args.prompts_per_step * args.group_size


@torch.no_grad()
def sample(run, rows: list, greedy: bool = False, repeat: int = 1) -> Rollout:
    """Sample `repeat` completions per (prompt, answer, token ids) row, or decode greedily, with transformers' generate
    and a GenerationConfig that applies nothing but the temperature; parameters are gathered once per call."""
    ids, mask = rewards_lib.pad_batch([r[2] for r in rows], pad_id=run.tok.pad_token_id, padding_side="left")  # (B, P)
    ids, mask = (x.repeat_interleave(repeat, 0).to(run.device) for x in (ids, mask))  # (B, P)
    drawn = []  # log p_sampler of each sampled token, one (B,) tensor per decoding step
    with plumbing.unsharded(run.policy), plumbing.recording_sampler(drawn):
        out = run.policy.generate(input_ids=ids, attention_mask=mask, synced_gpus=False,
                                  generation_config=run.greedy_config if greedy else run.sample_config)
    P, n_new = ids.shape[1], out.shape[1] - ids.shape[1]
    T = int(plumbing.all_reduce(torch.tensor([n_new]), op=torch.distributed.ReduceOp.MAX))  # longest on any rank
    completion = torch.nn.functional.pad(out[:, P:], (0, T - n_new), value=run.tok.pad_token_id)  # (B, T)
    is_eos = torch.isin(completion, torch.tensor(run.eos_ids, device=run.device))  # (B, T)
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), T)  # (B,) T when there is none
    completion_mask = (torch.arange(T, device=run.device)[None] <= first_eos[:, None]).float()  # (B, T)
    texts = run.tok.batch_decode([c[:e] for c, e in zip(completion.tolist(), first_eos.tolist())], skip_special_tokens=True)
    truncated = first_eos >= T  # (B,) no EOS within the completion
    loss_mask = completion_mask * (~truncated).float()[:, None] if run.args.mask_truncated else completion_mask  # (B, T)
    completion = torch.where(completion_mask.bool(), completion, run.tok.pad_token_id)  # (B, T)
    drawn = torch.nn.functional.pad(torch.stack(drawn[:n_new], 1), (0, T - n_new)) if drawn and not greedy else None
    return Rollout(torch.cat([ids, completion], 1), torch.cat([mask, torch.ones_like(completion)], 1), completion_mask,
                   loss_mask, P, [r[0] for r in rows for _ in range(repeat)], [r[1] for r in rows for _ in range(repeat)],
                   texts, sampler_logprobs=drawn)


def score(run, batch: Rollout, step: int) -> torch.Tensor:
    """Sequence rewards R_i = Σ_k w_k·reward_k(completion_i, answer_i) (+ w·reward model's score of prompt + completion).

    A reward that raises or is not finite, on any rank, stops every rank before anything reaches the optimizer; the
    first such rank names the reward and the sample (numbered across ranks, as in the global batch)."""
    total, first, problem = torch.zeros(len(batch)), run.rank * len(batch), None
    for name, weight, fn in run.reward_fns:
        for i, (text, answer) in enumerate(zip(batch.texts, batch.answers)):
            try:
                value = float(fn(text, answer))
            except Exception as e:
                problem = problem or UserError(f"reward {name!r} raised {type(e).__name__}: {' '.join(str(e).split())[:200]} "
                                               f"on sample {first + i} of step {step} (completion {text[:60]!r})")
                continue
            if not math.isfinite(value):
                problem = problem or UserError(f"reward {name!r} returned {value} on sample {first + i} of step {step} "
                                               f"(completion {text[:60]!r}); rewards must be finite")
            total[i] += weight * value
    plumbing.stop_if_any_rank(problem)
    if run.reward_model is not None:
        rm = rewards_lib.score_with_reward_model(run.reward_model, run.rm_tok, batch.prompts, batch.texts).float()  # (B,)
        bad = (~torch.isfinite(rm)).nonzero()
        plumbing.stop_if_any_rank(UserError(f"the reward model returned {rm[int(bad[0])].item()} on sample "
                                            f"{first + int(bad[0])} of step {step}") if len(bad) else None)
        total += run.args.reward_model_weight * rm
    return total.to(run.device)  # (B,)


def sequence_logprobs(model, input_ids, attention_mask, n_prompt: int, temperature: float):
    """log π(token_{t+1} | tokens_≤t) and the entropy of π(· | tokens_≤t) at every completion position, with the
    one-token shift: the logits at position p score the token at p + 1, so completion token t (at position P + t) is
    scored by the logits at P + t − 1. Only those T positions go through the LM head (logits_to_keep)."""
    keep = torch.arange(n_prompt - 1, input_ids.shape[1] - 1, device=input_ids.device)  # (T,) positions P−1 … S−2
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (b, S) left padding: first real token at 0
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                   logits_to_keep=keep).logits  # (b, T, V) contiguous: no copy, no (b, S, V) gradient
    return TokenLogprobs.apply(logits, input_ids[:, n_prompt:], temperature)  # (b, T), (b, T)


class TokenLogprobs(torch.autograd.Function):
    """log softmax(z/τ)[target] and H(softmax(z/τ)) per position, lean in memory: the forward keeps only z (in the
    compute dtype) and two (b, T) fp32 tensors for backward; the V-wide softmax is recomputed there a chunk at a time.

        log p_y = z_y/τ − logsumexp(z/τ)        H = logsumexp(z/τ) − Σ_a p_a z_a/τ
        ∂log p_y/∂z_a = (1[a = y] − p_a)/τ      ∂H/∂z_a = −p_a (log p_a + H)/τ
    """

    CHUNK = 2**25  # elements of each fp32 scratch tensor per chunk (128 MB); two are alive at a time

    @staticmethod
    def forward(ctx, logits, targets, temperature):
        z, y, acc = logits.flatten(0, 1), targets.flatten(), torch.promote_types(logits.dtype, torch.float32)  # (b·T, V), (b·T,)
        lse, ent, logp = (torch.empty(len(y), device=z.device, dtype=acc) for _ in range(3))  # (b·T,)
        for rows in TokenLogprobs.chunks(z):
            zf = z[rows].to(acc, copy=True).div_(temperature)  # (n, V) z/τ, fp32 at least whatever the compute dtype
            lse[rows] = torch.logsumexp(zf, -1)  # (n,)
            logp[rows] = zf.gather(-1, y[rows, None])[:, 0] - lse[rows]  # (n,)
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
    def chunks(z: torch.Tensor):
        n = max(1, TokenLogprobs.CHUNK // z.shape[-1])
        return [slice(i, i + n) for i in range(0, z.shape[0], n)]


def critic_values(critic, input_ids, attention_mask, n_prompt: int) -> torch.Tensor:
    """V(s_t) for each completion token t: the critic's output at position P + t − 1, the state before token t."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (b, S)
    out = critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits  # (b, S, 1)
    return out[:, n_prompt - 1 : -1, 0].float()  # (b, T)


def chunked_logprobs(run, model, batch: Rollout) -> torch.Tensor:
    """sequence_logprobs over micro-batches of --micro-batch-size sequences (the no_grad passes), concatenated."""
    return torch.cat([sequence_logprobs(model, p.input_ids, p.attention_mask, p.n_prompt, run.args.temperature)[0]
                      for p in batch.split(run.args.micro_batch_size or len(batch))])  # (B, T)


def chunked_values(run, batch: Rollout) -> torch.Tensor:
    """critic_values over micro-batches of --micro-batch-size sequences (the no_grad pass), concatenated."""
    return torch.cat([critic_values(run.critic, p.input_ids, p.attention_mask, p.n_prompt)
                      for p in batch.split(run.args.micro_batch_size or len(batch))])  # (B, T)


@torch.no_grad()
def compute_advantages(run, batch: Rollout):
    """GRPO: A_i = (R_i − mean_group)/(std_group + ε) on each rank's whole groups (grpo.group_advantages), without the
    completions --mask-truncated drops. PPO: per-token rewards with the KL folded in (ppo.kl_shaped_rewards), then GAE
    (gae.compute_gae), whitened over the global batch. Returns (advantages (B,) or (B, T), returns (B, T) or None)."""
    args = run.args
    if args.algo == "grpo":
        valid = (batch.loss_mask.sum(1) > 0).view(-1, args.group_size)  # (B/G, G)
        adv = grpo.group_advantages(batch.scores.view(-1, args.group_size), scale=args.scale_rewards, valid=valid)
        return adv.reshape(-1), None  # (B,)
    ref = batch.ref_logprobs if batch.ref_logprobs is not None else batch.old_logprobs  # β = 0: no shaping
    rewards = ppo.kl_shaped_rewards(batch.scores, batch.old_logprobs, ref, batch.loss_mask, run.beta)  # (B, T)
    adv, returns = gae.compute_gae(rewards, batch.old_values, batch.loss_mask, gamma=args.gamma, lam=args.lam)  # (B, T)
    if args.whiten_advantages:  # statistics over every rank's tokens, so 1 rank and N ranks agree
        full = gae.whiten(all_gather_cat(adv), all_gather_cat(batch.loss_mask))  # (W·B, T)
        adv = full.view(run.world, *adv.shape)[run.rank]  # (B, T)
    return adv, returns


def update(run, batch: Rollout, step: int) -> dict:
    """Epochs × minibatches of clipped-surrogate optimizer steps on one rollout batch. A step whose loss or gradient is
    not finite is skipped; with --target-kl the epochs stop at the first minibatch that moved the policy too far."""
    args, per_rank = run.args, run.args.minibatch_size // run.world
    stats, skipped = [], 0
    for epoch in range(args.epochs):
        shuffle = torch.Generator().manual_seed(seed_for(args.seed, step, epoch, run.rank))
        order = torch.randperm(len(batch), generator=shuffle) if per_rank < len(batch) else torch.arange(len(batch))
        for start in range(0, len(batch), per_rank):
            out = minibatch_gradients(run, batch, order[start : start + per_rank])
            if ppo.kl_early_stop(out["approx_kl"], args.target_kl or None):  # the same global value on every rank
                run.zero_grad()
                return summarize(stats, skipped, stopped=True)
            norms = [clip_grad_norm(model, args.max_grad_norm) for model in run.trained_models()]
            if all(math.isfinite(n) for n in norms):
                run.optimizer_step()
            else:
                skipped += 1
            run.zero_grad()
            stats.append(out | {"grad_norm": norms[0]})
    return summarize(stats, skipped, stopped=False)


def minibatch_gradients(run, batch: Rollout, rows: torch.Tensor) -> dict:
    """Forward and backward over the micro-batches of one minibatch, gradients accumulating; every mean is taken with
    the minibatch's global counts, so the gradient equals one big batch's. Returns the logged parts, global means."""
    args, mini = run.args, batch.select(rows)
    n_tok, n_seq = (x / run.world for x in global_sum(mini.loss_mask.sum().item(), (mini.loss_mask.sum(1) > 0).sum().item()))
    sums, first_forward = {}, []
    for part in mini.split(args.micro_batch_size or len(mini)):
        logprobs, entropy = sequence_logprobs(run.policy, part.input_ids, part.attention_mask, part.n_prompt, args.temperature)
        if part.old_logprobs is None:  # on-policy: π_θold is this very forward pass
            part.old_logprobs = logprobs.detach()
            first_forward.append(part.old_logprobs)
        out = policy_loss(run, part, logprobs, entropy, max(n_tok, 1.0), max(n_seq, 1.0))  # ≥ 1: all rows dropped gives 0, not NaN
        out["loss"].backward()
        if run.critic is not None:
            values = critic_values(run.critic, part.input_ids, part.attention_mask, part.n_prompt)  # (b, T)
            v = ppo.masked_mean(ppo.value_loss(values, part.returns, part.old_values, args.value_clip or None), part.loss_mask, max(n_tok, 1.0))
            (args.vf_coef * v).backward()  # the critic's graph, apart from the policy's (freed above)
            out |= {"value_loss": v.detach(), "loss": out["loss"] + args.vf_coef * v.detach()}
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
    if first_forward:
        batch.old_logprobs = torch.cat(first_forward)  # (B, T) rows in batch order: one unshuffled minibatch
    keys = sorted(sums)
    return dict(zip(keys, (x / run.world for x in global_sum(*(sums[k] for k in keys)))))


def policy_loss(run, part: Rollout, logprobs, entropy, n_tok: float, n_seq: float) -> dict:
    """The policy's share of the loss on one micro-batch: the clipped surrogate (ppo.clipped_surrogate_loss, for both
    algorithms), minus the entropy bonus c_h·H; GRPO adds β·KL(π_θ‖π_ref) by its estimator (grpo.grpo_loss)."""
    args, mask = run.args, part.loss_mask
    adv = part.advantages[:, None] if part.advantages.dim() == 1 else part.advantages  # (b, 1) or (b, T)
    eps_high, dual_clip = args.eps_high, args.dual_clip or None
    if args.algo == "ppo":
        entropy = entropy if args.ent_coef else entropy.detach()  # logged; no V-wide backward term when c_h = 0
        return ppo.ppo_loss(logprobs, part.old_logprobs, adv, mask, entropy=entropy, eps=args.eps, eps_high=eps_high,
                            dual_clip=dual_clip, ent_coef=args.ent_coef, num_tokens=n_tok)
    pg = ppo.clipped_surrogate_loss(logprobs, part.old_logprobs, adv, eps=args.eps, eps_high=eps_high, dual_clip=dual_clip)  # (b, T)
    out = grpo.grpo_loss(pg, logprobs, part.ref_logprobs, mask, beta=run.beta, kl_estimator=args.kl_estimator,
                         loss_agg=args.loss_agg, max_len=args.max_new_tokens, num_sequences=n_seq, num_tokens=n_tok)
    out.pop("kl", None)  # the logged kl is the rollout's KL to the reference (step_metrics)
    mean_entropy = ppo.masked_mean(entropy, mask, n_tok)  # ()
    out["entropy"] = mean_entropy.detach()
    if args.ent_coef:  # − c_h·H (no V-wide backward term when c_h = 0)
        out["loss"] = out["loss"] - args.ent_coef * mean_entropy
    ratio = torch.exp(logprobs - part.old_logprobs).detach()  # (b, T)
    out["clipfrac"] = ppo.clip_fraction(ratio, adv, mask, args.eps, eps_high or args.eps, num_tokens=n_tok)
    out["approx_kl"] = ppo.approx_kl(logprobs.detach(), part.old_logprobs, mask, num_tokens=n_tok)
    return out


def clip_grad_norm(model, max_norm: float) -> float:
    """Clip the global gradient norm (FSDP2 DTensors reduce across ranks) and return it, the same on every rank."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def summarize(stats: list, skipped: int, stopped: bool) -> dict:
    """Means over the optimizer steps taken, plus how many were taken, skipped, and whether --target-kl stopped them."""
    out = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]} if stats else {}
    return out | {"minibatches_taken": len(stats), "skipped_updates": skipped, "kl_early_stop": int(stopped)}


def step_metrics(run, batch: Rollout) -> dict:
    """The logged row's rollout statistics: global reductions over all ranks (metric glossary in README.md)."""
    args, mask = run.args, batch.completion_mask
    scores, valid = all_gather_cat(batch.scores), all_gather_cat((batch.loss_mask.sum(1) > 0).float()).bool()  # (W·B,)
    lengths = all_gather_cat(mask.sum(1))  # (W·B,)
    degenerate = grpo.degenerate_groups(scores.view(-1, args.group_size), valid.view(-1, args.group_size))  # (W·B/G,)
    row = {"reward_mean": scores.mean().item(), "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
           "frac_reward_zero_std": degenerate.float().mean().item(), "completion_len_mean": lengths.mean().item(),
           "_tokens": lengths.sum().item(), "beta": run.beta, "kl": None, "rollout_logprob_diff": None}
    kl = grpo.kl_k3(batch.old_logprobs, batch.ref_logprobs) * mask if batch.ref_logprobs is not None else mask * 0  # (B, T)
    diff = (batch.sampler_logprobs - batch.old_logprobs).abs() * mask if batch.sampler_logprobs is not None else mask * 0
    n, kl_sum, diff_sum = global_sum(mask.sum().item(), kl.sum().item(), diff.sum().item())
    row |= {"kl": kl_sum / max(n, 1)} if batch.ref_logprobs is not None else {}
    row |= {"rollout_logprob_diff": diff_sum / max(n, 1)} if batch.sampler_logprobs is not None else {}
    if args.algo == "ppo":
        ev = ppo.explained_variance(all_gather_cat(batch.old_values), all_gather_cat(batch.returns), all_gather_cat(batch.loss_mask))
        row["explained_variance"] = ev.item()
    return row


@torch.no_grad()
def evaluate(run) -> dict:
    """Greedy accuracy (the 'math' reward equals 1) on the fixed evaluation prompts, split across ranks; every rank
    makes the same number of generate calls (a rank with no rows left decodes one padding row, not counted)."""
    mine, samples = run.eval_rows[run.rank :: run.world], []
    for i in range(0, math.ceil(len(run.eval_rows) / run.world), 64):
        chunk = mine[i : i + 64]
        batch = sample(run, chunk or run.eval_rows[:1], greedy=True)
        samples += [{"prompt": p, "completion": t, "answer": a, "correct": rewards_lib.math_reward(t, a) == 1.0}
                    for p, t, a in zip(batch.prompts[: len(chunk)], batch.texts, batch.answers)]
    correct, n = global_sum(sum(s["correct"] for s in samples), len(samples))
    run.eval_samples = [s for rank_samples in plumbing.all_gather_objects(samples) for s in rank_samples]
    return {"eval_accuracy": correct / max(n, 1), "eval_n": int(n)}


# ======================================================================================================================
# Options: one field per flag (--group-size for group_size); `python train.py --help` prints them all
# ======================================================================================================================
def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    algo: Literal["grpo", "ppo"] = arg("grpo", "the algorithm")
    model: str = arg("", "hub name or local dir of a causal LM; empty = build the embedded tiny model offline")
    dataset: str = arg("", "hub name, local dir, or .json/.jsonl/.parquet/.csv file; empty = embedded arithmetic")
    dataset_config: str = arg("", "dataset configuration name (e.g. 'main' for openai/gsm8k)")
    split: str = arg("train", "split used for training prompts")
    eval_split: str = arg("test", "split for evaluation; when missing, the last --eval-size training rows are held out")
    eval_size: int = arg(200, "number of evaluation prompts (greedy decoding); 0 = no evaluation")
    prompt_column: str = arg("question", "dataset column holding the prompt")
    answer_column: str = arg("answer", "dataset column holding the reference answer")
    prompt_template: str = arg("{prompt}", "format string applied to each prompt; \\n and \\t in it are a newline and a tab")
    chat_template: bool = arg(False, "wrap prompts with the tokenizer's chat template (Instruct models)")
    reward: str = arg("math", "weighted rewards: 'math=1.0,format=0.2', names from rewards.py or module:function")
    reward_model: str = arg("", "optional frozen sequence-classification reward model (hub name or local dir)")
    reward_model_weight: float = arg(1.0, "weight of the reward model's score in the total reward")
    group_size: int = arg(8, "G: completions sampled per prompt")
    prompts_per_step: int = arg(64, "prompts per step, across all ranks (must divide by the number of ranks)")
    max_new_tokens: int = arg(6, "the most completion tokens per sample")
    temperature: float = arg(1.0, "sampling temperature (log-probs are taken under the same tempered policy)")
    mask_truncated: bool = arg(False, "drop completions that hit --max-new-tokens without EOS from the loss and advantages")
    lr: float | None = arg(None, "policy learning rate (AdamW); unset: 1e-3 for the embedded tiny model, 1e-6 with --model")
    critic_lr: float | None = arg(None, "critic learning rate (PPO); unset: 5x --lr (the critic lags: document 004, section 10)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping (global norm, each trained model apart)")
    lr_schedule: Literal["linear", "constant"] = arg("linear", "linear: decay to 0 at --steps")
    beta: float = arg(0.0, "β, the KL coefficient to the frozen reference (0 = no reference model is loaded)")
    kl_estimator: Literal["k3", "k2"] = arg("k3", "GRPO's KL term: k3 (document 001; gradient of KL(ref‖θ)) or k2 (gradient of KL(θ‖ref))")
    kl_target: float = arg(0.0, "adapt β to keep the logged per-token kl near this (Ziegler et al. 2019); 0 = fixed β")
    kl_horizon: float = arg(10000.0, "H of the adaptive β: β changes by at most ±20% × samples per step / H each step")
    target_kl: float = arg(0.0, "stop a step's epochs at the first minibatch whose approx_kl exceeds this; 0 = off")
    eps: float = arg(0.2, "clip range ε of the surrogate (ε_low)")
    eps_high: float | None = arg(None, "upper clip range ε_high (DAPO's clip-higher); unset = --eps")
    dual_clip: float = arg(0.0, "dual-clip bound c > 1 for tokens with A < 0 (Ye et al. 2020); 0 = off")
    vf_coef: float = arg(0.5, "c_v: weight of the critic loss (PPO; the critic has its own AdamW, see README)")
    ent_coef: float | None = arg(None, "c_h: entropy bonus; unset: 0.05 (GRPO) or 0.08 (PPO) on the embedded model, 0 with --model")
    value_clip: float = arg(0.0, "PPO value clipping range around V_old (0 = off)")
    epochs: int = arg(1, "inner epochs over one rollout batch")
    minibatch_size: int | None = arg(None, "sequences per optimizer step across all ranks; unset: the whole batch, at most 256")
    micro_batch_size: int | None = arg(None, "sequences per forward/backward on each rank (gradients accumulate); unset: "
                                             "the whole per-rank minibatch for the embedded model, at most 8 with --model")
    gradient_checkpointing: bool = arg(False, "recompute each transformer block in backward instead of keeping its activations")
    gamma: float = arg(1.0, "GAE discount γ (PPO)")
    lam: float = arg(1.0, "GAE λ (PPO); 1 (verl's default) = return minus V, unbiased for a sparse terminal reward")
    whiten_advantages: bool = arg(True, "whiten PPO advantages over the batch")
    loss_agg: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] | None = arg(
        None, "GRPO's aggregation: seq-mean-token-mean (GRPO, the default) | token-mean (DAPO) | seq-mean-token-sum-norm "
              "(Dr.GRPO); PPO takes token-mean only")
    scale_rewards: bool = arg(True, "GRPO: divide by the group std (false = Dr.GRPO)")
    steps: int = arg(400, "RL steps (one rollout batch each)")
    eval_every: int = arg(50, "evaluate every this many steps (and at step 0)")
    save_every: int = arg(100, "checkpoint (and export to OUT/hf) every this many steps; 0 = only at the end")
    keep_checkpoints: int = arg(2, "complete checkpoints kept")
    export: bool = arg(True, "write the policy as a Hugging Face checkpoint to OUT/hf with each checkpoint")
    sft_target: float = arg(0.6, "embedded task only: the warm start (SFT checkpoint) trains until greedy accuracy on "
                                 "200 held-out training prompts reaches this")
    sft_steps: int = arg(2000, "embedded task only: the most supervised warm-start steps")
    seed: int = arg(0, "random seed")
    out: str = arg("", "output directory; unset: out/<algo>")
    resume: bool = arg(False, "resume from the newest complete checkpoint in --out")
    dtype: Literal["auto", "fp32", "bf16"] = arg("auto", "auto: bf16 mixed precision on GPU, fp32 on CPU")
    plot: bool = arg(True, "write curves.png (matplotlib)")


def main(argv=None) -> int:
    for key in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        os.environ.setdefault(key, "1")
    rank, code = int(os.environ.get("RANK", 0)), 2
    try:
        args = plumbing.parse_args(Args, argv)
        world = int(os.environ.get("WORLD_SIZE", 1))
        plumbing.check_args(plumbing.fill_model_defaults(args, world), world)  # before anything heavy
        rank, world, device = plumbing.setup_distributed()
        fields, start, metrics = plumbing.setup(args, rank, world, device)
        train(Run(args, rank, world, device, **fields), start, metrics)
        if rank == 0 and args.plot:
            plumbing.plot_curves(args.out)
        code = 0
    except UserError as e:
        if rank == 0:
            from tqdm import tqdm

            tqdm.write("error: " + " ".join(str(e).splitlines()), file=sys.stderr)  # below any progress bar
            sys.stderr.flush()
    if plumbing.dist.is_initialized():
        if code == 0:
            plumbing.dist.barrier()  # no rank tears gloo down while another still talks to it
        plumbing.dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
