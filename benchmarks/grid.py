"""Does the embedded default learn on every seed and rank count? The default command, seeds × ranks × algorithms.

Each cell is exactly what a user types, run to completion in a fresh --out (warm start included):

    python train.py --algo ALGO --seed S                          (1 rank)
    torchrun --nproc_per_node 2 train.py --algo ALGO --seed S     (2 ranks)

and is timed from launch to exit. The table gives the warm start's held-out accuracy (what the supervised phase
stopped at), the greedy evaluation accuracy at every --eval-every step, and the wall time; the plot draws every
cell's evaluation curve. The target the project holds itself to (benchmarks/README.md, "Figures"): every cell
≥ 0.90 final accuracy in ≤ 300 s on 2 CPU cores.

    python benchmarks/grid.py                        # seeds 0-4 x {1, 2} ranks x {grpo, ppo}: ~1 hour on 2 cores
    python benchmarks/grid.py --seeds 0 --algos grpo --ranks 2     # one cell
    python benchmarks/grid.py --keep                 # add to the cells already in the JSON (rerun after a stop)

Cells run one after another, never two at once: each one's wall time is meant to be what that command takes alone
on the machine. Results: benchmarks/results/grid.{json,md,png}.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
TARGET_ACCURACY, TARGET_SECONDS = 0.90, 300.0


def command(algo: str, seed: int, ranks: int, out: str, extra: list[str]) -> list[str]:
    """The README's default command for this cell (torchrun is `python -m torch.distributed.run`)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
    launcher = [sys.executable] if ranks == 1 else torchrun
    return launcher + ["train.py", "--algo", algo, "--seed", str(seed), "--out", out, *extra]


