"""TRL's GRPOTrainer beside this project's `train.py --algo grpo`: time per step and final greedy accuracy, at equal
settings, over several seeds.

Run from the repository root with the project's virtualenv; the TRL side runs in a virtualenv of its own (TRL is never
a requirement of the project):

    python3 -m venv .trl-venv && .trl-venv/bin/pip install -r benchmarks/trl_requirements.txt
    python benchmarks/trl_compare.py                        # seeds 0-4, 300 steps per side (~10 min on 2 idle cores)
    python benchmarks/trl_compare.py --seeds 0,1,2 --steps 300
    python benchmarks/trl_compare.py --quick                # smoke test: seed 0, 10 steps per side
    python benchmarks/trl_compare.py --model DIR --dataset DIR   # another start model, DIR/{train,test}.jsonl
    python benchmarks/trl_compare.py --preset smollm2 --model models/SmolLM2-135M-Instruct --dataset out/word_problems \
        --seeds 0 --steps 6 --skip-steps 1 --threads 2      # the real model's recipe: time per step

That the two sides compute the same loss and gradient is a test, tests/test_trl_equivalence.py (how to run it:
benchmarks/trl_requirements.txt): on one batch they agree to ~1e-4 relative, the ε of the advantages' std division.
Here:
 1. `train.py --algo sft` builds the embedded task (embedded_data/{train,test}.jsonl, "a+b=" prompts) and the tiny
    SFT-warmed Llama (hf/) once: both sides start from that checkpoint and read those files (or --model, --dataset).
 2. For each seed, each side as its own process, one after the other (never concurrently), the order alternating
    by seed so that a drift of the machine's load does not always favour the same side:
      ours  `train.py --algo grpo --model START --dataset DATA ...`; time per step from metrics.jsonl (`step_time_s`:
            generate → score → reference log-probs → advantages → update; evaluation, logging and checkpoints are
            outside it);
      TRL   benchmarks/trl_side.py under the TRL virtualenv: GRPOTrainer with the config of trl_side.trl_config();
            time per step from a TrainerCallback, on_step_begin → on_step_end (the same work; the dataloader fetch
            before on_step_begin and the logging after on_step_end are outside it, as ours).
 3. The start and final greedy accuracy of both sides by one function, greedy_accuracy().
 4. A short table on stdout; every number in benchmarks/results/trl_compare.json (trl_compare_quick.json with --quick).

Equal settings (SETTINGS, the flags of ours_command() and the fields of trl_config(), each with its reason; --preset
smollm2 swaps in benchmarks/real_model.py's recipe with the chat template on both sides, and times steps only): 16
prompts × 8 completions per optimizer step (on-policy: π_θold is the update's own first forward pass), β 0.04 with
k3, lr 3e-4 constant, AdamW, clipping at norm 1, ε 0.2, token-mean loss, group-std-scaled advantages, ≤ 4 new tokens
at temperature 1, no entropy bonus, fp32 on the CPU, one process, the same torch threads (--threads) for both sides
and the evaluation.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TRL_PYTHON = os.path.join(REPO, ".trl-venv", "bin", "python")  # a virtualenv in the checkout
PRESETS = {  # both sides' settings: ours_command() and trl_side.trl_config(); chosen by --preset
    "embedded": dict(prompts_per_step=16, group_size=8, beta=0.04, lr=3e-4, max_new_tokens=4, temperature=1.0,
                     eps=0.2, max_grad_norm=1.0, weight_decay=0.0, chat_template=False, eval_size=200),
    # benchmarks/real_model.py's recipe in one process (--model SmolLM2-135M-Instruct --dataset out/word_problems);
    # time per step only: no evaluations
    "smollm2": dict(prompts_per_step=4, group_size=8, beta=0.02, lr=2e-5, max_new_tokens=24, temperature=1.0,
                    eps=0.2, max_grad_norm=1.0, weight_decay=0.0, chat_template=True, eval_size=0)}
SETTINGS = dict(PRESETS[os.environ.get("TRL_COMPARE_PRESET", "embedded")])  # trl_side.py inherits the preset
PHASES = ("generate", "score", "forward", "update")


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def greedy_accuracy(model_dir: str, test_path: str, tokenizer_dir: str) -> float:
    """Fraction of test prompts whose greedy completion (at most max_new_tokens, stopping at EOS) rewards.math_reward
    scores 1.0. One left-padded batch; generate() derives the position ids from the attention mask. The tokenizer is
    always the start model's (both sides save it unchanged), so only the weights differ between calls."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    sys.path.insert(0, REPO)
    import rewards

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars
    rows = read_jsonl(test_path)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # Greedy and nothing else: every field that could add a logits processor is left unset or neutral
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=SETTINGS["max_new_tokens"],
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                              bos_token_id=tok.bos_token_id)
    enc = tok([r["question"] for r in rows], return_tensors="pt", padding=True)  # (N, P)
    with torch.no_grad():
        out = model.generate(**enc, generation_config=config)  # (N, P + T)
    texts = [tok.decode(c[: c.index(tok.eos_token_id)] if tok.eos_token_id in c else c, skip_special_tokens=True)
             for c in out[:, enc["input_ids"].shape[1]:].tolist()]  # the text before the first EOS
    return sum(rewards.math_reward(t, r["answer"]) == 1.0 for t, r in zip(texts, rows)) / len(rows)


