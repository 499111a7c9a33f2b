"""Reward-model overoptimisation on the embedded task: PPO and GRPO against the learned reward model, at several β.

Gao, Schulman & Hilton 2022 ("Scaling Laws for Reward Model Overoptimization") plot the proxy reward (the learned
model the policy is trained on) and the gold reward (what the proxy stands in for) against d = √KL(π ‖ π_init):
the proxy keeps rising while the gold rises, peaks and falls. Here the gold is known exactly (the 'math' checker),
and document 004's first pitfall ("monitor response quality during training, not just reward scores") is the
`gold_reward_mean` train.py logs beside `reward_mean`.

    python benchmarks/overoptimization.py                 (builds the sft and rm stages first, into --work)
    python benchmarks/overoptimization.py --sft DIR --rm DIR --betas 0,0.02,0.05,0.1 --steps 400
    python benchmarks/overoptimization.py --rm-rounds 8 --name overoptimization_rounds8   (a weaker reward model: its
        comparisons from 8 rounds of sampling instead of the default --comparison-rounds 64)

Each run is `python train.py --algo {ppo,grpo} --model SFT --reward none --reward-model RM [--critic-init RM]
--beta β --steps N`, one thread, two runs at a time. β = 0 is run as β = 1e-6: a reference model must be loaded for
the KL to be logged, and at 1e-6 its penalty is nil (its largest effect on a reward is below 1e-4 of the reward's std).

KL per sequence = the logged `kl` (Σ k3 over sampled tokens / their number) × `completion_len_mean` (tokens / sequences)
= Σ k3 / sequences, exactly: KL(π_θold ‖ π_ref) by the k3 estimator, where π_ref = π_init is the SFT model.
Writes benchmarks/results/overoptimization.{json,md,png}.
"""
import argparse
import concurrent.futures
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def run(cmd: list, log: str) -> float:
    """`python train.py CMD` into `log`."""
    t0 = time.time()
    with open(log, "w") as f:
        subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *map(str, cmd)], cwd=REPO, env=ENV, stdout=f,
                       stderr=subprocess.STDOUT, check=True)
    return time.time() - t0


def rows(out: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if line.strip()]


def one(algo: str, beta: float, a) -> dict:
    out = os.path.join(a.work, f"{algo}_beta{beta}")
    cmd = ["--algo", algo, "--model", a.sft, "--reward", "none", "--reward-model", a.rm, "--beta", beta or 1e-6,
           "--steps", a.steps, "--eval-every", a.eval_every, "--seed", a.seed, "--out", out, "--plot", "false",
           "--save-every", "0", "--export", "false"] + (["--critic-init", a.rm] if algo == "ppo" else [])
    if not os.path.exists(os.path.join(out, "metrics.jsonl")) or a.fresh:
        subprocess.run(["rm", "-rf", out])
        wall = run(cmd, out + ".log")
    else:
        wall = None
    logged = rows(out)
    train_rows = [r for r in logged if "reward_mean" in r]
    evals = [(r["step"], r["eval_accuracy"]) for r in logged if "eval_accuracy" in r]
    curve = [{"step": r["step"], "proxy": r["reward_mean"], "gold": r["gold_reward_mean"],
              "kl_seq": r["kl"] * r["completion_len_mean"]} for r in train_rows]
    return {"algo": algo, "beta": beta, "wall_s": wall, "curve": curve, "eval": evals}


def smooth(xs: list[float], k: int = 10) -> list[float]:
    return [sum(xs[max(0, i - k + 1) : i + 1]) / len(xs[max(0, i - k + 1) : i + 1]) for i in range(len(xs))]


def table(results: list[dict]) -> str:
    lines = ["| algo | β | greedy gold at step 0 | peak greedy gold (step) | final greedy gold | final proxy (train, "
             "mean of last 10) | final gold (train, mean of last 10) | final √KL per sequence |", "|---" * 8 + "|"]
    for r in results:
        last = r["curve"][-10:]
        peak = max(r["eval"], key=lambda e: e[1])
        lines.append(f"| {r['algo']} | {r['beta']} | {r['eval'][0][1]:.3f} | {peak[1]:.3f} ({peak[0]}) | "
                     f"{r['eval'][-1][1]:.3f} | {sum(x['proxy'] for x in last) / len(last):.2f} | "
                     f"{sum(x['gold'] for x in last) / len(last):.3f} | "
                     f"{math.sqrt(max(0.0, sum(x['kl_seq'] for x in last) / len(last))):.2f} |")
    return "\n".join(lines)


