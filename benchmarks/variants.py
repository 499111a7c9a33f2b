"""The 2024-25 variants on the embedded task, beside the default GRPO and PPO: final greedy accuracy and wall time.

Each cell is the default command on the embedded task with one variant's flag, from one shared warm start:

    python train.py --algo sft --out out/variants/sft                          (once: the supervised stage)
    python train.py --algo grpo --model out/variants/sft/hf --seed S FLAGS     (every cell)

1 rank each, two cells at a time on 2 cores (each cell's time is with another cell running beside it: compare the
cells with each other, not with the grid's times). The table gives each cell's greedy accuracy on the 200 evaluation
prompts at the end, the mean over seeds, the cell's time (from its run's first file to its last, read from the file
system: the interpreter's start-up, about 5 s, is not in it), and what the variant itself logs (the batches
--dynamic-sampling read a step, the sampler correction's mean weight). Every cell is read back from its run's
directory, out/variants/NAME_sSEED, so a run of some rows (--only) adds to those already there.

    python benchmarks/variants.py                     # every variant × seeds 0 and 1: about 35 minutes on 2 cores
    python benchmarks/variants.py --only rloo gspo    # some rows (the slug of each name)
    python benchmarks/variants.py --table             # the table from the runs already made

Results: benchmarks/results/variants.{json,md}.
"""

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
WORK = os.path.join(ROOT, "out", "variants")
SFT = os.path.join(WORK, "sft")
VARIANTS = {  # name: (algo, flags)
    "grpo (default)": ("grpo", []),
    "ppo (default)": ("ppo", []),
    "rloo": ("grpo", ["--advantage", "rloo"]),
    "reinforce++-baseline": ("grpo", ["--advantage", "reinforce-pp-baseline"]),
    "gspo": ("grpo", ["--policy-loss", "gspo"]),
    "dapo dynamic sampling": ("grpo", ["--dynamic-sampling"]),
    "dapo overlong shaping": ("grpo", ["--overlong-buffer", "3"]),
    "sampler correction": ("grpo", ["--sampler-correction-cap", "2", "--sampler-correction-mask"]),
}
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def warm_start() -> None:
    """The supervised stage of the embedded task, once, into out/variants/sft (kept when it is already complete)."""
    if os.path.exists(os.path.join(SFT, "hf", "config.json")):
        return
    shutil.rmtree(SFT, ignore_errors=True)
    subprocess.run([sys.executable, "train.py", "--algo", "sft", "--out", SFT, "--plot", "false"], cwd=ROOT, env=ENV,
                   check=True, capture_output=True)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.split(" (")[0].replace("++", "-pp")).strip("-")


def out_dir(name: str, seed: int) -> str:
    return os.path.join(WORK, f"{slug(name)}_s{seed}")


def run_cell(name: str, seed: int) -> None:
    """The cell's train.py run into out/variants/SLUG_sSEED; its exit and measured wall time in cell.json there."""
    algo, flags = VARIANTS[name]
    out = out_dir(name, seed)
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["train.py", "--algo", algo, "--model", os.path.relpath(os.path.join(SFT, "hf"), ROOT), "--seed", str(seed),
           "--out", os.path.relpath(out, ROOT), "--plot", "false", *flags]  # relative: the command as typed at the root
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=ENV, capture_output=True, text=True)
    cell = {"command": "python " + " ".join(cmd), "returncode": p.returncode,
            "wall_s": round(time.perf_counter() - t0, 1)}
    if p.returncode != 0:
        cell["error"] = (p.stderr.strip().splitlines() or ["(no stderr)"])[-1]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "cell.json"), "w") as f:
        json.dump(cell, f)
    shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)  # not needed for the table


