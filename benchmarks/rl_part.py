"""PPO vs GRPO on the same policy, batch and sequence lengths, through train.py's own functions.

One RL step is train.rl_step with a clock between its phases (the same calls, on a train.Run built here):
  generate   train.sample: G samples per prompt, T new tokens, parameters gathered once
  reward     train.score: the rule-based reward plus a frozen reward model's forward pass (document 004's fourth model)
  policy_fwd log π_θold on the batch, micro-batch by micro-batch (train.token_logprobs)
  ref_fwd    log π_ref on the batch (both algorithms, β > 0)
  critic_fwd V_ψold on the batch (PPO only; train.token_values)
  advantages train.compute_advantages: GAE + whitening (PPO), group statistics (GRPO)
  update     epochs × minibatches of train.minibatch_gradients + optim.clip_and_step (policy; + critic for PPO)
Both algorithms are built side by side; each takes 1 warm-up step, untimed, under the memory counter (common.PeakBytes);
then their `steps` timed steps alternate, GRPO/PPO then PPO/GRPO; each phase reports its fastest step (the median
and every step's raw times are kept in results.json).
"""
import dataclasses
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist

import data
import distributed
import memory_ledger
import models
import optim
import options
import sampling
import scoring
import train
from benchmarks import common

PHASES = ("generate", "reward", "policy_fwd", "ref_fwd", "critic_fwd", "advantages", "update")


