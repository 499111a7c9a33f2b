"""Launched by tests/test_train.py under torchrun (gloo, CPU); not a test module itself.

    torchrun --nproc_per_node W tests/_dist_worker.py update   MODEL_DIR OUT_DIR   (reads OUT_DIR/batch.pt)
    torchrun --nproc_per_node 2 tests/_dist_worker.py update,generate,collectives MODEL_DIR OUT_DIR

update:      for each case of CASES (and VARIANTS, DYNAMIC), load the policy (and critic) as the trainer does on this
             many ranks (FSDP2 on 2, the plain module of `python train.py` on 1), then one train.rl_step whose rollout is
             this rank's contiguous slice of the fixed batch: train.sample, train.score, train.token_logprobs and
             train.token_values are replaced (in this process only) by functions returning the fixed rows, scores,
             old/reference log-probs and old values; the rest of the step (advantages, the epochs × minibatches loop,
             the optimizer steps, the logged row) is the trainer's own. Rank 0 saves the logged row, the gathered
             advantages and every full (unsharded) parameter.
generate:    count the collectives torch.distributed issues during train.sample on a sharded model, and save rollouts.
collectives: one PPO and one GRPO train.rl_step with every torch.distributed collective wrapped by a checker that knows
             the process group's device; saves every call (function, device of each tensor, caller).
"""

import dataclasses
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import rl_step_with, step_on  # noqa: E402

import data  # noqa: E402
import distributed  # noqa: E402
import models  # noqa: E402
import options  # noqa: E402
import sampling  # noqa: E402
import scoring  # noqa: E402
import train  # noqa: E402

# (name, algo, loss_agg, max_grad_norm, epochs, minibatch, micro): a huge max_grad_norm disables clipping so the update's
# scale is tested too; minibatch None = the whole batch; micro 0 = the whole minibatch per forward/backward
CASES = [
    ("grpo-seq-mean-token-mean", "grpo", "seq-mean-token-mean", 1e9, 1, None, 0),
    ("grpo-token-mean", "grpo", "token-mean", 1e9, 1, None, 0),
    ("grpo-seq-mean-token-sum-norm", "grpo", "seq-mean-token-sum-norm", 1e9, 1, None, 0),
    ("grpo-token-mean-clipped", "grpo", "token-mean", 1e-2, 1, None, 0),
    ("ppo", "ppo", "token-mean", 1e9, 1, None, 0),
    # micro-batches of one sequence: gradient accumulation must give the same update as one big batch
    ("grpo-seq-mean-token-mean-micro1", "grpo", "seq-mean-token-mean", 1e9, 1, None, 1),
    ("grpo-token-mean-micro1", "grpo", "token-mean", 1e9, 1, None, 1),
    ("grpo-seq-mean-token-sum-norm-micro1", "grpo", "seq-mean-token-sum-norm", 1e9, 1, None, 1),
    ("ppo-micro1", "ppo", "token-mean", 1e9, 1, None, 1),
    # PPO with 2 epochs × 2 minibatches, value clipping and an entropy bonus (checked against tests' ppo_reference_update)
    ("ppo-2x2", "ppo", "token-mean", 1e9, 2, 4, 0),
]
# The 2024-25 variants on the fixed batch, each beside "grpo-seq-mean-token-mean" (CASES[0]): (name, Args overrides,
# log π_θold: "batch" (the batch's, ratios away from 1) or "model" (the model's own: ρ ≡ 1), p_sampler: None (no record),
# "old" (= log π_θold) or "noisy" (log π_θold + the batch's sampler_noise))
VARIANTS = [
    ("rloo", {"advantage": "rloo"}, "batch", None),
    ("reinforce-pp-baseline", {"advantage": "reinforce-pp-baseline"}, "batch", None),
    ("gspo", {"policy_loss": "gspo"}, "batch", None),  # ε = 0.2 (case_args): ratios inside and outside the band
    ("gspo-at-old", {"policy_loss": "gspo", "eps": 3e-4, "eps_high": 4e-4}, "model", None),
    ("token-at-old", {}, "model", None),
    ("correction-equal", {"sampler_correction_cap": 2.0}, "batch", "old"),
    ("correction", {"sampler_correction_cap": 1.5, "sampler_correction_mask": True}, "batch", "noisy"),
]
# --dynamic-sampling: the scores each draw of the batch's 4 groups gets (G = 2); the rows are the batch's every time
DRAW_SCORES = {1: [1.0, 1.0, 0.2, 0.9, 1.0, 1.0, 0.0, 0.0],  # one group with a spread (group 1)
               2: [1.0, 0.0, 0.5, 0.5, 0.2, 0.9, 0.5, 0.0]}  # three (groups 0, 2, 3)
