"""train.py — the RLHF pipeline of document 004 for language models: supervised fine-tuning, a Bradley–Terry reward
model, then PPO or GRPO; one loop, one process or many, CPU or GPU, FSDP2 throughout.

    --algo sft    next-token cross-entropy on the responses (sft.py)                 004 "1. Background ... SFT"
    --algo rm     a scalar head trained on preference pairs (reward_model.py)       004 "4. The Reward Model"
    --algo grpo   the RL step below, group-relative advantages                      004 "8. GRPO", document 001
    --algo ppo    the RL step below, GAE with a critic                               004 "6. PPO", document 000

The RL step reads as documents 002 ("Implementation and Training Loop") and 004 ("PPO training loop: one iteration")
write it: sample G completions per prompt under π_θold → score them → log-probs under π_θold and π_ref, values under
V_ψold → advantages → epochs × minibatches of clipped-surrogate steps. The math lives in gae.py, ppo.py, grpo.py,
rewards.py and logprobs.py; every option in options.py; the rest in rooms named for what they hold: distributed.py
(ranks, collectives), models.py (loading, FSDP2, scalar heads), data.py, scoring.py (rewards applied, a reward model's
score), optim.py, checkpoints.py (and the resume rules), metrics.py, run_dir.py (the --out lock); how completions are
drawn in sampling.py; the offline default task in embedded_task.py.

Run manual
----------
One process (CPU, the embedded offline task: the sft stage into OUT/sft, then RL; a few minutes on 2 cores):
    python train.py --algo grpo
Several processes on one machine (gloo on CPU, NCCL with bf16 mixed precision on GPUs), the same code path:
    torchrun --nproc_per_node 2 train.py --algo ppo
The three stages one by one, PPO against the learned reward model, its critic started from it:
    torchrun --nproc_per_node 2 train.py --algo sft --out out/sft
    torchrun --nproc_per_node 2 train.py --algo rm  --model out/sft/hf --out out/rm
    torchrun --nproc_per_node 2 train.py --algo ppo --model out/sft/hf --reward none --reward-model out/rm/hf \\
        --critic-init out/rm/hf --out out/ppo-rm
A Hugging Face model and dataset (GSM8K's `question` / `answer` columns are the defaults):
    torchrun --nproc_per_node 8 train.py --algo grpo --model Qwen/Qwen2.5-0.5B-Instruct --chat-template \\
        --dataset openai/gsm8k --dataset-config main --max-new-tokens 512 --prompts-per-step 64 --beta 0.04
Two nodes (run on each node, same rendezvous endpoint; --out must be on a file system both nodes share):
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py --algo grpo ...
Resume the newest complete checkpoint in --out with the same arguments plus --resume. Outputs in --out:
metrics.jsonl, memory.json, checkpoints/step_XXXXXX (DCP), hf/ (the trained model), eval_completions.jsonl, curves.png.

Shape legend: B sequences on this rank (prompts × G), b a minibatch or micro-batch of them, P prompt tokens
(left-padded), T completion tokens (padded to the longest completion of the step), S = P + T, V vocabulary.
"""

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field

import torch
import transformers

import checkpoints
import data
import distributed
import embedded_task
import gae
import grpo
import logprobs as logprobs_lib
import metrics
import models
import optim
import options
import ppo
import reward_model
import rewards as rewards_lib
import run_dir
import sampling
import scoring
import sft
from distributed import UserError, all_gather_cat, global_sum, say, seed_for
from options import Args
from scoring import score  # R_i of a rollout, and the gold reward beside a learned one


