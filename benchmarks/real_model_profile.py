"""Where a real model's RL step spends its time: one GRPO step of benchmarks/real_model.py's recipe on
SmolLM2-135M-Instruct, one process (the plain module of `python train.py`): the step's phases, and the operators that
took the most CPU time in the update (train.minibatch_gradients under torch.profiler).

    python gguf_model.py                             # once: the model
    python benchmarks/real_model_profile.py          # a warm-up step, then the profiled one: about 4 minutes on 2 cores

One process does the work that 2 ranks split in benchmarks/real_model.py (all 32 samples), with torch's threads = the
cores. Results: benchmarks/results/real_model_profile.txt.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))


def main() -> None:
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    import distributed
    import options
    import train
    import word_problems
    from real_model import DATA, MODEL, RECIPE

    os.chdir(REPO)
    word_problems.write_task(os.path.join(REPO, DATA))
    torch.set_num_threads(os.cpu_count())
    out = tempfile.mkdtemp(prefix="profile_")
    argv = ["--algo", "grpo", "--model", MODEL, "--dataset", DATA, "--out", out, *RECIPE, "--eval-size", "0"]
    args = options.resolve_defaults(options.parse_args(options.Args, argv), 1)
    options.check_args(args, 1)
    rank, world, device = distributed.setup_distributed()
    run = train.build_run(args, rank, world, device)
    minibatch_gradients, profiles = train.minibatch_gradients, []

    def profiled(run_, mini):  # the update's forward and backward passes (train.minibatch_gradients) under the profiler
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = minibatch_gradients(run_, mini)
        profiles.append(prof)
        return out

    train.rl_step(run, step=1)  # warm-up: allocations, AdamW's state
    train.minibatch_gradients = profiled  # patched for the profiled step only, in this process
    row = train.rl_step(run, step=2)
    train.minibatch_gradients = minibatch_gradients
    prof = profiles[-1]
    phases = {k: round(v, 1) for k, v in row.items() if k.startswith("time_") or k == "step_time_s"}
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=45)
    text = (f"one GRPO step, SmolLM2-135M-Instruct, {args.prompts_per_step} prompts x {args.group_size}, "
            f"{args.max_new_tokens} new tokens, micro-batch {args.micro_batch_size}, 1 process, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}\n"
            f"phases (s): {phases}; completion tokens {row['completion_len_mean']:.1f} a sample\n\n{table}")
    os.makedirs(os.path.join(REPO, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(REPO, "benchmarks", "results", "real_model_profile.txt"), "w") as f:
        f.write(text)
    print(text)
    distributed.dist.destroy_process_group()


if __name__ == "__main__":
    main()
