"""Launched by tests/test_train.py under torchrun (gloo, CPU); not a test module itself.

    torchrun --nproc_per_node W tests/_dist_worker.py update   MODEL_DIR OUT_DIR   (reads OUT_DIR/batch.pt)
    torchrun --nproc_per_node 2 tests/_dist_worker.py update,generate MODEL_DIR OUT_DIR   (both in one launch)

update:   for each case of CASES, load + shard the policy (and critic), take this rank's contiguous slice of the fixed
          batch, compute_advantages + one train.update with minibatch = the whole batch + step_metrics, and save from
          rank 0 the logged row, the gathered advantages and every full (unsharded) parameter.
generate: count the collectives torch.distributed issues during train.generate on a sharded model, and save rollouts.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

# (name, algo, loss_agg, max_grad_norm): a huge max_grad_norm disables clipping so the update's scale is tested too
CASES = [
    ("grpo-seq-mean-token-mean", "grpo", "seq-mean-token-mean", 1e9),
    ("grpo-token-mean", "grpo", "token-mean", 1e9),
    ("grpo-seq-mean-token-sum-norm", "grpo", "seq-mean-token-sum-norm", 1e9),
    ("grpo-token-mean-clipped", "grpo", "token-mean", 1e-2),
    ("ppo", "ppo", "seq-mean-token-mean", 1e9),
]
LR = 0.5  # plain SGD: the parameter change is lr × gradient, so a wrong gradient scale cannot hide (Adam's would)


def case_args(algo: str, loss_agg: str, max_grad_norm: float, batch: dict) -> train.Args:
    B, T = batch["mask"].shape
    return train.Args(algo=algo, loss_agg=loss_agg, max_grad_norm=max_grad_norm, group_size=batch["group_size"],
                      prompts_per_step=B // batch["group_size"], minibatch_size=B, epochs=1,
                      max_new_tokens=T, temperature=batch["temperature"], beta=batch["beta"], eps=0.2,
                      ent_coef=batch["ent_coef"], vf_coef=0.5, value_clip=0.2, gamma=1.0, lam=0.95, seed=0)


def run_update(model_dir: str, out_dir: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = torch.load(os.path.join(out_dir, "batch.pt"))
    B = batch["input_ids"].shape[0]
    lo, hi = rank * B // world, (rank + 1) * B // world  # this rank's contiguous rows
    results = {}
    for name, algo, loss_agg, max_grad_norm in CASES:
        a = case_args(algo, loss_agg, max_grad_norm, batch)
        policy = train.shard(train.load_model("causal", model_dir, torch.float32), False).eval()
        critic = None
        opts = [torch.optim.SGD(policy.parameters(), lr=LR)]
        if algo == "ppo":
            critic = train.load_model("critic", model_dir, torch.float32)
            with torch.no_grad():  # a non-zero head, so the critic's body gets gradients on the first step
                critic.score.weight.copy_(batch["critic_head"])
            critic = train.shard(critic, False).eval()
            opts.append(torch.optim.SGD(critic.parameters(), lr=LR))
        ro = train.Rollout(batch["input_ids"][lo:hi], batch["attention_mask"][lo:hi], batch["mask"][lo:hi].clone(),
                           batch["n_prompt"], [""] * (hi - lo), torch.zeros(hi - lo, dtype=torch.bool))
        old, ref = batch["old_logprobs"][lo:hi], batch["ref_logprobs"][lo:hi]
        values = batch["old_values"][lo:hi] if algo == "ppo" else None
        scores = batch["scores"][lo:hi]
        adv, returns = train.compute_advantages(a, ro, scores, old, ref, values)
        stats = train.update(a, ro, adv, returns, old, ref, values, policy, critic, opts, step=1, world=world)
        results[name] = {
            "row": train.step_metrics(a, ro, scores, old, ref, values, returns, stats, world),  # the logged row
            "advantages": train.all_gather_cat(adv),
            "returns": train.all_gather_cat(returns) if returns is not None else None,
            "policy": {n: p.full_tensor().detach().clone() for n, p in policy.named_parameters()},
            "critic": {n: p.full_tensor().detach().clone() for n, p in critic.named_parameters()} if critic else None,
        }
    if rank == 0:
        torch.save(results, os.path.join(out_dir, f"update_w{world}.pt"))


def run_generate(model_dir: str, out_dir: str) -> None:
    """Count gathers with a counting wrapper on each all-gather entry point of torch.distributed (FSDP2 in torch 2.13
    calls dist.all_gather_single; the others are counted too so that a change of entry point cannot hide calls)."""
    from torch.distributed.fsdp import FSDPModule

    rank, world, device = dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    tok = train.load_tokenizer(model_dir)
    policy = train.shard(train.load_model("causal", model_dir, torch.float32), False).eval()
    n_fsdp_modules = sum(isinstance(m, FSDPModule) for m in policy.modules())
    counts, originals = {}, {}
    for fn_name in ("all_gather_single", "all_gather_into_tensor", "all_gather", "_all_gather_base", "broadcast",
                    "all_reduce", "reduce_scatter_tensor"):
        original = originals[fn_name] = getattr(dist, fn_name)

        def counting(*args, _original=original, _name=fn_name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        setattr(dist, fn_name, counting)
    prompts = ["12+7=", "3+4=", "29+29=", "0+1="]
    out = {"n_fsdp_modules": n_fsdp_modules, "counts": {}, "rollouts": {}}
    for T in (2, 8):
        a = train.Args(max_new_tokens=T, temperature=3.0)  # a hot random model: EOS shows up in some rows only
        counts.clear()
        torch.manual_seed(1000 + rank)
        ro = train.generate(policy, tok, prompts, a, device, repeat=4)
        out["counts"][f"train.generate T={T}"] = dict(counts)
        out["rollouts"][T] = {k: getattr(ro, k) for k in ("input_ids", "attention_mask", "mask", "n_prompt", "texts",
                                                           "truncated")}
    # the control: transformers' generate straight on the sharded model, forced to 8 tokens, gathers per forward
    ids = tok(prompts, return_tensors="pt", padding=True)
    counts.clear()
    with torch.no_grad():
        policy.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    out["counts"]["plain policy.generate T=8"] = dict(counts)
    all_counts = [None] * world
    dist.all_gather_object(all_counts, out["counts"])
    out["counts_per_rank"] = all_counts
    for fn_name, original in originals.items():
        setattr(dist, fn_name, original)
    if rank == 0:
        torch.save(out, os.path.join(out_dir, "generate.pt"))


if __name__ == "__main__":
    train.setup_distributed()
    for job in sys.argv[1].split(","):
        {"update": run_update, "generate": run_generate}[job](*sys.argv[2:])
    dist.barrier()
    dist.destroy_process_group()