DYNAMIC = [("dynamic", {"dynamic_sampling": True, "max_sample_batches": 4}),  # draws 1 and 2 fill the step
           ("dynamic-topped-up", {"dynamic_sampling": True, "max_sample_batches": 1})]  # draw 1 alone, topped up
LR = 0.5  # plain SGD: the parameter change is lr × gradient, so a wrong gradient scale cannot hide (Adam's would)
CRITIC_LR = 0.02  # the critic's loss is ~1 (returns vs V ≈ 0): at 0.5 it would diverge and amplify fp32 rounding


def case_args(case: tuple, batch: dict) -> train.Args:
    _, algo, loss_agg, max_grad_norm, epochs, minibatch, micro = case
    B, T = batch["mask"].shape
    return train.Args(algo=algo, loss_agg=loss_agg, max_grad_norm=max_grad_norm, group_size=batch["group_size"],
                      prompts_per_step=B // batch["group_size"], minibatch_size=minibatch or B,
                      micro_batch_size=micro or (minibatch or B) // dist.get_world_size(), epochs=epochs,
                      max_new_tokens=T, temperature=batch["temperature"], beta=batch["beta"], eps=0.2,
                      ent_coef=batch["ent_coef"], vf_coef=0.5, value_clip=0.2, gamma=1.0, lam=0.95, seed=0,
                      lr_schedule="constant")


def as_trained(model: torch.nn.Module) -> torch.nn.Module:
    """The model as the trainer trains it in fp32 on this many ranks (models.load_model): FSDP2 on 2 ranks, the plain
    module in one process (what `python train.py` runs)."""
    return models.shard(model, False) if dist.get_world_size() > 1 else model


def full_parameters(model: torch.nn.Module) -> dict:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


def make_run(args, policy, critic, optimizers: dict, device=torch.device("cpu"), **fields) -> train.Run:
    """A train.Run around models built here; tokenizer, data and sampler only where a job needs them."""
    base = dict(tok=None, train_rows=[None] * 64, eval_rows=[], base_lr={n: 0.0 for n in optimizers})
    return train.Run(args=args, rank=dist.get_rank(), world=dist.get_world_size(), device=device, policy=policy,
                     critic=critic, optimizers=optimizers, beta=args.beta, **(base | fields))


def load(role: str, model_dir: str, device=torch.device("cpu"), **kw):
    mixed = device.type == "cuda"  # as train.py: bf16 mixed precision on a GPU
    return models.load_model(models.ModelSpec(role, model_dir, "--model", **kw), device, mixed)[0]


def fixed_rollout(batch: dict, lo: int, hi: int, sampler_logprobs=None) -> train.Rollout:
    n = hi - lo
    return train.Rollout(input_ids=batch["input_ids"][lo:hi], attention_mask=batch["attention_mask"][lo:hi],
                         completion_mask=batch["mask"][lo:hi].clone(), loss_mask=batch["mask"][lo:hi].clone(),
                         n_prompt=batch["n_prompt"], prompts=[""] * n, answers=[""] * n, texts=[""] * n,
                         truncated=batch["mask"][lo:hi].all(1), sampler_logprobs=sampler_logprobs)


