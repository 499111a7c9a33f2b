"""memory.py — peak resident memory of the --model path on one CPU process, against micro-batch size and completion
length, beside the memory ledger's prediction.

The target (issue "Bounded memory"): a Qwen2-shaped model with the real 151,936-row vocabulary, 64 sequences × 256 new
tokens, one CPU process, --micro-batch-size 4: peak resident memory ≤ 4 GB for both algorithms.

Each configuration is the real trainer, one process, started the way a user starts it:

    OMP_NUM_THREADS=1 /usr/bin/time -v python train.py --algo ALGO --model DIR --dataset FILE.jsonl --chat-template \\
        --steps 1 --prompts-per-step 8 --group-size 8 --max-new-tokens T --micro-batch-size M --eval-size 0 \\
        --export false --plot false --out OUT --beta 0.04

Three readings of the peak, which must agree:
  rss_metrics   `host_peak_rss_gib` of the step's metrics row (ru_maxrss of the trainer, read inside it after the step)
  rss_time      /usr/bin/time -v "Maximum resident set size" (the kernel's high-water mark, read from outside, after the
                process exits: also counts the final checkpoint save)
  rss_polled    the largest VmRSS seen by polling /proc/PID/status every 20 ms from outside (a lower bound)

The ledger's prediction beside them (bytes, fp32 on CPU; every formula is written in `predict` below):
  state       memory_ledger.per_rank_bytes_exact(shapes, world_size=1, rank=0, accounting="fp32"): 16 B/param + 4 B per
              tensor for each trained model (policy; + critic for PPO)
  frozen      4 B/param: the reference policy's fp32 weights (β = 0.04 loads it; fp32 on CPU)
  activations memory_ledger.activation_bytes_estimate(seq_len=P+T, batch=M, hidden=64, heads=4, n_layers=2) per trained
              model in one micro-batch (policy; + critic for PPO)
  logits      M × T × V × 4: the fp32 logits of one micro-batch that logprobs.TokenLogprobs keeps for backward
  ledger      state + frozen + activations + logits
What the ledger leaves out (see benchmarks/README.md, "Memory of the --model path"): the Python/torch/transformers
process itself (`baseline`, measured here by importing what train.py imports), the logits' gradient that
TokenLogprobs.backward allocates (another M × T × V × 4), its fp32 chunk scratch, the tokenizer, the KV cache.

Run manual
----------
    python benchmarks/memory.py                    # the whole grid, ≈ 15 min on 2 shared CPU cores
    python benchmarks/memory.py --only grpo:4:256  # some configurations (algo:micro:T, comma-separated)
Outputs: benchmarks/results/memory.json, benchmarks/results/memory.png.
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import memory_ledger  # noqa: E402

GIB = 2**30
TARGET_GB = 4.0  # the target, decimal: 4e9 bytes
HIDDEN, HEADS, LAYERS = 64, 4, 2  # tests/real_models.py save_qwen2's defaults
PROMPTS, GROUP = 8, 8  # 64 sequences per step
MICROS, T_FULL = (1, 2, 4, 8), 256
LENGTHS, M_TARGET = (64, 128, 256), 4
NO_MICRO_LIMIT_GB = 16.0  # the baseline without micro-batching runs only if the ledger predicts less than this


def grid() -> list[tuple[str, int, int]]:
    """(algo, micro-batch, T): the target first (it sizes the rest), then micro-batch at T=256, then T at micro 4."""
    out = []
    for algo in ("grpo", "ppo"):
        for cfg in [(algo, M_TARGET, T_FULL)] + [(algo, m, T_FULL) for m in MICROS] + [(algo, M_TARGET, t) for t in LENGTHS]:
            if cfg not in out:
                out.append(cfg)
    return out + [("grpo", PROMPTS * GROUP, T_FULL)]  # no micro-batching: the whole minibatch of 64 per forward (if it fits)


def build(work: str) -> tuple[str, str]:
    """The Qwen2-shaped model (real vocabulary) and an arithmetic dataset, built offline once per work directory.
    max_positions=1024: save_qwen2's default context of 256 is shorter than a ~20-token prompt + 256 new tokens, which
    train.py refuses before loading anything."""
    from real_models import save_qwen2, write_arithmetic_jsonl

    model, data = os.path.join(work, "qwen2_v151936"), os.path.join(work, "arith.jsonl")
    if not os.path.isfile(os.path.join(model, "config.json")):
        save_qwen2(model, max_positions=1024)
    if not os.path.isfile(data):
        write_arithmetic_jsonl(data, 256)
    return model, data


def model_facts(model_dir: str, data: str) -> dict:
    """Parameter shapes of the policy and the critic (on the meta device, as train.py builds them), the vocabulary,
    whether the tokenizer has a chat template, and P: the longest prompt in tokens (left-padded to it in every step)."""
    import torch
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        policy = transformers.AutoModelForCausalLM.from_config(cfg)
        critic = transformers.AutoModelForTokenClassification.from_config(
            transformers.AutoConfig.from_pretrained(model_dir, num_labels=1))
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    chat = bool(tok.chat_template)
    questions = [json.loads(line)["question"] for line in open(data)]
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             if chat else q for q in questions]
    P = max(len(ids) for ids in tok(texts, add_special_tokens=not chat)["input_ids"])
    return {"policy_shapes": [tuple(p.shape) for p in policy.parameters()],  # tied embedding counted once
            "critic_shapes": [tuple(p.shape) for p in critic.parameters()], "vocab": cfg.vocab_size, "chat_template": chat,
            "P": P, "n_policy": sum(p.numel() for p in policy.parameters()), "n_critic": sum(p.numel() for p in critic.parameters())}


def predict(facts: dict, algo: str, micro: int, T: int) -> dict:
    """The ledger's bytes for one configuration (fp32 on CPU, one rank)."""
    M = micro  # 64 = the whole minibatch per forward (no micro-batching)
    S = facts["P"] + T
    trained = [facts["policy_shapes"]] + ([facts["critic_shapes"]] if algo == "ppo" else [])
    # parameters + gradients + AdamW m, v (fp32: 4 + 4 + 4 + 4 B/param) + one 4-byte `step` per tensor, each trained model
    state = sum(memory_ledger.per_rank_bytes_exact(shapes=s, world_size=1, rank=0, accounting="fp32")["total"] for s in trained)
    # the frozen reference: fp32 weights only, 4 B/param (train.py's compute dtype on CPU is fp32)
    frozen = 4 * facts["n_policy"]
    # activations kept for backward by each trained transformer over one micro-batch of M sequences of S = P + T positions
    # (Korthikanti et al. 2022: L·(34·S·M·h + 5·a·S²·M) bytes; written for 16-bit activations, so a low estimate at fp32)
    activations = len(trained) * memory_ledger.activation_bytes_estimate(seq_len=S, batch=M, hidden=HIDDEN, heads=HEADS, n_layers=LAYERS)
    # the fp32 logits of the T completion positions of one micro-batch that logprobs.TokenLogprobs saves for backward
    logits = M * T * facts["vocab"] * 4
    return {"M_effective": M, "S": S, "state": state, "frozen": frozen, "activations": activations, "logits": logits,
            "ledger": state + frozen + activations + logits,
            # not in the ledger: TokenLogprobs.backward's gradient of those logits, the same size, alive beside them
            "logits_grad": logits}