# ======================================================================================================================
# Our side: train.py's command line and its metrics (the TRL side: benchmarks/trl_side.py)
# ======================================================================================================================
def ours_command(python: str, model_dir: str, data_dir: str, out: str, seed: int, steps: int) -> list[str]:
    s, batch = SETTINGS, SETTINGS["prompts_per_step"] * SETTINGS["group_size"]
    flags = {
        "--algo": "grpo", "--model": model_dir, "--dataset": data_dir,  # the directory: train.jsonl and test.jsonl
        "--prompts-per-step": s["prompts_per_step"], "--group-size": s["group_size"],
        "--epochs": 1, "--minibatch-size": batch,  # one optimizer step per batch
        "--micro-batch-size": batch,  # one forward of 128 (TRL: one chunk of 128)
        "--beta": s["beta"], "--kl-estimator": "k3", "--lr": s["lr"], "--lr-schedule": "constant",
        "--weight-decay": s["weight_decay"], "--max-grad-norm": s["max_grad_norm"], "--eps": s["eps"],
        "--max-new-tokens": s["max_new_tokens"], "--temperature": s["temperature"], "--mask-truncated": "false",
        "--loss-agg": "token-mean", "--scale-rewards": "true", "--ent-coef": 0, "--reward": "math",
        "--chat-template": str(s["chat_template"]).lower(),  # the tokenizer's chat template around each question
        "--steps": steps, "--eval-size": s["eval_size"], "--eval-every": steps,  # train.py's own eval at step 0 and at the end
        "--save-every": 0, "--export": "true",  # one checkpoint + OUT/hf export, after the last timed step
        "--plot": "false", "--dtype": "fp32", "--seed": seed, "--out": out,
    }
    return [python, os.path.join(REPO, "train.py")] + [str(x) for kv in flags.items() for x in kv]


def read_ours(out: str) -> dict:
    """Step and phase times, and train.py's own evaluations (step, accuracy), from OUT/metrics.jsonl."""
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    steps = [r for r in rows if "step_time_s" in r]
    return {"step_times_s": [r["step_time_s"] for r in steps],
            "phases_s": {p: [r[f"time_{p}_s"] for r in steps] for p in PHASES if steps and f"time_{p}_s" in steps[0]},
            "internal_eval": [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]}