def make_prompts(n: int, length: int, seed: int) -> list[tuple[str, str]]:
    """n arithmetic prompts of exactly `length` characters, 'd+d+...+d=' left-padded with zeros, and their answers."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        terms = rng.integers(0, 10, size=max(1, (length - 1) // 2)).tolist()
        text = ("+".join(map(str, terms)) + "=").rjust(length, "0")
        rows.append((text, str(sum(terms))))
    return rows


def load_models(algo: str, model_dir: str, mixed: bool, a: train.Args):
    """Policy, reference, critic (PPO), reward model, fp32 and sharded with FSDP2 (models.load_full_model +
    models.shard); frozen models without gradients. AdamW for the trained ones, as train.build_run makes them. The
    reward model is the policy's checkpoint with a new score head: only its forward pass's cost is measured."""
    def load(role: str):
        spec = models.ModelSpec(role, model_dir, "--model")
        return models.shard(models.load_full_model(spec), mixed).eval()

    policy = load("policy")
    ref = load("reference").requires_grad_(False)
    critic = load("critic") if algo == "ppo" else None
    rm = load("reward_model_init").requires_grad_(False)
    opts = {"policy": torch.optim.AdamW(policy.parameters(), lr=a.lr, weight_decay=a.weight_decay)}
    if critic is not None:
        opts["critic"] = torch.optim.AdamW(critic.parameters(), lr=a.critic_lr, weight_decay=a.weight_decay)
    return policy, ref, critic, rm, opts


class Run:
    """One algorithm's train.Run for a size; `step(i)` is train.rl_step's body, timed by phase."""

    def __init__(self, size: str, algo: str, cfg: dict, rank: int, world: int, device, work_dir: str):
        self.size, self.cfg, self.rank, self.world, self.device = size, cfg, rank, world, device
        mixed = device.type == "cuda"
        B = cfg["prompts"] * cfg["group_size"]
        a = train.Args(algo=algo, group_size=cfg["group_size"], prompts_per_step=cfg["prompts"],
                       max_new_tokens=cfg["T"], minibatch_size=B // cfg["minibatches"], epochs=cfg["epochs"], beta=0.04,
                       reward="math", seed=0, out=work_dir, lr=1e-5, critic_lr=1e-5, ent_coef=0.0, model="benchmark")
        self.a = options.resolve_defaults(a, world)  # loss_agg, micro-batch (≤ 8 with a model); the values above win
        self.a.micro_batch_size = self.a.minibatch_size // world  # the whole per-rank minibatch, as before
        options.check_args(dataclasses.replace(self.a, model=""), world)
        model_dir = os.path.join(work_dir, f"model_{size}")
        if rank == 0:
            common.save_model(size, model_dir)
        dist.barrier()
        tok = models.load_tokenizer(model_dir)
        self.policy, self.ref, self.critic, self.rm, self.opts = load_models(algo, model_dir, mixed, self.a)
        rows = data.tokenize_prompts(tok, self.a, make_prompts(self.a.prompts_per_step, cfg["P"], seed=0), None)
        self.run = train.Run(args=self.a, rank=rank, world=world, device=device, tok=tok, train_rows=rows, eval_rows=[],
                             optimizers=self.opts, base_lr={"policy": self.a.lr, "critic": self.a.critic_lr},
                             policy=self.policy, ref=self.ref, critic=self.critic, reward_model=self.rm, rm_tok=tok,
                             reward_fns=scoring.load_reward_functions(self.a.reward),
                             sampler=sampling.make_sampler(self.policy, tok, self.a.max_new_tokens, self.a.temperature,
                                                           None), beta=self.a.beta)
        self.trained = {n: m for n, m in (("policy", self.policy), ("critic", self.critic)) if m is not None}
        self.accounting = "fsdp2_mixed" if mixed else "fp32"
        self.measured_state, self.timed, self.peak = None, [], None

    def step(self, step: int) -> dict:
        run, a, device, world = self.run, self.a, self.device, self.world
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        clock, t = {}, [time.perf_counter()]

        def lap(name):
            sync()
            clock[name] = time.perf_counter() - t[0]
            t[0] = time.perf_counter()

        torch.manual_seed(distributed.seed_for(a.seed, step, self.rank))  # the same samples for PPO and GRPO
        per_rank = a.prompts_per_step // world
        mine = run.train_rows[self.rank * per_rank : (self.rank + 1) * per_rank]
        batch = train.sample(run, mine, repeat=a.group_size)  # B = prompts × G
        lap("generate")
        batch.scores, _ = train.score(run, batch, step)  # (B,)
        lap("reward")
        with torch.no_grad():
            batch.old_logprobs = train.token_logprobs(run, run.policy, batch)  # (B, T)
            lap("policy_fwd")
            batch.ref_logprobs = train.token_logprobs(run, run.ref, batch)  # (B, T)
            lap("ref_fwd")
            if run.critic is not None:
                batch.old_values = train.token_values(run, batch)  # (B, T)
            lap("critic_fwd")
        batch.advantages, batch.returns = train.compute_advantages(run, batch)
        lap("advantages")
        for rows in train.minibatch_order(run, len(batch), step):  # step 5 of train.rl_step, without its early stop
            train.minibatch_gradients(run, batch.select(rows))
            optim.clip_and_step(run.trained(), a.max_grad_norm)
        lap("update")
        n_completion = distributed.all_reduce(batch.completion_mask.sum()).item()  # completion tokens, all ranks
        return clock | {"completion_tokens": n_completion, "positions": batch.input_ids.numel() * world,
                        "seq_len": batch.input_ids.shape[1], "n_prompt": batch.n_prompt}

    def warm_up(self) -> None:
        """Step 0, untimed, under the memory counter. Bytes live at its start: every model's parameters and buffers;
        gradients and AdamW state are created inside it. A one-shot hook on the last optimizer to step (the critic's for
        PPO; optim.clip_and_step steps them in order, then zeroes every gradient) reads the trained state after the
        first optimizer step, before the gradients are freed."""
        live = common.state_tensors([self.policy, self.ref, self.critic, self.rm], list(self.opts.values()))
        self.base = common.storage_bytes([t for kind in live.values() for t in kind])

        def probe(*_):
            handle.remove()
            self.measured_state = sum(memory_ledger.measure_state_bytes(self.trained[n], o)["total"]
                                      for n, o in self.opts.items())

        handle = list(self.opts.values())[-1].register_step_post_hook(probe)
        with common.PeakBytes(self.device, self.base) as peak:
            self.step(0)
        self.peak = peak.peak

    def timed_step(self, step: int) -> None:
        self.timed.append(self.step(step) | {"loadavg_1min": os.getloadavg()[0]})

    def result(self, matmul: dict) -> dict:
        a, world, timed = self.a, self.world, self.timed
        shapes = {n: [tuple(p.shape) for p in m.parameters()] for n, m in self.trained.items()}  # global shapes
        ledger = [memory_ledger.per_rank_bytes_exact(shapes=s, world_size=world, rank=self.rank,
                                                     accounting=self.accounting)["total"] for s in shapes.values()]
        row = {"size": self.size, "algo": a.algo, "world": world, "B": a.prompts_per_step * a.group_size,
               "G": a.group_size, "P": timed[0]["n_prompt"], "T": a.max_new_tokens, "epochs": a.epochs,
               "minibatches": self.cfg["minibatches"],
               "n_params": {n: sum(math.prod(x) for x in s) for n, s in shapes.items()},
               "n_tensors": {n: len(s) for n, s in shapes.items()},
               "n_frozen": {n: sum(p.numel() for p in m.parameters()) for n, m in (("reference", self.ref),
                                                                                  ("reward_model", self.rm))},
               "steps_timed": len(timed), "completion_tokens": common.median([s["completion_tokens"] for s in timed]),
               "state_bytes_ledger": sum(ledger), "state_bytes": self.measured_state,
               "live_bytes_at_step_start": self.base, "peak_bytes": self.peak}
        for ph in PHASES:  # other users' load only ever adds time: the fastest step is the estimate, the median is kept
            row[f"t_{ph}"] = min(s[ph] for s in timed)
            row[f"t_{ph}_median"] = common.median([s[ph] for s in timed])
        row["per_step"] = [{k: s[k] for k in PHASES + ("loadavg_1min",)} for s in timed]  # the timings behind the table
        row["t_step"] = sum(row[f"t_{ph}"] for ph in PHASES)
        # FLOPs of the update: every position of every sequence goes through forward and backward, per epoch
        hf, positions, S = self.policy.config, timed[0]["positions"], timed[0]["seq_len"]
        row["update_flops"] = a.epochs * sum(common.train_flops(n_matmul=common.matmul_params(m), seq_len=S,
                                                                 n_layers=hf.num_hidden_layers, hidden=hf.hidden_size,
                                                                 n_tokens=positions) for m in self.trained.values())
        row["gen_tokens_per_s"] = row["completion_tokens"] / row["t_generate"]
        row["update_tokens_per_s"] = a.epochs * row["completion_tokens"] / row["t_update"]
        row["update_flops_per_s"] = row["update_flops"] / row["t_update"] / world  # per rank; MFU: add_mfu
        row["matmul_peak_flops_per_s"] = matmul["flops_per_s"]  # measured just before this size's timed steps
        return row


def add_mfu(rows: list[dict], peaks: list[dict]) -> float:
    """MFU = update FLOP/s ÷ the best matmul FLOP/s measured in this run (the machine's peak; others' load only lowers
    a measurement, as it only lengthens a step), and on GPU also ÷ the datasheet peak. Returns the peak used."""
    best = max(p["flops_per_s"] for p in peaks)
    nominal = peaks[0].get("nominal_bf16_dense_flops_per_s")
    for r in rows:
        r["mfu"] = r["update_flops_per_s"] / best
        if nominal:
            r["mfu_nominal"] = r["update_flops_per_s"] / nominal
    return best


def compare(size: str, cfg: dict, rank: int, world: int, device, work_dir: str, log=print) -> list[dict]:
    """GRPO and PPO side by side: both built, both warmed up, then their timed steps interleaved (the order flipped
    every step) so that a change in the shared machine's load falls on both alike. Returns [grpo_row, ppo_row]."""
    runs = [Run(size, algo, cfg, rank, world, device, work_dir) for algo in ("grpo", "ppo")]
    for r in runs:
        r.warm_up()
    matmul = common.matmul_peak_flops(device, n=512 if size == "tiny" else 2048)  # the CPU is shared: measured again
    for step in range(1, cfg["steps"] + 1):
        for r in runs if step % 2 else runs[::-1]:
            r.timed_step(step)
        log(f"  {size}: timed step {step} of {cfg['steps']} (grpo and ppo)", flush=True)
    return [r.result(matmul) for r in runs]