def read_cell(name: str, seed: int) -> dict | None:
    """A cell from its run's directory: final accuracy, the time from the run's first file to its last, the variant's
    own logged means; None when it was never run."""
    out = out_dir(name, seed)
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    cell = {"variant": name, "seed": seed} | (json.load(open(os.path.join(out, "cell.json")))
                                              if os.path.exists(os.path.join(out, "cell.json")) else {})
    if "command" in cell:  # a machine's absolute paths out of the record
        cell["command"] = cell["command"].replace(ROOT + os.sep, "")
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f != "cell.json"]
    times = [os.path.getmtime(f) for f in files]  # the --out lock is the first file and is never written again
    cell["span_s"] = round(max(times) - min(times), 1)
    rows = [json.loads(line) for line in open(path) if line.strip()]
    evals = [r for r in rows if r.get("eval_accuracy") is not None]
    steps = [r for r in rows if "reward_mean" in r]
    if not steps or steps[-1]["step"] < 400:
        return cell | {"error": cell.get("error", f"stopped at step {steps[-1]['step'] if steps else 0}")}
    cell |= {"start": evals[0]["eval_accuracy"], "final": evals[-1]["eval_accuracy"], "steps": steps[-1]["step"],
             "at_100": next(r["eval_accuracy"] for r in evals if r["step"] == 100)}
    for key in ("sample_batches", "frac_reward_zero_std_drawn", "sampler_weight_mean", "sampler_frac_masked",
                "frac_reward_zero_std"):
        values = [r[key] for r in steps if r.get(key) is not None]
        if values:
            cell[key] = round(sum(values) / len(values), 4)
    return cell


def render(cells: list[dict], seeds: list[int]) -> str:
    starts = sorted({c["start"] for c in cells if c.get("start") is not None})
    lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; 1 rank a cell, two cells "
             "at a time; the embedded task's defaults (400 steps), one warm start (`--algo sft`, seed 0) for all: "
             f"greedy accuracy {'–'.join(f'{x:.3f}' for x in starts[:1] + starts[-1:][len(starts) < 2:])} at step 0.",
             "", "| variant | flags | mean at step 100 | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean at 400 | s a run | logged |", "|---|---|---|" + "---|" * len(seeds) + "---|---|---|"]
    for name, (_, flags) in VARIANTS.items():
        mine = {c["seed"]: c for c in cells if c["variant"] == name}
        if not mine:
            continue
        finals = [mine[s].get("final") for s in seeds if s in mine]
        done = [f for f in finals if f is not None]
        walls = [mine[s]["span_s"] for s in seeds if s in mine]
        logged = "; ".join(f"{k} {v}" for c in mine.values() for k, v in c.items() if k in (
            "sample_batches", "frac_reward_zero_std_drawn", "sampler_weight_mean", "sampler_frac_masked"))
        early = [mine[s]["at_100"] for s in seeds if mine.get(s, {}).get("at_100") is not None]
        lines.append(f"| {name} | `{' '.join(flags) or '-'}` | {sum(early) / max(len(early), 1):.3f} | "
                     + " | ".join(f"{mine[s]['final']:.3f}" if mine.get(s, {}).get("final") is not None
                                  else mine.get(s, {}).get("error", "-") for s in seeds)
                     + f" | {sum(done) / len(done):.3f} | {min(walls):.0f}-{max(walls):.0f} | {logged or '-'} |"
                     if done else f"| {name} | `{' '.join(flags)}` | failed: {finals} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--only", nargs="+", default=None, help="the variants to run (slugs: " +
                   ", ".join(slug(n) for n in VARIANTS) + ")")
    p.add_argument("--table", action="store_true", help="only the table, from the runs already made")
    args = p.parse_args()
    if not args.table:
        names = [n for n in VARIANTS if args.only is None or slug(n) in args.only]
        warm_start()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda job: run_cell(*job), [(n, s) for n in names for s in args.seeds]))
    cells = [c for n in VARIANTS for s in args.seeds if (c := read_cell(n, s)) is not None]
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "variants.json"), "w") as f:
        json.dump({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                   "cells": cells}, f, indent=1)
    with open(os.path.join(RESULTS, "variants.md"), "w") as f:
        f.write(render(cells, args.seeds))
    print(render(cells, args.seeds))


if __name__ == "__main__":
    main()