def poll_rss(pid_box: list, peak: list, stop: threading.Event) -> None:
    """Largest VmRSS (kB) of the trainer, polled from outside: the child of /usr/bin/time (and its own children)."""
    while not stop.is_set():
        total = 0
        try:
            time_pid = pid_box[0]
            kids = open(f"/proc/{time_pid}/task/{time_pid}/children").read().split()
            for pid in kids:
                m = re.search(r"VmRSS:\s+(\d+) kB", open(f"/proc/{pid}/status").read())
                total += int(m.group(1)) if m else 0
        except (OSError, IndexError):
            pass
        peak[0] = max(peak[0], total)
        stop.wait(0.02)


def shown_command(cmd: list, work: str) -> str:
    """The command as a reader can retype it: repository paths relative, the scratch folder written as WORK."""
    shown = [os.path.relpath(c, REPO) if c.startswith(str(REPO)) else c.replace(work, "WORK") for c in cmd]
    return " ".join(["OMP_NUM_THREADS=1", "python"] + shown[1:])


def run_one(algo: str, micro: int, T: int, model: str, data: str, facts: dict, work: str, log) -> dict:
    out = os.path.join(work, f"run_{algo}_m{micro}_t{T}")
    cmd = [sys.executable, str(REPO / "train.py"), "--algo", algo, "--model", model, "--dataset", data, "--steps", "1",
           "--prompts-per-step", str(PROMPTS), "--group-size", str(GROUP), "--max-new-tokens", str(T),
           "--micro-batch-size", str(micro), "--eval-size", "0", "--export", "false", "--plot", "false", "--out", out,
           "--beta", "0.04"] + (["--chat-template"] if facts["chat_template"] else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-v"] + cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, stop = [0], threading.Event()
    poller = threading.Thread(target=poll_rss, args=([proc.pid], peak, stop), daemon=True)
    poller.start()
    stdout, stderr = proc.communicate()
    stop.set()
    poller.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{algo} micro {micro} T {T} failed (exit {proc.returncode}):\n{stdout[-2000:]}\n{stderr[-3000:]}")
    max_rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1))
    row = next(json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if json.loads(line).get("step") == 1)
    res = {"algo": algo, "micro": micro, "T": T, "P": facts["P"], "B": PROMPTS * GROUP, "wall_s": wall,
           "rss_metrics_gib": row["host_peak_rss_gib"], "rss_time_gib": max_rss_kb * 1024 / GIB,
           "rss_polled_gib": peak[0] * 1024 / GIB, "completion_len_mean": row["completion_len_mean"],
           "step_time_s": row["step_time_s"], "phase_s": {k: v for k, v in row.items() if k.startswith("time_")},
           "command": shown_command(cmd, work)}
    res |= {f"pred_{k}": v for k, v in predict(facts, algo, micro, T).items()}
    res["peak_gb"] = max(res["rss_metrics_gib"], res["rss_time_gib"]) * GIB / 1e9
    res["meets_target"] = res["peak_gb"] <= TARGET_GB
    log(f"  {algo:4s} micro {micro:2d} T {T:3d}: peak {res['rss_time_gib']:.2f} GiB (/usr/bin/time), "
        f"{res['rss_metrics_gib']:.2f} (metrics), {res['rss_polled_gib']:.2f} (polled); ledger {res['pred_ledger'] / GIB:.2f} GiB; "
        f"completion_len_mean {res['completion_len_mean']:.1f}; {wall:.0f} s", flush=True)
    return res