def windows(curve: list[dict], k: int = 25) -> list[dict]:
    """Means over consecutive windows of k steps: one point per window (the step-level KL is noisy)."""
    out = []
    for i in range(0, len(curve) - k + 1, k):
        part = curve[i : i + k]
        out.append({key: sum(c[key] for c in part) / k for key in ("step", "proxy", "gold", "kl_seq")})
    return out


def plot(results: list[dict], path: str) -> None:
    """Top: proxy and gold against the step. Bottom: against √KL(π ‖ π_init), one point per 25 steps, in step order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for col, algo in enumerate(("ppo", "grpo")):
        for i, r in enumerate(x for x in results if x["algo"] == algo):
            w = windows(r["curve"])
            d = [math.sqrt(max(0.0, p["kl_seq"])) for p in w]
            for ax, x in ((axes[0][col], [p["step"] for p in w]), (axes[1][col], d)):
                style = dict(color=f"C{i}", markersize=3)
                ax.plot(x, [p["proxy"] for p in w], "o-", label=f"proxy, β={r['beta']}", **style)
                ax.plot(x, [p["gold"] for p in w], "s--", label=f"gold, β={r['beta']}", **style)
        axes[0][col].set_xlabel("RL step (mean over each 25 steps)")
        axes[1][col].set_xlabel("√KL(π ‖ π_init) per sequence (k3; mean over each 25 steps)")
        title = f"{algo.upper()}: proxy (standardised reward model, solid), gold (share correct, dashed)"
        axes[0][col].set_title(title, fontsize=9)
        for ax in axes[:, col]:
            ax.set_ylabel("reward")
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sft", help="the SFT model (default: train.py --algo sft into WORK/sft)")
    p.add_argument("--rm", help="the reward model (default: train.py --algo rm into WORK/rm)")
    p.add_argument("--betas", default="0,0.02,0.05,0.1")
    p.add_argument("--algos", default="ppo,grpo")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="default: out/NAME")
    p.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--fresh", action="store_true", help="run again the runs already in --work")
    p.add_argument("--rm-rounds", type=int, help="rounds of comparisons for the reward model it builds")
    p.add_argument("--name", default="overoptimization", help="results file stem under --results")
    a = p.parse_args(argv)
    a.work = a.work or os.path.join(REPO, "out", a.name)
    os.makedirs(a.work, exist_ok=True)
    t0 = time.time()
    build_stages(a)
    jobs = [(algo, float(b)) for algo in a.algos.split(",") for b in a.betas.split(",")]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda job: one(*job, a), jobs))
    write(a, results, time.time() - t0)
    print(table(results))
    return 0


def build_stages(a) -> None:
    """The sft and rm stages into --work, unless --sft and --rm name them (or they are there already)."""
    if not a.sft:
        a.sft = os.path.join(a.work, "sft", "hf")
        if not os.path.exists(a.sft):
            run(["--algo", "sft", "--out", os.path.join(a.work, "sft"), "--seed", a.seed],
                os.path.join(a.work, "sft.log"))
    if not a.rm:
        a.rm = os.path.join(a.work, "rm", "hf")
        if not os.path.exists(a.rm):
            rounds = ["--comparison-rounds", a.rm_rounds] if a.rm_rounds else []
            run(["--algo", "rm", "--model", a.sft, "--out", os.path.join(a.work, "rm"), "--seed", a.seed, *rounds],
                os.path.join(a.work, "rm.log"))


def write(a, results: list[dict], seconds: float) -> None:
    rm_log = os.path.join(os.path.dirname(a.rm), "metrics.jsonl")
    rm_eval = [r for r in rows(os.path.dirname(a.rm)) if "eval_pair_accuracy" in r] if os.path.exists(rm_log) else []
    summary = {"sft": os.path.relpath(a.sft, REPO), "rm": os.path.relpath(a.rm, REPO), "steps": a.steps,
               "rm_rounds": a.rm_rounds or 64,
               "rm_eval_pair_accuracy": rm_eval[-1]["eval_pair_accuracy"] if rm_eval else None,
               "runtime_s": seconds, "runs": results}
    os.makedirs(a.results, exist_ok=True)
    with open(os.path.join(a.results, a.name + ".json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(a.results, a.name + ".md"), "w") as f:
        f.write(table(results) + "\n")
    plot(results, os.path.join(a.results, a.name + ".png"))


if __name__ == "__main__":
    sys.exit(main())