# ======================================================================================================================
# The comparison: the start model once, each (seed, side) in turn, both scored by greedy_accuracy(), reported
# ======================================================================================================================
def run_logged(cmd: list[str], log_path: str, threads: int) -> float:
    """Run cmd, its output in log_path, on `threads` threads, CPU only, offline: its wall time in seconds, or (when it
    fails) the log's tail and exit 1."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1", WANDB_DISABLED="true")
    t = time.perf_counter()
    with open(log_path, "w") as log:
        print(" ".join(cmd) + "\n", file=log, flush=True)
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    if code:
        print("\n".join(open(log_path).read().splitlines()[-25:]), file=sys.stderr)
        sys.exit(print(f"error: exit code {code} from `{' '.join(cmd[:3])} ...` (log: {log_path})", file=sys.stderr)
                 or 1)
    return time.perf_counter() - t


def start_point(a, work: str) -> tuple[str, str]:
    """(model, data): --model and --dataset, or train.py --algo sft's SFT-warmed tiny model and embedded data."""
    if a.model:
        return os.path.abspath(a.model), os.path.abspath(a.dataset)
    out = os.path.join(work, "sft")
    model_dir, data_dir = os.path.join(out, "hf"), os.path.join(out, "embedded_data")
    if not (a.reuse_sft and os.path.isdir(model_dir) and os.path.isfile(os.path.join(data_dir, "test.jsonl"))):
        shutil.rmtree(out, ignore_errors=True)
        print(f"building the SFT model and data with train.py --algo sft in {out}", flush=True)
        run_logged([a.ours_python, os.path.join(REPO, "train.py"), "--algo", "sft", "--out", out, "--plot", "false"],
                   os.path.join(work, "sft.log"), a.threads)
    return model_dir, data_dir


def run_side(side: str, seed: int, a, start: tuple[str, str], work: str) -> dict:
    """One process of one side, then its final model's greedy accuracy: one row of the results."""
    (model_dir, data_dir), out = start, os.path.join(work, f"{side}_seed{seed}")
    shutil.rmtree(out, ignore_errors=True)  # a fresh run every time (train.py refuses a stale --out without --resume)
    os.makedirs(out)
    cmd = ours_command(a.ours_python, model_dir, data_dir, out, seed, a.steps) if side == "ours" else [
        a.trl_python, os.path.join(REPO, "benchmarks", "trl_side.py"), "--model", model_dir, "--dataset", data_dir,
        "--out", out, "--seed", str(seed), "--steps", str(a.steps), "--threads", str(a.threads)]
    wall = run_logged(cmd, out + ".log", a.threads)
    raw = read_ours(out) if side == "ours" else json.load(open(os.path.join(out, "side.json")))
    if len(raw["step_times_s"]) != a.steps:
        sys.exit(print(f"error: {side} seed {seed} timed {len(raw['step_times_s'])} steps, not {a.steps}",
                       file=sys.stderr) or 1)
    kept = raw["step_times_s"][a.skip_steps:] or raw["step_times_s"]  # the first steps warm allocator and caches
    final = os.path.join(out, "hf" if side == "ours" else "final")
    row = {"seed": seed, "side": side, "median_ms": 1e3 * statistics.median(kept),
           "mean_ms": 1e3 * statistics.fmean(kept), "steps_timed": len(kept),
           "final_accuracy": greedy_accuracy(final, os.path.join(data_dir, "test.jsonl"), model_dir)
           if SETTINGS["eval_size"] else float("nan"),
           "phases_median_ms": {k: 1e3 * statistics.median(v[a.skip_steps:] or v) for k, v in raw["phases_s"].items()},
           "process_wall_s": wall, "raw": raw}
    print(f"{side:>4} seed {seed}: median step {row['median_ms']:.1f} ms, mean {row['mean_ms']:.1f} ms, "
          f"final greedy accuracy {row['final_accuracy']:.3f}", flush=True)
    return row


