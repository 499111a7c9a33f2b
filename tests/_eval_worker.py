"""Launched by tests/test_flags.py under torchrun (gloo, CPU); not a test module itself.

    torchrun --nproc_per_node 2 tests/_eval_worker.py OUT_DIR

OUT_DIR/spec.json holds {"model": DIR, "T": max new tokens, "cases": {name: [[prompt, answer], ...]},
"train_argv": [...] or null}.

1. eval: for each case, a train.Run around the sharded policy with those eval rows, then train.evaluate; each rank
   writes OUT_DIR/eval_rank{R}.json: the returned metrics, how many rows it held, the rows of each
   sampling.generate call it made, the samples returned, and "finished": true (written only when evaluate returned).
2. train (when train_argv is given): train.main(train_argv) in the same process group (setup_distributed patched
   to return it), with models.load_model wrapped so that each rank records how the reward model was sharded
   (OUT_DIR/rm_rank{R}.json).

Also holds the custom reward test_flags.py passes as --reward _eval_worker:odd_digits (non-constant rewards, so that
a random tiny policy gets non-zero advantages and actually moves).
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import distributed  # noqa: E402
import models  # noqa: E402
import sampling  # noqa: E402
import train  # noqa: E402


def odd_digits(completion: str, answer: str) -> float:
    """A reward with spread on random completions: the number of odd digits in the completion."""
    return float(sum(c in "13579" for c in completion))


def run_eval(spec: dict, out_dir: str) -> None:
    import torch.distributed as dist
    from _dist_worker import make_run

    rank, world, device = dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    tok = models.load_tokenizer(spec["model"])
    T = spec["T"]
    policy = models.load_model(models.ModelSpec("policy", spec["model"], "--model"), device, False)[0]
    calls, original = [], sampling.generate

    def counting_generate(policy, tok, prompt_ids, *a, **kw):
        calls.append(len(prompt_ids))
        return original(policy, tok, prompt_ids, *a, **kw)

    sampling.generate = counting_generate
    result = {}
    for name, rows in spec["cases"].items():
        eval_rows = [data.PromptRow(text=p, answer=a, ids=tok(p)["input_ids"]) for p, a in rows]
        run = make_run(train.Args(max_new_tokens=T), policy, None, {}, tok=tok, eval_rows=eval_rows,
                       sampler=sampling.make_sampler(policy, tok, T, 1.0, None))
        calls.clear()
        metrics, samples = train.evaluate(run)
        result[name] = {"metrics": metrics, "my_rows": len(eval_rows[rank::world]), "sample_calls": list(calls),
                        "n_samples": len(samples), "sample_prompts": [s["prompt"] for s in samples],
                        "finished": True}
    sampling.generate = original
    with open(os.path.join(out_dir, f"eval_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()


def run_train(argv: list, out_dir: str) -> None:
    from torch.distributed.tensor import DTensor

    seen, original = [], models.load_model

    def recording(spec, *a, **kw):
        out = original(spec, *a, **kw)
        if spec.role == "reward_model":
            params = list(out[0].parameters())
            seen.append({"path": spec.path, "all_dtensor": all(isinstance(p, DTensor) for p in params),
                         "placements": sorted({str(p.placements) for p in params if isinstance(p, DTensor)}),
                         "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
                         "full_numel": sum(p.numel() for p in params)})
        return out

    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    models.load_model = recording
    # train.main joins the process group already up (a destroy + re-init on torchrun's store is not reliable)
    distributed.setup_distributed = lambda: (rank, world, torch.device("cpu"))
    code = train.main(argv)
    with open(os.path.join(out_dir, f"rm_rank{rank}.json"), "w") as f:
        json.dump({"exit_code": code, "reward_models": seen}, f)


if __name__ == "__main__":
    import torch.distributed as dist

    out_dir = sys.argv[1]
    spec = json.load(open(os.path.join(out_dir, "spec.json")))
    distributed.setup_distributed()
    run_eval(spec, out_dir)
    if spec.get("train_argv"):
        run_train(spec["train_argv"], out_dir)  # train.main tears the process group down at its end
    if dist.is_initialized():
        dist.destroy_process_group()
