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

Beside them the ledger's prediction, state + frozen + activations + logits (fp32 on CPU), each term written in
`predict` below. What it leaves out (benchmarks/README.md, "Memory of the --model path"): the process itself
(`baseline`, measured here by importing what train.py imports), the logits' gradient that TokenLogprobs.backward
allocates (another M × T × V × 4 B), its fp32 chunk scratch, the tokenizer, the KV cache.

    python benchmarks/memory.py                    # the whole grid, ≈ 15 min on 2 shared CPU cores
    python benchmarks/memory.py --only grpo:4:256  # some configurations (algo:micro:T, comma-separated)

Outputs: benchmarks/results/memory.json, benchmarks/results/memory.png.
"""
import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import memory_ledger  # noqa: E402
from benchmarks.common import machine, run_measuring_rss, table  # noqa: E402

GIB = 2**30
TARGET_GB = 4.0  # the target, decimal: 4e9 bytes
HIDDEN, HEADS, LAYERS = 64, 4, 2  # tests/real_models.py save_qwen2's defaults
PROMPTS, GROUP = 8, 8  # 64 sequences per step
MICROS, T_FULL = (1, 2, 4, 8), 256
LENGTHS, M_TARGET = (64, 128, 256), 4
NO_MICRO_LIMIT_GB = 16.0  # the baseline without micro-batching runs only if the ledger predicts less than this
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def grid() -> list[tuple[str, int, int]]:
    """(algo, micro-batch, T): the target first (it sizes the rest), then micro-batch at T=256, then T at micro 4,
    and last GRPO without micro-batching (the whole minibatch of 64 per forward), if it fits."""
    out = []
    for algo in ("grpo", "ppo"):
        target = [(algo, M_TARGET, T_FULL)]
        for cfg in target + [(algo, m, T_FULL) for m in MICROS] + [(algo, M_TARGET, t) for t in LENGTHS]:
            if cfg not in out:
                out.append(cfg)
    return out + [("grpo", PROMPTS * GROUP, T_FULL)]


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
    return {"policy_shapes": [tuple(p.shape) for p in policy.parameters()],  # tied embedding counted once
            "critic_shapes": [tuple(p.shape) for p in critic.parameters()], "vocab": cfg.vocab_size,
            "chat_template": chat, "P": max(len(ids) for ids in tok(texts, add_special_tokens=not chat)["input_ids"]),
            "n_policy": sum(p.numel() for p in policy.parameters()),
            "n_critic": sum(p.numel() for p in critic.parameters())}


def predict(facts: dict, algo: str, micro: int, T: int) -> dict:
    """The ledger's bytes for one configuration (fp32 on CPU, one rank)."""
    M, S = micro, facts["P"] + T  # M = 64: the whole minibatch per forward (no micro-batching)
    trained = [facts["policy_shapes"]] + ([facts["critic_shapes"]] if algo == "ppo" else [])
    # parameters + gradients + AdamW m, v (fp32: 4 + 4 + 4 + 4 B/param) + a 4-byte `step` per tensor, per trained model
    state = sum(memory_ledger.per_rank_bytes_exact(shapes=s, world_size=1, rank=0, accounting="fp32")["total"]
                for s in trained)
    # the frozen reference: fp32 weights only, 4 B/param (train.py's compute dtype on CPU is fp32)
    frozen = 4 * facts["n_policy"]
    # activations kept for backward by each trained transformer over one micro-batch of M sequences of S = P + T
    # positions (Korthikanti et al. 2022: L·(34·S·M·h + 5·a·S²·M) bytes; for 16-bit activations: low at fp32)
    activations = len(trained) * memory_ledger.activation_bytes_estimate(seq_len=S, batch=M, hidden=HIDDEN,
                                                                         heads=HEADS, n_layers=LAYERS)
    # the fp32 logits of the T completion positions of one micro-batch that logprobs.TokenLogprobs saves for backward
    logits = M * T * facts["vocab"] * 4
    return {"M_effective": M, "S": S, "state": state, "frozen": frozen, "activations": activations, "logits": logits,
            "ledger": state + frozen + activations + logits,
            # not in the ledger: TokenLogprobs.backward's gradient of those logits, the same size, alive beside them
            "logits_grad": logits}