def checks(runs: list[dict], start_acc: float, steps: int) -> list[str]:
    """Warnings: train.py's own greedy evaluations against greedy_accuracy(); TRL's generation batches."""
    out, want = [], (SETTINGS["prompts_per_step"] * SETTINGS["group_size"], SETTINGS["prompts_per_step"])
    for r in runs:
        ev = r["raw"].get("internal_eval") or [(0, start_acc), (steps, r["final_accuracy"])]
        if not SETTINGS["eval_size"]:
            ev = [(0, start_acc), (steps, r["final_accuracy"])]
        if abs(ev[0][1] - start_acc) > 1e-9 or abs(ev[-1][1] - r["final_accuracy"]) > 1e-9:
            out.append(f"seed {r['seed']}: train.py's own eval ({ev[0][1]:.3f} → {ev[-1][1]:.3f}) differs from "
                       f"greedy_accuracy() ({start_acc:.3f} → {r['final_accuracy']:.3f})")
        if set(map(tuple, r["raw"].get("batches", [want]))) != {want}:
            out.append(f"seed {r['seed']}: TRL's generation batches (sequences, prompts) are not {want}")
    return out


def summarize(runs: list[dict]) -> dict:
    """Per side, mean and sample sd over seeds of the median step time and of the final accuracy; ours / TRL."""
    spread = lambda xs: (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)  # noqa: E731
    out = {side: {key: spread([r[key] for r in runs if r["side"] == side]) for key in ("median_ms", "final_accuracy")}
           for side in ("ours", "trl")}
    by = {(r["seed"], r["side"]): r["median_ms"] for r in runs}
    ratios = [by[s, "ours"] / by[s, "trl"] for s in sorted({r["seed"] for r in runs})]
    out["ours_over_trl_median_step"] = {"of_means": out["ours"]["median_ms"][0] / out["trl"]["median_ms"][0],
                                        "per_seed_min": min(ratios), "per_seed_max": max(ratios)}
    return out


def show(report: dict) -> None:
    """Per run: step times (ms, over the steps after --skip-steps), final accuracy, median phase times (ms)."""
    print(f"\n{'seed':>4} {'side':>4} {'median':>8} {'mean':>8} {'accuracy':>8} " + " ".join(f"{p:>8}" for p in PHASES))
    for r in report["runs"]:
        ph = " ".join(f"{r['phases_median_ms'].get(p, float('nan')):8.1f}" for p in PHASES)
        print(f"{r['seed']:>4} {r['side']:>4} {r['median_ms']:8.1f} {r['mean_ms']:8.1f} {r['final_accuracy']:8.3f} "
              + ph)
    s = report["summary"]
    for side in ("ours", "trl"):
        print(f"{side}: median step {s[side]['median_ms'][0]:.1f} ± {s[side]['median_ms'][1]:.1f} ms, final accuracy "
              f"{s[side]['final_accuracy'][0]:.3f} ± {s[side]['final_accuracy'][1]:.3f} "
              f"(start {report['start_accuracy']:.3f})")
    x = s["ours_over_trl_median_step"]
    print(f"ours / TRL, median step: {x['of_means']:.2f} (per seed {x['per_seed_min']:.2f}–{x['per_seed_max']:.2f}; "
          "below 1 = ours faster)", *[f"warning: {w}" for w in report["warnings"]], sep="\n")