@dataclass
class Rollout:
    """The batch that travels through one RL step: what was sampled, then its scores, log-probs, values, advantages."""

    input_ids: torch.Tensor  # (B, S) prompt (left-padded) + completion (right-padded with pad after the first EOS)
    attention_mask: torch.Tensor  # (B, S)
    completion_mask: torch.Tensor  # (B, T) sampled tokens, through the first EOS
    loss_mask: torch.Tensor  # (B, T) the tokens the loss sees: completion_mask without rows --mask-truncated drops
    n_prompt: int  # P
    prompts: list  # B prompt texts exactly as the policy saw them (chat template applied)
    answers: list  # B reference answers
    texts: list  # B decoded completions (before the first EOS)
    truncated: torch.Tensor | None = None  # (B,) True where no EOS came within --max-new-tokens
    sampler_logprobs: torch.Tensor | None = None  # (B, T) log p(token) under the distribution generate() drew from
    scores: torch.Tensor | None = None  # (B,) sequence rewards R_i: what the loss is trained on
    gold_scores: torch.Tensor | None = None  # (B,) the verifiable reward, logged beside a learned one, never trained on
    old_logprobs: torch.Tensor | None = None  # (B, T) log π_θold
    ref_logprobs: torch.Tensor | None = None  # (B, T) log π_ref
    old_values: torch.Tensor | None = None  # (B, T) V_ψold(s_t)
    advantages: torch.Tensor | None = None  # (B,) GRPO's A_i or (B, T) PPO's whitened GAE A_t
    returns: torch.Tensor | None = None  # (B, T) PPO's value targets R_t = A_t + V_ψold(s_t)
    sampler_weights: torch.Tensor | None = None  # (B, T) min(π_θold/p_sampler, C): --sampler-correction-cap

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows) -> "Rollout":
        """The rows `rows` (a slice or an index tensor) of every per-sequence field."""
        index = range(len(self))[rows] if isinstance(rows, slice) else rows.tolist()

        def pick(value):
            if torch.is_tensor(value):
                return value[rows]
            return [value[i] for i in index] if isinstance(value, list) else value

        return Rollout(**{f.name: pick(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def split(self, size: int) -> list["Rollout"]:
        return [self.select(slice(i, i + size)) for i in range(0, len(self), size)]

    def to(self, device) -> "Rollout":
        return Rollout(**{f.name: (lambda v: v.to(device) if torch.is_tensor(v) else v)(getattr(self, f.name))
                          for f in dataclasses.fields(self)})

    @staticmethod
    def concat(parts: list["Rollout"], pad_id: int) -> "Rollout":
        """The rows of `parts` (sampled apart) as one Rollout: prompts left-padded to the longest prompt, completions
        right-padded to the longest completion (pad id in input_ids, 0 elsewhere), lists joined, None kept None."""
        P, T = max(p.n_prompt for p in parts), max(p.completion_mask.shape[1] for p in parts)

        def join(name: str, values: list):
            if name == "n_prompt" or values[0] is None or isinstance(values[0], list):
                return P if name == "n_prompt" else None if values[0] is None else sum(values, [])
            left = name in ("input_ids", "attention_mask")  # (B, S) = prompt | completion; the others (B, T) or (B,)
            return torch.cat(values) if values[0].dim() == 1 else torch.cat([torch.nn.functional.pad(
                v, (P - p.n_prompt if left else 0, T - p.completion_mask.shape[1]),
                value=pad_id if name == "input_ids" else 0) for p, v in zip(parts, values)])

        return Rollout(**{f.name: join(f.name, [getattr(p, f.name) for p in parts])
                          for f in dataclasses.fields(Rollout)})


@dataclass
class Run:
    """Everything a stage's loop needs, built once by build_run (at the end of this file), each field named there."""

    args: Args
    rank: int
    world: int
    device: torch.device
    tok: object  # the tokenizer of the trained model
    train_rows: list  # sft: sft.Example; rm: reward_model.Pair; grpo, ppo: data.PromptRow
    eval_rows: list  # PromptRow (sft, grpo, ppo) or Pair (rm)
    optimizers: dict  # one AdamW per trained model, by the name of its field: "policy", "critic", "reward_model"
    base_lr: dict  # each optimizer's learning rate before the schedule
    policy: torch.nn.Module | None = None  # π_θ (sft, grpo, ppo)
    ref: torch.nn.Module | None = None  # π_ref, frozen, in the compute dtype (grpo, ppo with β > 0)
    critic: torch.nn.Module | None = None  # V_ψ (ppo)
    reward_model: torch.nn.Module | None = None  # r_φ: the one trained (rm), or frozen (--reward-model)
    rm_tok: object = None  # the frozen reward model's tokenizer
    rm_norm: tuple[float, float] | None = None  # (mean, std) the frozen reward model's score is standardised with
    reward_fns: list = field(default_factory=list)  # verifiable rewards [(name, weight, fn(completion, answer))]
    verifiable: bool = False  # every answer is a number: gold_reward_mean is logged beside a learned reward
    sampler: sampling.Sampler | None = None  # how completions are drawn (sampling.make_sampler)
    hf_generation_config: object = None  # the checkpoint's own generation config, restored in the export
    beta: float = 0.0  # β now: --beta at step 1, moved each step by --adaptive-kl-target
    draws: int = 0  # batches of --prompts-per-step rows read so far: one a step (more with --dynamic-sampling)
    memory_plan: dict | None = None  # memory.json but the measured bytes, until the first optimizer step writes it

    def trained(self) -> dict:
        """{name: (model, optimizer)} of the models this stage trains."""
        return {name: (getattr(self, name), optimizer) for name, optimizer in self.optimizers.items()}


# ======================================================================================================================
# The RL step
# ======================================================================================================================
def rl_step(run: Run, step: int) -> dict:
    """One iteration: sample → score → log-probs and values → advantages → epochs of clipped updates → a logged row."""
    args, timer = run.args, metrics.StepTimer(run.device)
    torch.manual_seed(seed_for(args.seed, step, run.rank))  # sampling noise: a pure function of (seed, step, rank)
    # 1. sample G completions per prompt under π_θold
    run.draws += 1
    batch = sample(run, prompts_for_step(run, run.draws), repeat=args.group_size)
    timer.lap("generate")
    # 2. score them: R_i = Σ_k w_k·reward_k(completion_i, answer_i) + w·r_φ(prompt_i + completion_i)
    batch.scores, batch.gold_scores = score(run, batch, step)  # (B,), (B,) or None
    timer.lap("score")
    # DAPO's dynamic sampling: only groups whose rewards differ, more prompts sampled until P of them are in hand
    batch, drawn = fill_with_signal(run, batch, step) if args.dynamic_sampling else (batch, {})
    timer.lap("generate")
    if args.overlong_buffer:  # DAPO's overlong shaping of R by the completion's length, after the filter (unshaped R)
        batch.scores = batch.scores + rewards_lib.overlong_penalty(batch.completion_mask.sum(1), args.max_new_tokens,
                                                                   args.overlong_buffer).to(batch.scores)  # (B,)
    # 3. log π_θold, log π_ref and V_ψold(s_t) of every sampled token, without gradient
    with torch.no_grad():
        batch.old_logprobs = token_logprobs(run, run.policy, batch)  # (B, T)
        batch.ref_logprobs = token_logprobs(run, run.ref, batch) if run.ref is not None else None  # (B, T)
        batch.old_values = token_values(run, batch) if run.critic is not None else None  # (B, T)
    # 4. advantages: group-relative (GRPO) or GAE on KL-shaped rewards (PPO)
    batch.advantages, batch.returns = compute_advantages(run, batch)
    # and, with --sampler-correction-cap, each token's weight min(π_θold/p_sampler, C) (ppo.sampler_correction)
    batch.sampler_weights, correction = sampler_correction(run, batch) if args.sampler_correction_cap else (None, {})
    timer.lap("forward")
    # 5. epochs × minibatches of clipped-surrogate steps; --early-stop-kl ends them at a minibatch that moved too far
    stats, stopped = [], False
    for rows in minibatch_order(run, len(batch), step):
        terms = minibatch_gradients(run, batch.select(rows))  # backward of L = −J + β·KL − c_h·H, and c_v·L_V
        if ppo.kl_early_stop(terms["approx_kl"], args.early_stop_kl or None):  # the same global value on every rank
            for optimizer in run.optimizers.values():  # this minibatch's gradients are dropped, not stepped
                optimizer.zero_grad(set_to_none=True)
            stopped = True
            break
        stats.append(terms | optim.optimizer_step(run, args.max_grad_norm))
    timer.lap("update")
    # 6. the logged row: rollout statistics, the update's means, where the time went
    rollout, tokens = metrics.rollout_metrics(run, batch)  # tokens: the completion tokens of every rank
    row = rollout | drawn | correction | metrics.summarize(stats, stopped) | timer.times | {
        "step_time_s": timer.total(), "tokens_per_s": tokens / timer.total()}
    # 7. β for the next step: Ziegler et al. 2019's controller moves it toward --adaptive-kl-target (ppo.py)
    if args.adaptive_kl_target and row["kl"] is not None:
        run.beta = ppo.adaptive_kl_beta(run.beta, row["kl"], args.adaptive_kl_target, args.kl_horizon,
                                        args.prompts_per_step * args.group_size)
    return row | metrics.peak_memory_gib(run.device)


def prompts_for_step(run: Run, draw: int) -> list:
    """This rank's share of the draw-th batch of --prompts-per-step rows: a slice of the epochs (data.rows_for_step).
    Step s reads batch s, unless --dynamic-sampling read more than one batch in an earlier step (Run.draws)."""
    args = run.args
    _, mine = data.rows_for_step(len(run.train_rows), args.prompts_per_step, args.seed, draw, run.rank, run.world)
    return [run.train_rows[i] for i in mine]


def fill_with_signal(run: Run, batch: Rollout, step: int) -> tuple[Rollout, dict]:
    """Collective: DAPO's dynamic sampling (Yu et al. 2025, section 3.2). Groups whose rewards are all equal (A ≡ 0)
    are dropped and the next --prompts-per-step prompts sampled until P = --prompts-per-step groups with a spread are
    in hand, or --max-sample-batches batches were read (then equal-reward groups fill the step). Every rank's groups
    are gathered in the data's order, the first P with a spread chosen, and rank r takes the r-th 1/W of them: the
    same rows on any number of ranks. Logs the batches read and the equal-reward fraction of all groups drawn."""
    args, G, P = run.args, run.args.group_size, run.args.prompts_per_step
    pool, drawn = [], 1
    while True:
        parts = distributed.all_gather_objects(batch.to("cpu"))  # every rank's rows, rank 0's first
        pool += [group for part in parts for group in part.split(G)]
        scores = torch.stack([g.scores for g in pool])  # (N, G)
        valid = torch.stack([g.loss_mask.sum(1) > 0 for g in pool])  # (N, G)
        flat = grpo.degenerate_groups(scores, valid)  # (N,) True: equal rewards, A ≡ 0
        if int((~flat).sum()) >= P or drawn == args.max_sample_batches:
            break
        drawn, run.draws = drawn + 1, run.draws + 1
        batch = sample(run, prompts_for_step(run, run.draws), repeat=G)
        batch.scores, batch.gold_scores = score(run, batch, step)
    chosen = torch.cat([(~flat).nonzero(), flat.nonzero()]).flatten()[:P]  # (P,) those with a spread first, in order
    mine = chosen[run.rank * P // run.world : (run.rank + 1) * P // run.world].tolist()
    batch = Rollout.concat([pool[i] for i in mine], run.tok.pad_token_id).to(run.device)
    return batch, {"sample_batches": drawn, "frac_reward_zero_std_drawn": flat.float().mean().item()}


def sample(run: Run, rows: list, repeat: int) -> Rollout:
    """Collective (sampling.generate): `repeat` completions of each PromptRow, as a Rollout."""
    done = sampling.generate(run.policy, run.tok, [r.ids for r in rows], run.sampler, repeat=repeat)
    loss_mask = done.completion_mask  # (B, T)
    if run.args.mask_truncated:  # a completion cut at --max-new-tokens leaves the loss (and GRPO's group statistics)
        loss_mask = loss_mask * (~done.truncated).float()[:, None]  # (B, T)
    return Rollout(input_ids=done.input_ids, attention_mask=done.attention_mask, completion_mask=done.completion_mask,
                   loss_mask=loss_mask, n_prompt=done.input_ids.shape[1] - done.completion_mask.shape[1],
                   prompts=[r.text for r in rows for _ in range(repeat)],
                   answers=[r.answer for r in rows for _ in range(repeat)], texts=done.texts,
                   truncated=done.truncated, sampler_logprobs=done.sampler_logprobs)


def token_logprobs(run: Run, model, batch: Rollout) -> torch.Tensor:
    """log π(token) of every completion token under `model` (logprobs.sequence_logprobs), micro-batch by micro-batch."""
    return torch.cat([logprobs_lib.sequence_logprobs(model, p.input_ids, p.attention_mask, p.n_prompt,
                                                     run.args.temperature)[0]
                      for p in batch.split(run.args.micro_batch_size)])  # (B, T)


def critic_values(critic, part: Rollout) -> torch.Tensor:
    """V(s_t) for each completion token t: the critic's output at position P + t − 1, the state before token t."""
    position_ids = (part.attention_mask.cumsum(-1) - 1).clamp(min=0)  # (b, S)
    out = critic(input_ids=part.input_ids, attention_mask=part.attention_mask, position_ids=position_ids,
                 use_cache=False).logits  # (b, S, 1)
    return out[:, part.n_prompt - 1 : -1, 0].float()  # (b, T)


def token_values(run: Run, batch: Rollout) -> torch.Tensor:
    """critic_values, micro-batch by micro-batch (the no-grad pass of step 3)."""
    return torch.cat([critic_values(run.critic, p) for p in batch.split(run.args.micro_batch_size)])  # (B, T)


@torch.no_grad()
def compute_advantages(run: Run, batch: Rollout):
    """GRPO: A_i = (R_i − mean_group)/(std_group + ε_std) over each rank's whole groups (grpo.group_advantages),
    without the completions --mask-truncated drops. PPO: per-token rewards with the KL folded in
    (ppo.kl_shaped_rewards), then GAE (gae.compute_gae), whitened over the global batch.
    Returns (advantages (B,) or (B, T), returns (B, T) or None)."""
    args = run.args
    if args.algo == "grpo":
        scores, valid = batch.scores.view(-1, args.group_size), (batch.loss_mask.sum(1) > 0).view(-1, args.group_size)
        if args.advantage == "reinforce-pp-baseline":  # whitened over every rank's tokens: 1 rank and N agree
            full = grpo.reinforce_pp_baseline_advantages(all_gather_cat(scores), all_gather_cat(batch.loss_mask),
                                                         all_gather_cat(valid))  # (W·B,)
            return full.view(run.world, -1)[run.rank], None  # (B,)
        adv = grpo.rloo_advantages(scores, valid) if args.advantage == "rloo" else \
            grpo.group_advantages(scores, scale=args.scale_rewards, valid=valid)  # (B/G, G)
        return adv.reshape(-1), None  # (B,)
    ref = batch.ref_logprobs if batch.ref_logprobs is not None else batch.old_logprobs  # β = 0: no shaping
    rewards = ppo.kl_shaped_rewards(batch.scores, batch.old_logprobs, ref, batch.loss_mask, run.beta)  # (B, T)
    adv, returns = gae.compute_gae(rewards, batch.old_values, batch.loss_mask, gamma=args.gamma, lam=args.lam)  # (B, T)
    if args.whiten_advantages:  # statistics over every rank's tokens, so 1 rank and N ranks agree
        full = gae.whiten(all_gather_cat(adv), all_gather_cat(batch.loss_mask))  # (W·B, T)
        adv = full.view(run.world, *adv.shape)[run.rank]  # (B, T)
    return adv, returns


def sampler_correction(run: Run, batch: Rollout) -> tuple[torch.Tensor, dict]:
    """Collective: the sampler–trainer correction's weights (B, T) (ppo.sampler_correction), and their statistics over
    every rank's tokens: the mean weight, the fraction truncated at C, the fraction of sequences masked."""
    args, mask = run.args, batch.loss_mask
    out = ppo.sampler_correction(batch.old_logprobs, batch.sampler_logprobs, mask, args.sampler_correction_cap,
                                 args.sampler_correction_mask)
    n, rows, w, cut, masked = global_sum(mask.sum().item(), len(batch), out["weights"].sum().item(),
                                         out["truncated"].sum().item(), out["masked"].sum().item())
    return out["weights"], {"sampler_weight_mean": w / max(n, 1), "sampler_frac_truncated": cut / max(n, 1),
                            "sampler_frac_masked": masked / rows}


def minibatch_order(run: Run, n: int, step: int) -> list[torch.Tensor]:
    """The row indices of every minibatch of the step's epochs: --epochs passes over the batch, each in an order drawn
    by a seed of (seed, step, epoch, rank), in --minibatch-size / world rows per rank (one unshuffled minibatch when
    it is the whole batch)."""
    per_rank, order = run.args.minibatch_size // run.world, []
    for epoch in range(run.args.epochs):
        shuffle = torch.Generator().manual_seed(seed_for(run.args.seed, step, epoch, run.rank))
        rows = torch.randperm(n, generator=shuffle) if per_rank < n else torch.arange(n)
        order += [rows[i : i + per_rank] for i in range(0, n, per_rank)]
    return order


def minibatch_gradients(run: Run, mini: Rollout) -> dict:
    """Collective: the gradients of one minibatch, accumulated over its micro-batches, for
        L = −J + β·KL − c_h·H + c_v·L_V     (ppo.ppo_loss; β·KL is GRPO's, PPO's KL is in its rewards; L_V is PPO's)
    in two backward passes: the policy's terms, then the critic's, so their graphs are never alive at once (memory).
    Every mean divides by the minibatch's global token and sequence counts, so the gradient equals one big batch's on
    any number of ranks. Returns the logged terms, global means; the same names for both algorithms."""
    args = run.args
    n_tok, n_seq = (max(x / run.world, 1.0) for x in  # ≥ 1: a minibatch whose rows were all dropped gives 0, not NaN
                    global_sum(mini.loss_mask.sum().item(), (mini.loss_mask.sum(1) > 0).sum().item()))
    agg = dict(mode=args.loss_agg, max_len=args.max_new_tokens, num_sequences=n_seq, num_tokens=n_tok)
    sums = {}
    for part in mini.split(args.micro_batch_size):
        mask, adv = part.loss_mask, part.advantages.view(len(part), -1)  # (b, T), (b, 1) GRPO or (b, T) PPO
        logprobs, entropy = logprobs_lib.sequence_logprobs(run.policy, part.input_ids, part.attention_mask,
                                                           part.n_prompt, args.temperature)  # (b, T), (b, T)
        # −J: the clipped surrogate −min(ρA, clip(ρ, 1−ε, 1+ε_high)A), the same for both algorithms; GSPO clips the
        # sequence's ratio s_i instead (ppo.gspo_surrogate_loss)
        pg = ppo.gspo_surrogate_loss(logprobs, part.old_logprobs, adv, mask, args.eps, args.eps_high) \
            if args.policy_loss == "gspo" else ppo.clipped_surrogate_loss(logprobs, part.old_logprobs, adv, args.eps,
                                                                          args.eps_high, args.dual_clip or None)
        if part.sampler_weights is not None:  # ℓ_t ← min(π_θold/p_sampler, C)·ℓ_t: the sampler–trainer correction
            pg = pg * part.sampler_weights  # (b, T)
        terms = {"policy_loss": grpo.aggregate_loss(pg, mask, **agg), "entropy": ppo.masked_mean(entropy, mask, n_tok)}
        loss = terms["policy_loss"] - args.ent_coef * terms["entropy"] if args.ent_coef else terms["policy_loss"]
        if args.algo == "grpo" and run.ref is not None:  # + β·k(π_θ, π_ref): GRPO's KL term
            kl = grpo.KL_ESTIMATORS[args.kl_estimator](logprobs, part.ref_logprobs)  # (b, T)
            terms["kl_loss"] = grpo.aggregate_loss(kl, mask, **agg)
            loss = loss + run.beta * terms["kl_loss"]
        loss.backward()  # the policy's graph is freed here, before the critic's forward
        terms["loss"] = loss
        if run.critic is not None:  # + c_v·L_V on the critic's own graph: L_V = E_t[(V_ψ(s_t) − R_t)²]
            values = critic_values(run.critic, part)  # (b, T)
            l_v = ppo.value_loss(values, part.returns, part.old_values, args.value_clip or None)  # (b, T)
            terms["value_loss"] = ppo.masked_mean(l_v, mask, n_tok)
            (args.vf_coef * terms["value_loss"]).backward()
            terms["loss"] = ppo.ppo_loss(terms["policy_loss"], terms["value_loss"], terms["entropy"], args.vf_coef,
                                         args.ent_coef)  # the logged composite
        terms |= ppo.policy_diagnostics(logprobs, part.old_logprobs, adv, mask, (args.eps, args.eps_high), n_tok)
        if args.policy_loss == "gspo":  # what GSPO's clip stopped: the tokens of sequences whose s_i left the band
            s = ppo.sequence_ratio(logprobs.detach(), part.old_logprobs, mask)[:, None].expand_as(mask)  # (b, T)
            terms["clipfrac"] = ppo.clip_fraction(s, adv, mask, args.eps, args.eps_high, n_tok)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
    keys = sorted(sums)
    return dict(zip(keys, (x / run.world for x in global_sum(*(sums[k] for k in keys)))))


def evaluate(run: Run) -> tuple[dict, list[dict]]:
    """Collective: greedy accuracy on the evaluation prompts (sampling.greedy_eval); the metrics and the samples."""
    return sampling.greedy_eval(run.policy, run.tok, run.eval_rows, run.sampler, run.reward_fns)


# ======================================================================================================================
# The loop, the same for every stage
# ======================================================================================================================
SHOWN = {"sft": ("loss", "token_accuracy"), "rm": ("loss", "pair_accuracy"), "grpo": ("reward_mean", "kl"),
         "ppo": ("reward_mean", "kl")}  # on the progress bar


def train(run: Run, start: int, log: metrics.MetricsLog, reached: bool = False) -> tuple[int, dict | None]:
    """Steps start+1 … --steps of the stage; evaluation at step 0 and every --eval-every steps; a checkpoint and an
    export every --save-every steps and at the end. The sft stage ends at the first evaluation whose eval_accuracy
    reaches --sft-target (reached: it already has, in the checkpoint resumed). Returns the last step and the last
    evaluation's row (None when none ran)."""
    from tqdm import tqdm

    args, evaluation = run.args, None
    step_fn, evaluate_fn = {"sft": (sft.sft_step, evaluate), "rm": (reward_model.rm_step, reward_model.evaluate),
                            "grpo": (rl_step, evaluate), "ppo": (rl_step, evaluate)}[args.algo]  # one step, one eval
    if start == 0 and args.eval_size:
        evaluation = log_evaluation(run, 0, log, evaluate_fn)
        reached = target_reached(args, evaluation)
        if reached:
            save(run, 0, reached)
            return 0, evaluation
    if reached or start >= args.steps:
        why = " (--sft-target reached)" if reached else f" (--steps {args.steps}): nothing to do; a larger --steps " \
                                                         "with --resume extends it"
        say(f"the run in {args.out} is already complete at step {start}{why}")
        return start, evaluation
    bar = tqdm(range(start + 1, args.steps + 1), disable=run.rank != 0, desc=args.algo, dynamic_ncols=True)
    for step in bar:
        lr = optim.set_learning_rates(run.trained(), run.base_lr, step, args.steps, args.lr_schedule)
        row = step_fn(run, step)
        row |= {"lr": lr, "epoch": data.epochs_done(run.draws or step, args.prompts_per_step, len(run.train_rows))}
        log.write({"step": step} | row)
        for line in metrics.rollout_warnings(row, args) if step == start + 1 else []:
            say(line)
        bar.set_postfix({k: "-" if row.get(k) is None else f"{row[k]:.3f}" for k in SHOWN[args.algo]})
        if args.eval_size and (step % args.eval_every == 0 or step == args.steps):
            evaluation = log_evaluation(run, step, log, evaluate_fn)
            reached = target_reached(args, evaluation)
        if reached or (args.save_every and step % args.save_every == 0) or step == args.steps:
            save(run, step, reached)
        if reached:
            break
    bar.close()
    return step, evaluation


def log_evaluation(run: Run, step: int, log: metrics.MetricsLog, evaluate_fn) -> dict:
    """Collective: one evaluation, its row in metrics.jsonl and a line; its greedy completions in
    eval_completions.jsonl. Returns the row."""
    row, samples = evaluate_fn(run)
    log.write({"step": step} | row)
    name = next(iter(row))  # eval_accuracy, or eval_pair_accuracy for rm
    say(f"step {step} {name} {row[name]:.3f} (of {row['eval_n']})")
    if run.rank == 0 and samples:
        metrics.write_jsonl(os.path.join(run.args.out, "eval_completions.jsonl"), samples)
    return row


def target_reached(args: Args, evaluation: dict) -> bool:
    """Whether the sft stage's evaluation reached --sft-target (0 = never: the stage runs its --steps)."""
    return args.algo == "sft" and 0 < args.sft_target <= evaluation["eval_accuracy"]


def save(run: Run, step: int, reached: bool) -> None:
    """Collective: a checkpoint (models, optimizers, β, whether --sft-target was reached) and the export to OUT/hf:
    the policy, or the reward model with its held-out scores' mean and std in its config."""
    checkpoints.save_checkpoint(run.args, step, run.trained(), {"beta": run.beta, "reached_target": reached,
                                                            "world": run.world, "draws": run.draws})
    if not run.args.export:
        return
    if run.args.algo == "rm":
        stats = reward_model.evaluate(run)[0] if run.eval_rows else {}
        norm = {"reward_mean": stats["eval_reward_mean"], "reward_std": stats["eval_reward_std"],
                "reward_pairs": stats["eval_n"]} if stats else {}
        checkpoints.export_hf(run.reward_model, run.tok, run.args.out, config_updates=norm)
    else:
        checkpoints.export_hf(run.policy, run.tok, run.args.out, run.hf_generation_config)


# ======================================================================================================================
# Set-up: a stage's Run, each field named where it is made; a stage from start to end; main
# ======================================================================================================================
def build_run(args: Args, rank: int, world: int, device: torch.device) -> Run:
    """The tokenizer, the data and the models of args.algo (sharded), their optimizers, the sampler."""
    mixed = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    from_nothing = args.model == os.path.join(args.out, embedded_task.MODEL_DIR)  # an sft stage of the tiny model
    tok = None if from_nothing else models.load_tokenizer(args.model, "--model", args.chat_template)  # checked first
    source = embedded_task.prepare(args.out, args.seed, from_nothing) if from_nothing or not args.dataset else None
    source, tok = args.dataset or source, tok or models.load_tokenizer(args.model, "--model", args.chat_template)
    if args.algo == "rm":
        return build_reward_model_run(args, rank, world, device, tok, source)
    policy_spec = models.ModelSpec("policy", args.model, "--model", checkpointing=args.gradient_checkpointing)
    policy, shapes, hf_generation_config = models.load_model(policy_spec, device, mixed)
    context = getattr(policy.config, "max_position_embeddings", None)
    train_rows, eval_rows = (data.tokenize_prompts(tok, args, rows, context)
                             for rows in data.load_prompts(args, source))
    verifiable = data.verifiable(train_rows)
    if args.algo == "sft":
        train_rows = sft.make_examples(tok, train_rows, args.max_length or context)
        args.steps = math.ceil(len(train_rows) / args.prompts_per_step) if args.steps is None else args.steps
    run = Run(args=args, rank=rank, world=world, device=device, tok=tok, train_rows=train_rows, eval_rows=eval_rows,
              policy=policy, optimizers={}, base_lr={"policy": args.lr, "critic": args.critic_lr},
              reward_fns=scoring.load_reward_functions(args.reward), verifiable=verifiable,
              sampler=sampling.make_sampler(policy, tok, args.max_new_tokens, args.temperature, hf_generation_config),
              hf_generation_config=hf_generation_config, beta=args.beta)
    shapes = {"policy": shapes} | (models.load_rl_models(run, mixed) if args.algo in ("grpo", "ppo") else {})
    run.optimizers = {name: optim.adamw(getattr(run, name), run.base_lr[name], args.weight_decay)
                      for name in ("policy", "critic") if getattr(run, name) is not None}
    frozen = {name: getattr(run, name) for name in ("ref", "reward_model") if getattr(run, name) is not None}
    run.memory_plan = metrics.memory_plan(run.trained(), frozen, shapes, mixed)
    return run


def build_reward_model_run(args: Args, rank: int, world: int, device, tok, source: str | None) -> Run:
    """--algo rm: the comparisons (a preference data set, or sampled from --model on prompts with answers), then the
    reward model to train, a sequence classifier started from --model."""
    mixed = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    spec = models.ModelSpec("reward_model_init", args.model, "--model", checkpointing=args.gradient_checkpointing)
    sampled = not reward_model.has_pairs(args, source)
    if sampled:  # prompts and answers: comparisons of two samples of --model
        policy, _, generation = models.load_model(models.ModelSpec("policy", args.model, "--model"), device, mixed)
        rows = data.tokenize_prompts(tok, args, data.load_prompts(dataclasses.replace(args, eval_size=0), source)[0],
                                     None)
        sampler = sampling.make_sampler(policy, tok, args.max_new_tokens, args.temperature, generation)
        source = reward_model.sampled_comparisons(args, policy, tok, rows, sampler)
        del policy
    torch.manual_seed(args.seed)  # the new score head: the same start with or without the comparisons' sampling
    model, shapes, _ = models.load_model(spec, device, mixed)
    if model.config.pad_token_id is None:  # transformers' pooling refuses a batch without one (read or not)
        model.config.pad_token_id = tok.pad_token_id
    context = getattr(model.config, "max_position_embeddings", None)
    args.max_length = args.max_length or context
    splits = dict(split="train", eval_split="test") if sampled else {}  # the sampled comparisons' own splits
    train_rows, eval_rows = reward_model.load_pairs(dataclasses.replace(args, **splits), tok, source)
    args.steps = math.ceil(len(train_rows) / args.prompts_per_step) if args.steps is None else args.steps
    optimizer = optim.adamw(model, args.lr, args.weight_decay)
    run = Run(args=args, rank=rank, world=world, device=device, tok=tok, train_rows=train_rows, eval_rows=eval_rows,
              reward_model=model, optimizers={"reward_model": optimizer}, base_lr={"reward_model": args.lr})
    run.memory_plan = metrics.memory_plan(run.trained(), {}, {"reward_model": shapes}, mixed)
    return run


def run_stage(args: Args, rank: int, world: int, device: torch.device, warm: bool = False) -> None:
    """Collective: one stage from start to end in --out: claim --out, run the warm start first when `warm`, build
    the run, resume it if asked, train, plot."""
    if args.resume and checkpoints.latest_checkpoint(args.out) is None:
        checkpoints.check_resume(args)  # "--resume: no complete checkpoint", before anything is created
    lock, created = run_dir.claim_out(args.out, rank, check=lambda: checkpoints.check_resume(args))
    try:
        run_dir.check_shared_filesystem(args.out, rank)
        if warm:  # the sft stage of the embedded task into OUT/sft, reused when complete, resumed when interrupted
            run_stage(embedded_task.warm_start_args(args, world), rank, world, device)
        run = build_run(args, rank, world, device)
        meta = checkpoints.load_checkpoint(args, run.trained()) if args.resume else {"step": 0, "beta": args.beta}
        for line in checkpoints.resume_changes(args, meta, run.world) if args.resume else []:
            say(line)
        # β: the adaptive controller's state resumes from the checkpoint; a fixed --beta is what this command says
        run.beta = float(meta["beta"]) if args.resume and args.adaptive_kl_target else args.beta
        run.draws = int(meta.get("draws", meta["step"]))  # prompt batches read: more than steps with --dynamic-sampling
        resumed = meta["step"] if args.resume else None
        log = metrics.MetricsLog(os.path.join(args.out, "metrics.jsonl"), rank, resumed)
        say(metrics.startup_line(run))
        step, evaluation = train(run, int(meta["step"]), log, reached=bool(meta.get("reached_target")))
        say(metrics.finished_line(args, step, evaluation,
                                              evaluation is not None and target_reached(args, evaluation)))
    except UserError:
        run_dir.release_out(args.out, lock, created)
        raise
    if rank == 0 and args.plot:
        metrics.plot_curves(args.out)
    run_dir.release_out(args.out, lock, created=False)


def main(argv=None) -> int:
    for key in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS",
                "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        os.environ.setdefault(key, "1")
    rank, code = int(os.environ.get("RANK", 0)), 2
    try:
        world = int(os.environ.get("WORLD_SIZE", 1))
        args = options.parse_args(Args, argv)
        options.check_stage_options(args)  # what the user typed, before the defaults fill the rest
        args = options.resolve_defaults(args, world)
        options.check_args(args, world)  # before anything is loaded or written
        rank, world, device = distributed.setup_distributed()
        run_dir.watch_launcher()
        transformers.logging.set_verbosity_error()  # its loading report is checked in models.load_full_model
        transformers.logging.disable_progress_bar()  # "Loading weights", "Writing model shards": one bar is ours
        warm = not args.model and args.algo != "sft"  # rl and rm start from the sft stage's export
        if not args.model:  # recorded in the checkpoints: a resumed run starts from the same model
            args.model = os.path.join(args.out, *(("sft", "hf") if warm else (embedded_task.MODEL_DIR,)))
        run_stage(args, rank, world, device, warm)
        code = 0
    except UserError as e:
        if rank == 0:
            from tqdm import tqdm

            tqdm.write("error: " + " ".join(str(e).splitlines()), file=sys.stderr)  # below any progress bar
            sys.stderr.flush()
    except KeyboardInterrupt:  # Ctrl-C; under torchrun the agent passes SIGINT on to every worker
        code = 130
        if rank == 0:
            print(metrics.interrupted_line(args.out if "args" in locals() else None), file=sys.stderr, flush=True)
    if distributed.dist.is_initialized():
        if code == 0:
            distributed.dist.barrier()  # no rank tears gloo down while another still talks to it
        distributed.dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