def run_one(algo: str, micro: int, T: int, paths: tuple[str, str, str], facts: dict) -> dict:
    """One configuration under /usr/bin/time -v, polled from outside; paths = (model, data, work)."""
    model, data, work = paths
    out = os.path.join(work, f"run_{algo}_m{micro}_t{T}")
    cmd = [sys.executable, str(REPO / "train.py"), "--algo", algo, "--model", model, "--dataset", data, "--steps", "1",
           "--prompts-per-step", str(PROMPTS), "--group-size", str(GROUP), "--max-new-tokens", str(T),
           "--micro-batch-size", str(micro), "--eval-size", "0", "--export", "false", "--plot", "false", "--out", out,
           "--beta", "0.04"] + (["--chat-template"] if facts["chat_template"] else [])
    run = run_measuring_rss(cmd, env=ENV, cwd=REPO)
    if run["returncode"] != 0:
        raise RuntimeError(f"{algo} micro {micro} T {T} failed (exit {run['returncode']}):\n{run['stdout'][-2000:]}\n"
                           f"{run['stderr'][-3000:]}")
    row = next(r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r.get("step") == 1)
    # the command as a reader can retype it: repository paths relative, the scratch folder written as WORK
    shown = [os.path.relpath(c, REPO) if c.startswith(str(REPO)) else c.replace(work, "WORK") for c in cmd[1:]]
    res = {"algo": algo, "micro": micro, "T": T, "P": facts["P"], "B": PROMPTS * GROUP, "wall_s": run["wall_s"],
           "rss_metrics_gib": row["host_peak_rss_gib"], "rss_time_gib": run["rss_time_gib"],
           "rss_polled_gib": run["rss_polled_gib"], "completion_len_mean": row["completion_len_mean"],
           "step_time_s": row["step_time_s"], "phase_s": {k: v for k, v in row.items() if k.startswith("time_")},
           "command": " ".join(["OMP_NUM_THREADS=1", "python"] + shown)}
    res |= {f"pred_{k}": v for k, v in predict(facts, algo, micro, T).items()}
    res["peak_gb"] = max(res["rss_metrics_gib"], res["rss_time_gib"]) * GIB / 1e9
    res["meets_target"] = res["peak_gb"] <= TARGET_GB
    print(f"  {algo:4s} micro {micro:2d} T {T:3d}: peak {res['rss_time_gib']:.2f} GiB (/usr/bin/time), "
          f"{res['rss_metrics_gib']:.2f} (metrics), {res['rss_polled_gib']:.2f} (polled); ledger "
          f"{res['pred_ledger'] / GIB:.2f} GiB; completion_len_mean {res['completion_len_mean']:.1f}; "
          f"{res['wall_s']:.0f} s", flush=True)
    return res


def measure_or_skip(cfg: tuple[str, int, int], paths: tuple[str, str, str], facts: dict) -> dict | None:
    """run_one, except the run without micro-batching when it would not fit the machine (ledger + the logits'
    gradient over NO_MICRO_LIMIT_GB): then a row that says why. None when the run failed."""
    algo, micro, T = cfg
    pred = predict(facts, algo, micro, T)
    need = pred["ledger"] + pred["logits_grad"]
    if micro == PROMPTS * GROUP and need / 1e9 > NO_MICRO_LIMIT_GB:
        why = (f"predicted {need / 1e9:.1f} GB (ledger {pred['ledger'] / 1e9:.1f} GB + logits gradient "
               f"{pred['logits_grad'] / 1e9:.1f} GB) > {NO_MICRO_LIMIT_GB:.0f} GB")
        print(f"  {algo} micro {micro} T {T}: skipped, {why}", flush=True)
        return {"algo": algo, "micro": micro, "T": T, "skipped": why} | {f"pred_{k}": v for k, v in pred.items()}
    try:
        return run_one(algo, micro, T, paths, facts)
    except Exception as e:  # keep the other configurations
        print(f"  {algo} micro {micro} T {T}: FAILED {e}", flush=True)
        return None


def baseline_rss() -> float:
    """Peak RSS (GiB) of a process that imports what train.py imports and nothing more: the floor under every row."""
    code = "import sys; sys.path.insert(0, '.'); import train, transformers, datasets, torch.distributed.checkpoint"
    rss = run_measuring_rss([sys.executable, "-c", code], cwd=REPO, env=ENV)["rss_time_gib"]
    print(f"baseline (imports only): {rss:.2f} GiB", flush=True)
    return rss