def compare(a) -> int:
    import torch

    torch.set_num_threads(a.threads)  # the accuracy evaluation, with the sides' thread count
    seeds, work = [int(x) for x in a.seeds.split(",") if x.strip()], os.path.abspath(a.work_dir)
    os.makedirs(work, exist_ok=True)
    load, t0 = os.getloadavg(), time.time()
    start = start_point(a, work)
    test_path = os.path.join(start[1], "test.jsonl")
    start_acc = greedy_accuracy(start[0], test_path, start[0]) if SETTINGS["eval_size"] else float("nan")
    print(f"start greedy accuracy {start_acc:.3f} on {len(read_jsonl(test_path))} test prompts", flush=True)
    runs = [run_side(side, seed, a, start, work)  # in this order, one after the other
            for i, seed in enumerate(seeds) for side in (("ours", "trl") if i % 2 == 0 else ("trl", "ours"))]
    runs.sort(key=lambda r: (r["seed"], r["side"]))
    trl_raw = next(r["raw"] for r in runs if r["side"] == "trl")
    report = {"command": " ".join(["python"] + sys.argv), "settings": SETTINGS, "steps": a.steps, "seeds": seeds,
              "skip_steps": a.skip_steps, "threads": a.threads, "start": [os.path.relpath(x, REPO) for x in start],
              "start_accuracy": start_acc, "n_test": len(read_jsonl(test_path)), "versions": trl_raw["versions"],
              "python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "loadavg_start": load, "loadavg_end": os.getloadavg(), "runtime_s": time.time() - t0,
              "ours_flags": ours_command("python", "START", "DATA", "OUT", 0, a.steps)[2:],
              "trl_config_effective": trl_raw["config_effective"], "trl_optimizer": trl_raw["optimizer"],
              "summary": summarize(runs), "warnings": checks(runs, start_acc, a.steps), "runs": runs}
    show(report)
    os.makedirs(a.results_dir, exist_ok=True)
    stem = "trl_compare" + ("" if a.preset == "embedded" else "_" + a.preset) + ("_quick" if a.quick else "")
    path = os.path.join(a.results_dir, stem + ".json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--seeds", default=None, help="comma-separated seeds, each run on both sides (default 0,1,2,3,4)")
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (default 300)")
    p.add_argument("--quick", action="store_true", help="smoke test: seed 0, 10 steps (unless given), *_quick.json")
    p.add_argument("--skip-steps", type=int, default=None, help="first steps left out of the step-time statistics "
                   "(default 10: train.py's steps still settle over the first ~10; 2 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per side and for the evaluation")
    p.add_argument("--model", help="start from this Hugging Face model directory (default: train.py --algo sft's)")
    p.add_argument("--dataset", help="with --model: a directory of train.jsonl and test.jsonl (question, answer)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="embedded", help="the settings of both sides")
    p.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON, help="Python of the TRL virtualenv")
    p.add_argument("--ours-python", default=sys.executable, help="Python that runs train.py (default: this one)")
    p.add_argument("--work-dir", default=os.path.join(REPO, "out", "trl_compare"), help="runs, logs and models")
    p.add_argument("--results-dir", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--reuse-sft", action="store_true", help="reuse WORK/sft from an earlier run instead of building "
                   "it again (train.py's warm start may have changed since)")
    a = p.parse_args(argv)
    os.environ["TRL_COMPARE_PRESET"] = a.preset  # for trl_side.py, started with this environment
    SETTINGS.update(PRESETS[a.preset])
    a.seeds = a.seeds or ("0" if a.quick else "0,1,2,3,4")
    a.steps = (10 if a.quick else 300) if a.steps is None else a.steps
    a.skip_steps = (2 if a.quick else 10) if a.skip_steps is None else a.skip_steps
    if a.steps < 1 or a.threads < 1 or a.skip_steps < 0 or bool(a.model) != bool(a.dataset):
        p.error("--steps and --threads must be at least 1, --skip-steps at least 0; --model needs --dataset")
    how = ("create it with `python3 -m venv .trl-venv && .trl-venv/bin/pip install -r "
           "benchmarks/trl_requirements.txt` or pass --trl-python PATH")
    if not os.access(a.trl_python, os.X_OK) or subprocess.run(
            [a.trl_python, "-c", "import trl, accelerate, datasets"], capture_output=True).returncode:
        p.error(f"{a.trl_python} is no Python with trl, accelerate and datasets: {how}")
    return compare(a)


if __name__ == "__main__":
    sys.exit(main())