def fixed_step(run, batch: dict, lo: int, hi: int, old=None, sampler=None) -> dict:
    """train.rl_step on rows lo:hi of the fixed batch (helpers.step_on); the logged row without timings. old: log π_θold
    of every row (default: the batch's); sampler: p_sampler's log-probs of every row (default: none recorded)."""
    old = batch["old_logprobs"] if old is None else old
    rollout = fixed_rollout(batch, lo, hi, None if sampler is None else sampler[lo:hi])
    row = step_on(run, rollout, batch["scores"][lo:hi], logprobs=(old[lo:hi], batch["ref_logprobs"][lo:hi]),
                  values=batch["old_values"][lo:hi] if run.critic is not None else None)
    timing = [k for k in row if k.startswith("time_") or k in ("step_time_s", "tokens_per_s", "host_peak_rss_gib")]
    return {k: v for k, v in row.items() if k not in timing}


def run_update(model_dir: str, out_dir: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = torch.load(os.path.join(out_dir, "batch.pt"))
    B = batch["input_ids"].shape[0]
    lo, hi = rank * B // world, (rank + 1) * B // world  # this rank's contiguous rows
    results = {}
    for case in CASES:
        name, algo = case[0], case[1]
        args = case_args(case, batch)
        policy = as_trained(models.load_full_model(models.ModelSpec("policy", model_dir, "--model")))
        critic = None
        opts = {"policy": torch.optim.SGD(policy.parameters(), lr=LR)}
        if algo == "ppo":
            critic = models.load_full_model(models.ModelSpec("critic", model_dir, "--model"))
            with torch.no_grad():  # a non-zero head, so the critic's body gets gradients on the first step
                critic.score.weight.copy_(batch["critic_head"])
            critic = as_trained(critic)
            opts["critic"] = torch.optim.SGD(critic.parameters(), lr=CRITIC_LR)
        run = make_run(args, policy, critic, opts, ref=object())  # a stand-in reference: its log-probs are fixed
        row = fixed_step(run, batch, lo, hi)
        advantages, returns = row.pop("_advantages"), row.pop("_returns")
        results[name] = {
            "row": row,  # the logged row (timings aside)
            "advantages": distributed.all_gather_cat(advantages),
            "returns": distributed.all_gather_cat(returns) if returns is not None else None,
            "policy": full_parameters(policy), "critic": full_parameters(critic) if critic else None,
        }
    for name, overrides, old, sampler in VARIANTS:
        args = dataclasses.replace(case_args(CASES[0], batch), **overrides)
        old = batch["old_logprobs"] if old == "batch" else batch["logprobs_now"]
        sampler = {None: None, "old": old, "noisy": old + batch["sampler_noise"]}[sampler]
        policy = as_trained(models.load_full_model(models.ModelSpec("policy", model_dir, "--model")))
        run = make_run(args, policy, None, {"policy": torch.optim.SGD(policy.parameters(), lr=LR)}, ref=object())
        row = fixed_step(run, batch, lo, hi, old, sampler)
        results[name] = {"row": row, "advantages": distributed.all_gather_cat(row.pop("_advantages")),
                         "policy": full_parameters(policy)}
        row.pop("_returns")
    for name, overrides in DYNAMIC:
        results[name] = dynamic_step(model_dir, batch, lo, hi, overrides)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, f"update_w{world}.pt"))