def run_cell(algo: str, seed: int, ranks: int, extra: list[str]) -> dict:
    out = tempfile.mkdtemp(prefix=f"grid_{algo}_{ranks}r_s{seed}_")
    shutil.rmtree(out)  # train.py creates it: a fresh --out, as a new user has
    t0 = time.perf_counter()
    p = subprocess.run(command(algo, seed, ranks, out, extra), cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cell = {"algo": algo, "ranks": ranks, "seed": seed, "returncode": p.returncode, "wall_s": round(wall, 1)}
    if p.returncode != 0:
        cell["error"] = (p.stderr.strip().splitlines() or ["(no stderr)"])[-1]
    sft_rows = os.path.join(out, "sft", "metrics.jsonl")  # the warm start: the sft stage's own --out
    sft_evals = [json.loads(line) for line in open(sft_rows) if "eval_accuracy" in line] \
        if os.path.exists(sft_rows) else []
    if sft_evals:
        cell["sft_steps"], cell["sft_accuracy"] = sft_evals[-1]["step"], sft_evals[-1]["eval_accuracy"]
    path = os.path.join(out, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    cell["eval"] = {str(r["step"]): r["eval_accuracy"] for r in rows if r.get("eval_accuracy") is not None}  # JSON keys
    cell["final"] = cell["eval"][max(cell["eval"], key=int)] if cell["eval"] else None
    shutil.rmtree(out, ignore_errors=True)  # checkpoints and exports: not needed for the table
    return cell


def passes(c: dict) -> bool:
    return not misses(c)


def misses(c: dict) -> str:
    """Why a cell misses the target ('' when it meets it)."""
    if c["returncode"] != 0 or c["final"] is None:
        return f"failed ({c.get('error', 'no evaluation')})"
    why = [f"accuracy {c['final']:.3f} < {TARGET_ACCURACY}"] if c["final"] < TARGET_ACCURACY else []
    why += [f"wall {c['wall_s']:.0f} s > {TARGET_SECONDS:.0f} s"] if c["wall_s"] > TARGET_SECONDS else []
    return ", ".join(why)


def table(cells: list[dict], machine: str) -> str:
    steps = sorted({int(s) for c in cells for s in c["eval"]})
    head = ["algo", "ranks", "seed", "warm start (held-out)", *[f"{s}" for s in steps], "wall s", "target"]
    lines = [f"Machine: {machine}", "", "Greedy accuracy on the 200 evaluation prompts at each step; warm start = the "
             "supervised phase's steps and its accuracy on 200 held-out training prompts.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in sorted(cells, key=lambda c: (c["algo"], c["ranks"], c["seed"])):
        acc = [f"{c['eval'].get(str(s), float('nan')):.3f}" for s in steps]
        if acc:
            acc[-1] = f"**{acc[-1]}**"
        warm = f"{c.get('sft_steps', '?')} steps, {c.get('sft_accuracy', float('nan')):.3f}"
        verdict = "met" if passes(c) else "**missed**: " + misses(c)
        lines.append(f"| {c['algo']} | {c['ranks']} | {c['seed']} | {warm} | " + " | ".join(acc)
                     + f" | {c['wall_s']:.0f} | {verdict} |")
    lines += ["", summary(cells)]
    return "\n".join(lines) + "\n"


def summary(cells: list[dict]) -> str:
    out = []
    for algo in sorted({c["algo"] for c in cells}):
        mine = [c for c in cells if c["algo"] == algo and c["final"] is not None]
        if not mine:
            continue
        finals, walls = [c["final"] for c in mine], [c["wall_s"] for c in mine]
        out.append(f"- {algo}: final accuracy {min(finals):.3f}–{max(finals):.3f} "
                   f"(mean {sum(finals) / len(finals):.3f}), "
                   f"wall {min(walls):.0f}–{max(walls):.0f} s, {sum(map(passes, mine))}/{len(mine)} cells meet "
                   f"≥ {TARGET_ACCURACY} in ≤ {TARGET_SECONDS:.0f} s")
    return "\n".join(out)


def plot(cells: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = sorted({c["algo"] for c in cells})
    fig, axes = plt.subplots(1, len(algos), figsize=(6 * len(algos), 4), squeeze=False)
    for ax, algo in zip(axes[0], algos):
        for c in (c for c in cells if c["algo"] == algo):
            steps = sorted(int(s) for s in c["eval"])
            ax.plot(steps, [c["eval"][str(s)] for s in steps], marker=".",
                    color="tab:blue" if c["ranks"] == 1 else "tab:orange", alpha=0.8,
                    label=f"{c['ranks']} rank(s)" if c["seed"] == min(d["seed"] for d in cells) else None)
        ax.axhline(TARGET_ACCURACY, color="gray", linestyle="--", linewidth=1)
        ax.set(title=f"{algo}: default command, every seed", xlabel="RL step", ylabel="greedy eval accuracy",
               ylim=(0, 1))
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--algos", default="grpo,ppo")
    ap.add_argument("--keep", action="store_true", help="keep the cells already in grid.json; run the missing ones")
    ap.add_argument("--name", default="grid", help="results file stem under benchmarks/results/")
    ap.add_argument("--report", action="store_true", help="only rewrite the table and plot from the JSON")
    ap.add_argument("extra", nargs="*", help="more train.py options after --, e.g. -- --steps 300 (not the default)")
    a = ap.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, a.name)
    saved = json.load(open(stem + ".json")) if (a.keep or a.report) and os.path.exists(stem + ".json") else {}
    cells = saved.get("cells", [])
    done = {(c["algo"], c["ranks"], c["seed"]) for c in cells}
    machine = saved.get("machine") or \
        f"{cpu_name()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, python {platform.python_version()}"
    for algo in [] if a.report else a.algos.split(","):
        for ranks in map(int, a.ranks.split(",")):
            for seed in map(int, a.seeds.split(",")):
                if (algo, ranks, seed) in done:
                    continue
                cell = run_cell(algo, seed, ranks, a.extra)
                cells.append(cell)
                print(json.dumps(cell), flush=True)
                with open(stem + ".json", "w") as f:  # after every cell: a stopped grid keeps what it measured
                    json.dump({"machine": machine, "extra": a.extra, "cells": cells}, f, indent=1)
    text = table(cells, machine)
    open(stem + ".md", "w").write(text)
    plot(cells, stem + ".png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