COLUMNS = [("algo", "algo"), ("micro", "micro"), ("T", "T"), ("completion_len_mean", "completion len"),
           ("rss_time_gib", "peak RSS GiB (time -v)"), ("rss_metrics_gib", "peak GiB (metrics)"),
           ("rss_polled_gib", "polled GiB"), ("state_mib", "state MiB"), ("frozen_mib", "frozen MiB"),
           ("activations_mib", "activations MiB"), ("logits_mib", "logits MiB"), ("ledger_gib", "ledger GiB"),
           ("peak_gb", "peak GB"), ("meets_target", "≤ 4 GB")]


def plot(res: dict, path: str) -> None:
    """Measured peak, ledger, and ledger + logits' gradient + process baseline, against M (left) and T (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if "rss_time_gib" in r and r["micro"] < PROMPTS * GROUP]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, (fixed, at), ticks, xlabel in (
            (axes[0], "micro", ("T", T_FULL), MICROS, "micro-batch size (sequences per forward)"),
            (axes[1], "T", ("micro", M_TARGET), LENGTHS, "completion length T (tokens)")):
        for i, algo in enumerate(("grpo", "ppo")):
            sel = sorted((r for r in rows if r["algo"] == algo and r[fixed] == at), key=lambda r: r[key])
            if not sel:
                continue
            xs, style = [r[key] for r in sel], dict(color=f"C{i}")
            ax.plot(xs, [r["rss_time_gib"] for r in sel], "o-", label=f"{algo}: measured peak RSS", **style)
            ax.plot(xs, [r["pred_ledger"] / GIB for r in sel], "s--", alpha=0.6, label=f"{algo}: ledger", **style)
            ax.plot(xs, [(r["pred_ledger"] + r["pred_logits_grad"]) / GIB + res["baseline_rss_gib"] for r in sel],
                    ":", alpha=0.6, label=f"{algo}: ledger + logits grad + process baseline", **style)
        ax.axhline(TARGET_GB * 1e9 / GIB, color="red", lw=1, label="target 4 GB (3.73 GiB)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(x) for x in ticks])
        ax.minorticks_off()
        ax.set(xlabel=xlabel, ylabel="GiB", title=f"peak memory vs {key} ({fixed} = {at}), 64 seqs, V = 151,936")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    for r in res["rows"]:
        if "skipped" in r:  # the run without micro-batching, not run: its prediction as text
            axes[0].text(0.02, 0.97, f"{r['algo']}, no micro-batching (64 per forward), T={r['T']}: not run,\n"
                         f"{r['skipped']}", transform=axes[0].transAxes, fontsize=7, va="top")
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
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)


def report(res: dict, out: str) -> None:
    mib = {"state": "state_mib", "frozen": "frozen_mib", "activations": "activations_mib", "logits": "logits_mib"}
    shown = [r | {v: r[f"pred_{k}"] / 2**20 for k, v in mib.items()} | {"ledger_gib": r["pred_ledger"] / GIB}
             for r in res["rows"] if "rss_time_gib" in r]
    print("\n" + table(shown, COLUMNS))
    for r in res["rows"]:
        if "skipped" in r:
            print(f"{r['algo']} micro {r['micro']} T {r['T']}: skipped, {r['skipped']}")
    plot(res, os.path.join(out, "memory.png"))


def main(argv=None) -> int:
    from concurrent.futures import ThreadPoolExecutor

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help="comma list of algo:micro:T (e.g. grpo:4:256); default: the whole grid")
    p.add_argument("--work", default="", help="scratch folder for the model, dataset and runs (default: a new one)")
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
    command = "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    model, data = build(work)
    facts = model_facts(model, data)
    print(f"model: Qwen2 h={HIDDEN}, {LAYERS} layers, V={facts['vocab']:,}, policy {facts['n_policy']:,} params, "
          f"critic {facts['n_critic']:,}; P = {facts['P']} prompt tokens; chat template: {facts['chat_template']}",
          flush=True)
    res = {"meta": machine() | {"command": command},
           "model": {k: facts[k] for k in ("vocab", "n_policy", "n_critic", "P", "chat_template")}
           | {"hidden": HIDDEN, "layers": LAYERS, "heads": HEADS}, "baseline_rss_gib": baseline_rss()}
    lock, done = threading.Lock(), []

    def one(cfg):
        row = measure_or_skip(cfg, (model, data, work), facts)
        with lock:  # after every configuration: a partial grid is kept
            done.extend([row] if row else [])
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