def dynamic_step(model_dir: str, batch: dict, lo: int, hi: int, overrides: dict) -> dict:
    """train.rl_step with --dynamic-sampling, where every draw samples this rank's rows lo:hi of the fixed batch and
    scores them with DRAW_SCORES[draw]; the log-probs are the model's own (no reference, β = 0). Returns the row, the
    gathered scores and advantages of the rows the step kept, and the parameters after it."""
    args = dataclasses.replace(case_args(CASES[0], batch), beta=0.0, **overrides)
    policy = as_trained(models.load_full_model(models.ModelSpec("policy", model_dir, "--model")))
    run = make_run(args, policy, None, {"policy": torch.optim.SGD(policy.parameters(), lr=LR)},
                   tok=models.load_tokenizer(model_dir))
    seen, advantages = {}, train.compute_advantages

    def keep(run, rollout):
        seen["scores"] = distributed.all_gather_cat(rollout.scores)
        seen["advantages"] = distributed.all_gather_cat(advantages(run, rollout)[0])
        return seen["advantages"].view(run.world, -1)[run.rank], None

    patched = {"sample": lambda run, rows, repeat: fixed_rollout(batch, lo, hi),
               "score": lambda run, rollout, step: (torch.tensor(DRAW_SCORES[run.draws][lo:hi]), None),
               "compute_advantages": keep}
    row = rl_step_with(run, patched)
    timing = [k for k in row if k.startswith("time_") or k in ("step_time_s", "tokens_per_s", "host_peak_rss_gib")]
    return {"row": {k: v for k, v in row.items() if k not in timing}, "draws": run.draws, **seen,
            "policy": full_parameters(policy)}


def wrap_collectives(record: list, names: tuple) -> dict:
    """Replace each torch.distributed collective with a wrapper that records (name, devices of its tensors, caller)."""
    originals = {}
    for fn_name in names:
        original = originals[fn_name] = getattr(dist, fn_name)

        def wrapper(*args, _original=original, _name=fn_name, **kwargs):
            tensors = [a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if torch.is_tensor(t)]
            stack = traceback.extract_stack(limit=4)[:-1]
            record.append({"fn": _name, "devices": sorted({str(t.device) for t in tensors}),
                           "caller": [(os.path.basename(f.filename), f.name) for f in stack]})
            return _original(*args, **kwargs)

        setattr(dist, fn_name, wrapper)
    return originals


COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "_all_gather_base", "broadcast", "all_reduce",
               "reduce_scatter_tensor", "all_gather_object", "broadcast_object_list", "gather", "scatter", "reduce",
               "all_to_all_single")


def run_generate(model_dir: str, out_dir: str) -> None:
    """Count gathers with a counting wrapper on each collective entry point of torch.distributed (FSDP2 in torch 2.13
    calls dist.all_gather_single; the others are counted too so that a change of entry point cannot hide calls)."""
    from torch.distributed.fsdp import FSDPModule

    rank = dist.get_rank()
    models.BLOCKS_FROM = 0  # a unit per transformer block, as a model of 50M parameters or more is sharded
    tok = models.load_tokenizer(model_dir)
    policy = load("policy", model_dir)
    n_fsdp_modules = sum(isinstance(m, FSDPModule) for m in policy.modules())
    calls = []
    originals = wrap_collectives(calls, COLLECTIVES)
    prompts = ["12+7=", "3+4=", "29+29=", "0+1="]
    rows = [data.PromptRow(text=p, answer="0", ids=tok(p)["input_ids"]) for p in prompts]
    out = {"n_fsdp_modules": n_fsdp_modules, "counts": {}, "rollouts": {}}
    for T in (2, 8):
        args = train.Args(max_new_tokens=T, temperature=3.0)  # a hot random model: EOS shows up in some rows only
        run = make_run(args, policy, None, {}, tok=tok, sampler=sampling.make_sampler(policy, tok, T, 3.0, None))
        calls.clear()
        torch.manual_seed(1000 + rank)
        ro = train.sample(run, rows, repeat=4)
        out["counts"][f"train.sample T={T}"] = count(calls)
        out["rollouts"][T] = {k: getattr(ro, k) for k in ("input_ids", "attention_mask", "completion_mask", "loss_mask",
                                                           "n_prompt", "texts", "sampler_logprobs")}
    # the control: transformers' generate straight on the sharded model, forced to 8 tokens, gathers per forward
    ids = tok(prompts, return_tensors="pt", padding=True)
    calls.clear()
    with torch.no_grad():
        policy.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    out["counts"]["plain policy.generate T=8"] = count(calls)
    for fn_name, original in originals.items():
        setattr(dist, fn_name, original)
    out["counts_per_rank"] = distributed.all_gather_objects(out["counts"])
    if rank == 0:
        torch.save(out, os.path.join(out_dir, "generate.pt"))