def claims(ppo: dict, grpo: dict) -> list[dict]:
    """Each claim as a PPO/GRPO ratio (a saving x reads 1/(1 − x)) beside the arithmetic for these exact shapes and the
    measurement. Documents: 000 "At Massive Scale" (savings 1-3), 001 "GRPO = PPO − value head", 003 "Memory
    Profiling"."""
    n_pol, n_crit = ppo["n_params"]["policy"], ppo["n_params"]["critic"]
    # model state as run here: trained models 16 B/param, frozen reference and reward model fp32 4 B/param (no fp16)
    frozen = 4 * sum(ppo["n_frozen"].values())
    state_ppo, state_grpo = 16 * (n_pol + n_crit) + frozen, 16 * n_pol + frozen
    rows = [
        ("001 memory ~2x vs ~1x the policy; 003 ≈50% reduction: trainable state", 2.0, (n_pol + n_crit) / n_pol,
         ppo["state_bytes"] / grpo["state_bytes"]),
        ("000 ~40% lower per-replica footprint: peak bytes (analytic: model state)", 1 / 0.6, state_ppo / state_grpo,
         ppo["peak_bytes"] / grpo["peak_bytes"]),
        ("000 ~50% fewer FLOPs per training step: update (analytic: FLOPs; measured: time)", 2.0,
         ppo["update_flops"] / grpo["update_flops"], ppo["t_update"] / grpo["t_update"]),
        ("000 ~50% less gradient all-reduce volume: gradient bytes (1 rank: not measured)", 2.0,
         (n_pol + n_crit) / n_pol, None),
        ("no claim: whole RL step time, generation and frozen forwards included", None, None,
         ppo["t_step"] / grpo["t_step"]),
    ]
    return [{"size": ppo["size"], "claim": c, "doc": d, "ledger": l, "measured": m} for c, d, l, m in rows]


COLUMNS = [("size", "size"), ("algo", "algo"), ("B", "B"), ("P", "P"), ("T", "T"), ("t_generate", "generate s"),
           ("t_reward", "reward s"), ("t_policy_fwd", "π_old fwd s"), ("t_ref_fwd", "ref fwd s"),
           ("t_critic_fwd", "critic fwd s"), ("t_advantages", "adv s"), ("t_update", "update s"), ("t_step", "step s"),
           ("state_mib", "state MiB"), ("state_ledger_mib", "ledger MiB"), ("peak_mib", "peak MiB"),
           ("gen_tokens_per_s", "gen tok/s"), ("update_tokens_per_s", "update tok/s"),
           ("update_gflops", "update GFLOP"), ("matmul_gflops", "matmul GFLOP/s"), ("mfu_pct", "MFU %")]
CLAIM_COLUMNS = [("size", "size"), ("claim", "claim (document)"), ("doc", "doc PPO/GRPO"),
                 ("ledger", "ledger/analytic"), ("measured", "measured")]
