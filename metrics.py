"""metrics.py — what a run writes and says: metrics.jsonl (rank 0), the step timer, memory.json (the ledger beside the
measured bytes), curves.png, and the lines a stage prints at its start and end.
"""

import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist

import checkpoints
import grpo
import memory_ledger
import models
import ppo
from checkpoints import atomic_write
from distributed import all_gather_cat, global_sum, synchronize


class MetricsLog:
    """metrics.jsonl, written by rank 0 only; on resume, rows after the checkpoint's step are dropped first."""

    def __init__(self, path: str, rank: int, resume_step: int | None):
        self.path, self.rank = path, rank
        if rank == 0 and resume_step is not None and os.path.exists(path):
            # a step writes its train row, then its eval row, then its checkpoint: rows ≤ the step are complete lines;
            # a line torn by a kill (no trailing newline) came after the checkpoint
            atomic_write(path, "".join(line for line in open(path) if line.endswith("\n") and line.strip()
                                       and json.loads(line)["step"] <= resume_step))
        elif rank == 0 and resume_step is None:
            atomic_write(path, "")

    def write(self, row: dict) -> None:
        if self.rank == 0:
            finite = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in row.items()}
            with open(self.path, "a") as f:
                f.write(json.dumps(finite) + "\n")


def write_jsonl(path: str, rows: list) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def peak_memory_gib(device: torch.device) -> dict:
    """GPU: torch.cuda.max_memory_allocated since the start; CPU: the process's peak resident set (ru_maxrss)."""
    if device.type == "cuda":
        return {"cuda_max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}


class StepTimer:
    """Seconds per phase of a step; on CUDA, queued kernels are waited for before each reading."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, {}
        self.start = self.last = self.now()

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str) -> None:
        now = self.now()
        self.times[f"time_{name}_s"] = self.times.get(f"time_{name}_s", 0.0) + now - self.last
        self.last = now

    def total(self) -> float:
        return self.last - self.start


def rollout_metrics(run, batch) -> tuple[dict, int]:
    """Collective: the logged row's rollout statistics, reduced over all ranks (metric glossary in README.md), and the
    completion tokens of all ranks. Every rank makes the same collectives whether or not it has a reference or a
    sampler record (zeros stand in)."""
    args, mask = run.args, batch.completion_mask
    scores, valid = all_gather_cat(batch.scores), all_gather_cat((batch.loss_mask.sum(1) > 0).float()).bool()  # (W·B,)
    lengths = all_gather_cat(mask.sum(1))  # (W·B,)
    cut = all_gather_cat(batch.truncated.float()) if batch.truncated is not None else torch.zeros(1)  # (W·B,)
    degenerate = grpo.degenerate_groups(scores.view(-1, args.group_size), valid.view(-1, args.group_size))  # (W·B/G,)
    row = {"reward_mean": scores.mean().item(), "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
           "frac_reward_zero_std": degenerate.float().mean().item(), "completion_len_mean": lengths.mean().item(),
           "frac_truncated": cut.mean().item(), "beta": run.beta, "kl": None, "rollout_logprob_diff": None}
    if batch.gold_scores is not None:
        row["gold_reward_mean"] = all_gather_cat(batch.gold_scores).mean().item()
    zeros = torch.zeros_like(mask)  # (B, T)
    kl = grpo.kl_k3(batch.old_logprobs, batch.ref_logprobs) * mask if batch.ref_logprobs is not None else zeros
    diff = (batch.sampler_logprobs - batch.old_logprobs).abs() * mask if batch.sampler_logprobs is not None else zeros
    n, kl_sum, diff_sum = global_sum(mask.sum().item(), kl.sum().item(), diff.sum().item())
    row |= {"kl": kl_sum / max(n, 1)} if batch.ref_logprobs is not None else {}
    row |= {"rollout_logprob_diff": diff_sum / max(n, 1)} if batch.sampler_logprobs is not None else {}
    if args.algo == "ppo":
        ev = ppo.explained_variance(all_gather_cat(batch.old_values), all_gather_cat(batch.returns),
                                    all_gather_cat(batch.loss_mask))
        row["explained_variance"] = ev.item()
    return row, int(lengths.sum().item())


def summarize(stats: list, stopped: bool) -> dict:
    """Means over the optimizer steps taken, how many were taken and skipped, and whether --early-stop-kl ended them."""
    out = {k: float(np.mean([s[k] for s in stats])) for k in stats[0] if k != "skipped_updates"} if stats else {}
    skipped = sum(s["skipped_updates"] for s in stats)
    return out | {"minibatches_taken": len(stats), "skipped_updates": skipped, "kl_early_stop": int(bool(stopped))}


def memory_plan(trained: dict, frozen: dict, shapes: dict, mixed: bool) -> dict:
    """What memory.json will hold, all but the trained models' measured bytes: the ledger's per-rank prediction for
    each trained model (parameters + gradients + AdamW state), and each frozen model's bytes beside document 000's 2
    per parameter in bf16 (4 in fp32). trained: {name: (model, optimizer)}; frozen: {name: model}; shapes: {name:
    parameter shapes before sharding}. The trainer keeps it in Run.memory_plan until its first optimizer step."""
    rank, world = dist.get_rank(), dist.get_world_size()
    accounting, frozen_bytes = ("fsdp2_mixed", 2) if mixed else ("fp32", 4)
    predicted = {n: memory_ledger.per_rank_bytes_exact(shapes=shapes[n], world_size=world, rank=rank,
                                                       accounting=accounting)["total"] for n in trained}
    predicted_frozen = {n: frozen_bytes * memory_ledger.fsdp2_local_numel(shapes=shapes[n], world_size=world, rank=rank)
                        for n in frozen}
    measured_frozen = {n: memory_ledger.measure_state_bytes(m)["params"] for n, m in frozen.items()}
    return {"rank": rank, "world_size": world, "accounting": accounting, "predicted_bytes": predicted,
            "frozen_bytes_per_param": frozen_bytes, "frozen_predicted_bytes": predicted_frozen,
            "frozen_measured_bytes": measured_frozen}


def write_memory(out: str, plan: dict, measured: dict) -> None:
    """memory.json (rank 0): the plan beside the trained models' bytes measured after their first optimizer step."""
    if dist.get_rank() == 0:
        atomic_write(os.path.join(out, "memory.json"), json.dumps(plan | {"measured_bytes": measured}, indent=1))


CURVES = {  # metric: (label, style); each curve is drawn when the run logged it
    "reward_mean": ("reward_mean (training reward of the samples)", "-"),
    "gold_reward_mean": ("gold_reward_mean (verifiable reward of the same samples, never trained on)", "-"),
    "token_accuracy": ("token_accuracy (sft, teacher-forced)", "-"),
    "pair_accuracy": ("pair_accuracy (rm, training pairs)", "-"),
    "eval_accuracy": ("eval_accuracy (greedy, held out)", "o-"),
    "eval_pair_accuracy": ("eval_pair_accuracy (held-out pairs)", "o-")}


def plot_curves(out: str) -> None:
    """curves.png: every metric of CURVES the run logged, against the step (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, (label, style) in CURVES.items():
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=label, markersize=3)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    plt.close(fig)


def rollout_warnings(row: dict, args) -> list[str]:
    """The lines a user must see after the first RL step of a run that cannot learn as it stands: most completions cut
    at --max-new-tokens (the rewards then read cut text: a real model's answer often comes last), or every group's
    rewards equal (GRPO's advantages all 0: no gradient at all)."""
    lines = []
    if row.get("frac_truncated", 0.0) > 0.5:
        lines.append(f"warning: {row['frac_truncated']:.0%} of the step's completions hit --max-new-tokens "
                     f"{args.max_new_tokens} before an end of sequence, so their rewards grade cut text: raise "
                     "--max-new-tokens (or drop them from the loss with --mask-truncated)")
    if args.algo == "grpo" and row.get("frac_reward_zero_std") == 1.0:
        lines.append("warning: every group's rewards were equal this step (frac_reward_zero_std 1): all advantages "
                     "are 0 and the step learned nothing; a task this hard or this easy for the model, or cut "
                     "completions, gives GRPO no signal")
    return lines


def startup_line(run) -> str:
    """What the run is and the values it uses, including every default resolved for this stage and model."""
    args = run.args
    models = ", ".join(f"{name} {sum(p.numel() for p in m.parameters()):,} params" for name, m in
                       (("policy", run.policy), ("critic", run.critic), ("reference", run.ref),
                        ("reward model", run.reward_model)) if m is not None)
    settings = {"steps": args.steps, "lr": args.lr, "micro-batch": args.micro_batch_size, "dtype": args.dtype}
    if args.algo in ("grpo", "ppo"):
        settings |= {"c_h": args.ent_coef, "β": run.beta, "minibatch": args.minibatch_size}
        settings |= {"critic lr": args.critic_lr, "critic from": critic_origin(run)} if args.algo == "ppo" else {}
        settings |= {"reward-model scale": run.rm_norm or "raw"} if run.reward_model is not None else {}
        if run.rm_tok is not None and run.rm_tok.get_vocab() != run.tok.get_vocab():
            settings |= {"reward model reads": "its own tokenizer (each completion decoded, then re-tokenized)"}
    if args.algo == "sft":
        settings |= {"sft-target": args.sft_target, "eval-every": args.eval_every}
    shown = lambda v: f"{v:.6g}" if isinstance(v, float) else v  # noqa: E731  (5e-06, not 4.9999999999999996e-06)
    return (f"{args.algo} | {run.world} rank(s) on {run.device.type} | {models} | {len(run.train_rows)} train / "
            f"{len(run.eval_rows)} eval rows | " + ", ".join(f"{k} {shown(v)}" for k, v in settings.items()))


def critic_origin(run) -> str:
    """Where PPO's critic started and how its scalar head did, for the start-up line."""
    args = run.args
    if args.critic_init == "policy":
        return "policy (new head at 0: V = 0 at first)"
    if not models.has_scalar_head(args.critic_init):
        return f"{args.critic_init} (a causal LM: new head at 0, V = 0 at first)"
    if args.reward_model and models.same_checkpoint(args.critic_init, args.reward_model):
        return f"{args.critic_init} (head carried over, scaled as the reward is: V = R at first)"
    return f"{args.critic_init} (head carried over, its raw score: not the reward model that scores the run)"


def finished_line(args, step: int, evaluation: dict | None, reached: bool) -> str:
    """The stage's last line: where it stopped, what its last evaluation reached (and whether that met --sft-target),
    where its model and checkpoint are."""
    line = f"{args.algo} finished at step {step}"
    if evaluation:
        name = next(iter(evaluation))
        line += f": {name} {evaluation[name]:.3f}" + (f" (--sft-target {args.sft_target} reached)" if reached else "")
    saved = checkpoints.latest_checkpoint(args.out)
    return line + (f"; model in {os.path.join(args.out, 'hf')}" if args.export else "") + f"; checkpoint {saved}"


def interrupted_line(out: str | None) -> str:
    """What an interrupted run leaves: its newest complete checkpoint (a save cut short stays .partial, unread)."""
    saved = checkpoints.latest_checkpoint(out) if out else None
    return "interrupted: " + (f"the newest complete checkpoint is {saved}; the same command with --resume continues "
                              "from it" if saved else "no checkpoint was written yet; nothing to resume")