def count(calls: list) -> dict:
    out = {}
    for c in calls:
        out[c["fn"]] = out.get(c["fn"], 0) + 1
    return out


def run_collectives(model_dir: str, out_dir: str) -> None:
    """One PPO and one GRPO step of train.rl_step (rewards, reference, critic, whitening, metrics: every collective
    path), every torch.distributed collective recorded with the devices of its tensors and its caller. On a GPU
    (benchmarks/gpu_check.py, one NCCL rank) the models are on cuda:0, in bf16 mixed precision."""
    world = dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    seen = {}
    for algo in ("grpo", "ppo"):
        args = options.resolve_defaults(train.Args(algo=algo, model=model_dir, prompts_per_step=2, group_size=2,
                                                   max_new_tokens=4, beta=0.04, out=out_dir), world)
        tok = models.load_tokenizer(model_dir)
        policy, ref = load("policy", model_dir, device), load("reference", model_dir, device)
        critic = load("critic", model_dir, device) if algo == "ppo" else None
        opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-3) for n, m in (("policy", policy), ("critic", critic))
                if m is not None}
        rows = [data.PromptRow(text=p, answer=str(eval(p[:-1])), ids=tok(p)["input_ids"])
                for p in ("1+2=", "3+4=", "5+6=", "7+8=")]
        run = make_run(args, policy, critic, opts, device=device, tok=tok, ref=ref, train_rows=rows,
                       reward_fns=scoring.load_reward_functions("math"),
                       sampler=sampling.make_sampler(policy, tok, 4, 1.0, None))
        calls = []
        originals = wrap_collectives(calls, COLLECTIVES)
        try:
            train.rl_step(run, step=1)
        finally:
            for fn_name, original in originals.items():
                setattr(dist, fn_name, original)
        seen[algo] = {"calls": calls, "group_device": str(distributed.group_device())}
    if dist.get_rank() == 0:
        torch.save(seen, os.path.join(out_dir, "collectives.pt"))


def run_loading(model_dir: str, out_dir: str) -> None:
    """models.load_model on 2 ranks: count the full-model loads per rank (only rank 0 may read the checkpoint into
    host memory), then gather every parameter and buffer to compare with the checkpoint on disk."""
    rank, device = dist.get_rank(), torch.device("cpu")
    calls, original = [], models.load_full_model

    def counting(spec):
        calls.append(spec.role)
        return original(spec)

    models.load_full_model = counting
    try:
        spec = models.ModelSpec("policy", model_dir, "--model")
        policy, shapes, generation_config = models.load_model(spec, device, False)
        critic = load("critic", model_dir)
    finally:
        models.load_full_model = original
    out = {"calls": distributed.all_gather_objects(calls), "shapes": shapes,
           "local_numel": distributed.all_gather_objects(sum(p.to_local().numel() for p in policy.parameters())),
           "policy": full_parameters(policy),
           "policy_buffers": {n: b.detach().clone() for n, b in policy.named_buffers()},
           "critic": {n: p.full_tensor().detach().clone() for n, p in critic.named_parameters()},
           "generation_config": generation_config.to_dict() if generation_config is not None else None}
    if rank == 0:
        torch.save(out, os.path.join(out_dir, "loading.pt"))


if __name__ == "__main__":
    distributed.setup_distributed()
    for job in sys.argv[1].split(","):
        {"update": run_update, "generate": run_generate, "collectives": run_collectives, "loading": run_loading}[job](*sys.argv[2:])
    dist.barrier()
    dist.destroy_process_group()