def baseline_rss(log) -> float:
    """Peak RSS (GiB) of a process that imports what train.py imports and nothing more: the floor under every row."""
    code = "import sys; sys.path.insert(0, '.'); import train, models, transformers, datasets, torch.distributed.checkpoint"
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024 / GIB
    log(f"baseline (imports only): {rss:.2f} GiB", flush=True)
    return rss


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0],
            "date": datetime.date.today().isoformat(), "loadavg_start": os.getloadavg()}


COLUMNS = [("algo", "algo"), ("micro", "micro"), ("T", "T"), ("completion_len_mean", "completion len"),
           ("rss_time_gib", "peak RSS GiB (time -v)"), ("rss_metrics_gib", "peak GiB (metrics)"), ("rss_polled_gib", "polled GiB"),
           ("state_mib", "state MiB"), ("frozen_mib", "frozen MiB"), ("act_mib", "activations MiB"),
           ("logits_mib", "logits MiB"), ("ledger_gib", "ledger GiB"), ("peak_gb", "peak GB"), ("meets_target", "≤ 4 GB")]


def table_rows(rows: list[dict]) -> list[dict]:
    return [r | {"state_mib": r["pred_state"] / 2**20, "frozen_mib": r["pred_frozen"] / 2**20, "act_mib": r["pred_activations"] / 2**20,
                 "logits_mib": r["pred_logits"] / 2**20, "ledger_gib": r["pred_ledger"] / GIB} for r in rows if "rss_time_gib" in r]


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if "rss_time_gib" in r]
    target_gib = TARGET_GB * 1e9 / GIB
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, fixed, xs_name in ((axes[0], "micro", ("T", T_FULL), "micro-batch size (sequences per forward)"),
                                    (axes[1], "T", ("micro", M_TARGET), "completion length T (tokens)")):
        for i, algo in enumerate(("grpo", "ppo")):
            sel = sorted((r for r in rows if r["algo"] == algo and r[fixed[0]] == fixed[1] and r["micro"] < PROMPTS * GROUP), key=lambda r: r[key])
            if not sel:
                continue
            xs = [r[key] for r in sel]
            ax.plot(xs, [r["rss_time_gib"] for r in sel], "o-", color=f"C{i}", label=f"{algo}: measured peak RSS")
            ax.plot(xs, [r["pred_ledger"] / GIB for r in sel], "s--", color=f"C{i}", alpha=0.6, label=f"{algo}: ledger")
            ax.plot(xs, [(r["pred_ledger"] + r["pred_logits_grad"]) / GIB + res["baseline_rss_gib"] for r in sel], ":",
                    color=f"C{i}", alpha=0.6, label=f"{algo}: ledger + logits grad + process baseline")
            part = sorted((r for r in res["rows"] if "incomplete" in r and r["algo"] == algo and r[fixed[0]] == fixed[1]), key=lambda r: r[key])
            if part:  # a run stopped before its end: the VmHWM it had reached, a lower bound of its peak
                ax.plot([r[key] for r in part], [r["rss_hwm_lower_bound_gib"] for r in part], "^", color=f"C{i}", mfc="none",
                        ms=9, label=f"{algo}: peak so far, run stopped (lower bound)")
        ax.axhline(target_gib, color="red", lw=1, label="target 4 GB (3.73 GiB)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(MICROS if key == "micro" else LENGTHS, [str(x) for x in (MICROS if key == "micro" else LENGTHS)])
        ax.minorticks_off()
        ax.set_xlabel(xs_name)
        ax.set_ylabel("GiB")
        ax.set_ylim(bottom=0)
        ax.set_title(f"peak memory vs {key} ({fixed[0]} = {fixed[1]}), 64 seqs, V = 151,936")
        ax.legend(fontsize=7)
    for r in res["rows"]:
        if "skipped" in r:  # the run without micro-batching, not run: its prediction as text
            axes[0].text(0.02, 0.97, f"{r['algo']}, no micro-batching (64 per forward), T={r['T']}: not run,\n{r['skipped']}",
                         transform=axes[0].transAxes, fontsize=7, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save(path: str, res: dict, rows: list[dict]) -> None:
    """Write res with `rows` merged into the file's rows by (algo, micro, T): runs in parallel, or an earlier invocation
    with --merge, keep what they measured."""
    old = json.load(open(path))["rows"] if os.path.exists(path) else []
    keys = {(r["algo"], r["micro"], r["T"]) for r in rows}
    res["rows"] = sorted([r for r in old if (r["algo"], r["micro"], r["T"]) not in keys] + rows,
                         key=lambda r: (r["algo"] != "grpo", r["T"], r["micro"]))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, path)


def report(res: dict, out: str) -> None:
    from benchmarks.common import table

    print("\n" + table(table_rows(res["rows"]), COLUMNS))
    for r in res["rows"]:
        if "skipped" in r:
            print(f"{r['algo']} micro {r['micro']} T {r['T']}: skipped, {r['skipped']}")
        if "incomplete" in r:
            print(f"{r['algo']} micro {r['micro']} T {r['T']}: peak so far ≥ {r['rss_hwm_lower_bound_gib']:.2f} GiB "
                  f"(ledger {r['pred_ledger'] / GIB:.2f} GiB); {r['incomplete']}")
    plot(res, os.path.join(out, "memory.png"))


def main(argv=None) -> int:
    from concurrent.futures import ThreadPoolExecutor

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help="comma list of algo:micro:T (e.g. grpo:4:256); default: the whole grid")
    p.add_argument("--work", default="", help="scratch directory for the model, dataset and runs (default: a temporary one)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--jobs", type=int, default=1, help="configurations run at once, each its own one-thread process "
                   "(peak RSS is per process, so they do not disturb each other's reading; only the wall time)")
    p.add_argument("--merge", action="store_true", help="keep the rows of an existing memory.json that are not re-run")
    p.add_argument("--report-only", action="store_true", help="print the table and draw the plot from memory.json")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "memory.json")
    if a.report_only:
        report(json.load(open(path)), a.out)
        return 0
    if not a.merge and os.path.exists(path):
        os.remove(path)
    configs = [(x.split(":")[0], int(x.split(":")[1]), int(x.split(":")[2])) for x in a.only.split(",") if x] or grid()
    work = a.work or tempfile.mkdtemp(prefix="memory_bench_")
    res = {"meta": machine() | {"command": "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])}}
    model, data = build(work)
    facts = model_facts(model, data)
    print(f"model: Qwen2 h={HIDDEN}, {LAYERS} layers, V={facts['vocab']:,}, policy {facts['n_policy']:,} params, "
          f"critic {facts['n_critic']:,}; P = {facts['P']} prompt tokens; chat template: {facts['chat_template']}", flush=True)
    res["model"] = {k: facts[k] for k in ("vocab", "n_policy", "n_critic", "P", "chat_template")} | {"hidden": HIDDEN, "layers": LAYERS, "heads": HEADS}
    res["baseline_rss_gib"] = baseline_rss(print)
    lock, done = threading.Lock(), []

    def one(cfg):
        algo, micro, T = cfg
        pred = predict(facts, algo, micro, T)
        # the run without micro-batching only when it fits the machine: ledger + the logits' gradient
        if micro == PROMPTS * GROUP and (pred["ledger"] + pred["logits_grad"]) / 1e9 > NO_MICRO_LIMIT_GB:
            row = {"algo": algo, "micro": micro, "T": T, "skipped": f"predicted {(pred['ledger'] + pred['logits_grad']) / 1e9:.1f} GB "
                   f"(ledger {pred['ledger'] / 1e9:.1f} GB + logits gradient {pred['logits_grad'] / 1e9:.1f} GB) > {NO_MICRO_LIMIT_GB:.0f} GB"}
            row |= {f"pred_{k}": v for k, v in pred.items()}
            print(f"  {algo} micro {micro} T {T}: skipped, {row['skipped']}", flush=True)
        else:
            try:
                row = run_one(algo, micro, T, model, data, facts, work, print)
            except Exception as e:  # keep the other configurations
                print(f"  {algo} micro {micro} T {T}: FAILED {e}", flush=True)
                return
        with lock:  # after every configuration: a partial grid is kept
            done.append(row)
            save(path, res, done)

    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        list(pool.map(one, configs))
    res["meta"] |= {"runtime_s": time.perf_counter() - t0, "loadavg_end": os.getloadavg()}
    save(path, res, done)
    report(json.load(open(path)), a.out)
    print(f"\nwrote {path} and memory.png ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
