"""bench.py — the benchmark suite: ledger vs measured bytes, PPO vs GRPO, throughput and MFU, GAE, optional TRL.

Run manual (benchmarks/README.md explains every column)
----------
Everything, one command (1 process; it launches the 2-rank ledger part itself through torch.distributed.run):
    python benchmarks/bench.py                      # 5-7 min on 2 shared CPU cores; --quick: tiny sizes, < 1 min
Only some parts, other sizes:
    python benchmarks/bench.py --part ledger,gae --sizes tiny,S,M
The ledger part on N ranks by hand (gloo on CPU, NCCL + bf16 mixed precision on GPUs):
    torchrun --nproc_per_node 2 benchmarks/bench.py --part ledger
Outputs in --out (default benchmarks/results): results.json (results_wN.json under torchrun), and bench.png when
matplotlib is installed.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for key, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
    os.environ.setdefault(key, value)  # before transformers is imported: no progress bars

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import distributed  # noqa: E402
from benchmarks import common, gae_part, ledger_part, rl_part, trl_part  # noqa: E402

PARTS = ("ledger", "rl", "gae", "trl")
# prompts × G sequences of P prompt + T completion tokens; `minibatches` optimizer steps per epoch; one warm-up step
# under the memory counter, then `steps` timed ones (fastest per phase)
FULL = dict(sizes="tiny,S,M,L", rl_sizes="S,M", gae_T=[256, 512, 1024, 2048, 4096, 8192], gae_B=[16, 256], repeats=3,
            rl=dict(prompts=8, group_size=4, P=16, T=32, epochs=1, minibatches=2, steps=4))
QUICK = dict(sizes="tiny", rl_sizes="tiny", gae_T=[256, 512], gae_B=[4], repeats=1,
             rl=dict(prompts=2, group_size=2, P=6, T=4, epochs=1, minibatches=1, steps=1))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", default="all", help=f"comma list of {', '.join(PARTS)}, or all")
    p.add_argument("--quick", action="store_true", help="tiny sizes and lengths (what tests/test_benchmarks.py runs)")
    p.add_argument("--sizes", default=None, help=f"ledger model sizes, from {', '.join(common.SIZES)}")
    p.add_argument("--rl-sizes", default=None, help="PPO-vs-GRPO model sizes")
    p.add_argument("--ranks", default="1,2", help="world sizes of the ledger part: 1 runs in this process, "
                   "each larger one in a child torch.distributed.run")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the 1-process parts: 1 as torchrun's ranks "
                   "get (OMP_NUM_THREADS=1); on a shared CPU more threads stall on each other. 0 = torch's default")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder of results.json and bench.png")
    a = p.parse_args(argv)
    a.parts = PARTS if a.part == "all" else tuple(a.part.split(","))
    preset = QUICK if a.quick else FULL
    a.sizes, a.rl_sizes = (a.sizes or preset["sizes"]).split(","), (a.rl_sizes or preset["rl_sizes"]).split(",")
    a.preset = preset
    unknown = [s for s in a.sizes + a.rl_sizes if s not in common.SIZES] + [x for x in a.parts if x not in PARTS]
    if unknown:
        p.error(f"unknown size or part: {', '.join(unknown)}")
    return a


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ledger(world: int, sizes: list[str]) -> list[dict]:
    """Run the ledger part on `world` ranks in a child torch.distributed.run; return its rows."""
    with tempfile.TemporaryDirectory() as child_out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), __file__, "--part", "ledger", "--sizes", ",".join(sizes),
               "--out", child_out]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world)), "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{world}-rank ledger run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.load(open(os.path.join(child_out, f"results_w{world}.json")))["ledger"]


def run_parts(a, rank: int, world: int, device, log) -> dict:
    command = " ".join([os.path.basename(sys.executable)] + sys.argv)
    res: dict = {"meta": common.machine() | {"torch_threads": torch.get_num_threads(), "command": command,
                                             "world": world, "device": device.type, "quick": a.quick}}
    part_s = res["meta"]["part_s"] = {}  # wall seconds per part
    t = time.perf_counter()
    if "ledger" in a.parts:
        log("ledger vs measured ...", flush=True)
        mixed = device.type == "cuda"
        rows = ledger_part.run(a.sizes, rank, world, device, mixed, log)
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        res["ledger"] = [r for rank_rows in gathered for r in rank_rows]
        part_s[f"ledger_w{world}"] = time.perf_counter() - t
        if world == 1:  # the launcher: also the multi-rank runs, in children
            for w in (int(x) for x in a.ranks.split(",") if int(x) > 1):
                t = time.perf_counter()
                res["ledger"] += launch_ledger(w, a.sizes)
                part_s[f"ledger_w{w}"] = time.perf_counter() - t
    if world > 1:  # under torchrun only the ledger part runs (the others compare one process with itself)
        return res
    t = time.perf_counter()
    if "rl" in a.parts:
        res["matmul_peak"] = common.matmul_peak_flops(device, n=512 if a.quick else 2048)
        log(f"matmul peak: {res['matmul_peak']['flops_per_s'] / 1e9:.1f} GFLOP/s ({res['matmul_peak']['dtype']}, "
            f"{res['matmul_peak']['threads']} threads)", flush=True)
        res["rl"], res["claims"] = [], []
        with tempfile.TemporaryDirectory() as work:
            for size in a.rl_sizes:
                log(f"grpo and ppo on size {size} ...", flush=True)
                grpo_row, ppo_row = rl_part.compare(size, a.preset["rl"], rank, world, device, work, log)
                res["rl"] += [grpo_row, ppo_row]
                res["claims"] += rl_part.claims(ppo_row, grpo_row)
            peaks = [res["matmul_peak"]] + [{"flops_per_s": r["matmul_peak_flops_per_s"]} for r in res["rl"]]
            res["matmul_peak"]["best_flops_per_s"] = rl_part.add_mfu(res["rl"], peaks)
            if "trl" in a.parts:
                res["trl"] = run_trl(a, work, res["rl"], log)
    elif "trl" in a.parts:
        res["trl"] = [{"skipped": "the trl part compares with the rl part: run both"}]
    part_s["rl_trl"], t = time.perf_counter() - t, time.perf_counter()
    if "gae" in a.parts:
        log("gae ...", flush=True)
        res["gae"] = [r for B in a.preset["gae_B"]
                      for r in gae_part.run(a.preset["gae_T"], B, a.preset["repeats"], log=log)]
    part_s["gae"] = time.perf_counter() - t
    return res


def run_trl(a, work: str, rl_rows: list[dict], log) -> list[dict]:
    if not trl_part.available():
        return [{"skipped": "trl is not installed (optional: pip install trl)"}]
    rows = []
    for size in a.rl_sizes:
        log(f"trl GRPOTrainer on size {size} ...", flush=True)
        try:
            row = trl_part.bench(size, a.preset["rl"], work)
        except Exception as e:  # an API change in TRL must not lose the rest of the results
            row = {"size": size, "skipped": f"{type(e).__name__}: {str(e)[:300]}"}
        ours = next(r for r in rl_rows if r["size"] == size and r["algo"] == "grpo")
        rows.append(row | {"ours_grpo_t_step": ours["t_step"],
                           "ours_grpo_t_step_without_reward": ours["t_step"] - ours["t_reward"]})
    return rows


def report(res: dict) -> str:
    m = res["meta"]
    out = [f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}; load average (1 min) "
           f"{m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end (other users share this CPU)"]
    if "ledger" in res:
        title = "Ledger vs measured: parameters + gradients + AdamW state per rank, bytes (after one optimizer step)"
        out += ["", title, common.table(res["ledger"], ledger_part.COLUMNS)]
    if "matmul_peak" in res:
        mp = res["matmul_peak"]
        out += ["", (f"Matmul peak: {mp['best_flops_per_s'] / 1e9:.1f} GFLOP/s, the best of this run's measurements "
                     f"({mp['n']}³ {mp['dtype']}, {mp['threads']} threads; at start {mp['flops_per_s'] / 1e9:.1f}); "
                     "MFU is taken against it")]
    if res.get("rl"):
        shown = [r | {"state_mib": common.mib(r["state_bytes"]), "peak_mib": common.mib(r["peak_bytes"]),
                      "state_ledger_mib": common.mib(r["state_bytes_ledger"]), "update_gflops": r["update_flops"] / 1e9,
                      "mfu_pct": 100 * r["mfu"], "matmul_gflops": r["matmul_peak_flops_per_s"] / 1e9}
                 for r in res["rl"]]
        out += ["", ("PPO vs GRPO: seconds per phase of one RL step (fastest timed step), bytes, throughput "
                     "(completion tokens)"), common.table(shown, rl_part.COLUMNS), "",
                "The documents' claims as PPO/GRPO ratios, beside the ledger's arithmetic and the measurement",
                common.table(res["claims"], rl_part.CLAIM_COLUMNS)]
    if res.get("gae"):
        out += ["", "GAE: gae.compute_gae (padded batch) vs a naive per-sequence loop (best of repeats)",
                common.table(res["gae"], gae_part.COLUMNS)]
    if res.get("trl"):
        out += ["", "TRL GRPOTrainer, same GRPO configuration"]
        ran = [r for r in res["trl"] if "skipped" not in r]
        out += [common.table(ran, trl_part.COLUMNS)] if ran else []
        out += [f"skipped: {r['skipped']}" for r in res["trl"] if "skipped" in r]
    return "\n".join(out)


def plot(res: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for r in res.get("rl", []):
        bottom = 0.0
        for i, ph in enumerate(rl_part.PHASES):
            axes[0].bar(f"{r['size']} {r['algo']}", r[f"t_{ph}"], bottom=bottom, color=f"C{i}",
                        label=ph if r is res["rl"][0] else None)
            bottom += r[f"t_{ph}"]
    axes[0].set_ylabel("seconds per RL step (fastest timed step)")
    if res.get("rl"):
        axes[0].legend(fontsize=7)
    for B in sorted({r["B"] for r in res.get("gae", [])}):
        rows = [r for r in res["gae"] if r["B"] == B]
        axes[1].loglog([r["T"] for r in rows], [r["t_vectorised_ms"] for r in rows], "o-", label=f"compute_gae, B={B}")
        axes[1].loglog([r["T"] for r in rows], [r["t_naive_ms"] for r in rows], "s--", label=f"naive loop, B={B}")
    axes[1].set_xlabel("T")
    axes[1].set_ylabel("ms (best of repeats)")
    if res.get("gae"):
        Ts = sorted({r["T"] for r in res["gae"]})
        axes[1].set_xticks(Ts, [str(t) for t in Ts])
        axes[1].minorticks_off()
        axes[1].legend(fontsize=7)
    # memory vs model size: the ledger's prediction (line) against the measured bytes (points), rank 0
    for world in sorted({r["world"] for r in res.get("ledger", [])}):
        rows = sorted((r for r in res["ledger"] if r["world"] == world and r["rank"] == 0), key=lambda r: r["n_params"])
        axes[2].loglog([r["n_params"] for r in rows], [r["ledger_exact"] for r in rows], "-", color=f"C{world}",
                       label=f"ledger, {world} rank(s)")
        axes[2].loglog([r["n_params"] for r in rows], [r["tensors"] for r in rows], "o", color=f"C{world}",
                       label=f"measured, {world} rank(s)")
    axes[2].set_xlabel("parameters")
    axes[2].set_ylabel("params + grads + AdamW bytes on rank 0")
    if res.get("ledger"):
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    a = parse(argv)
    t0 = time.perf_counter()
    if a.threads:
        torch.set_num_threads(a.threads)
    rank, world, device = distributed.setup_distributed()
    log = print if rank == 0 else (lambda *x, **k: None)
    os.makedirs(a.out, exist_ok=True)
    res = run_parts(a, rank, world, device, log)
    res["meta"] |= {"runtime_s": time.perf_counter() - t0, "loadavg_end": os.getloadavg()}  # 1/5/15 min: others' load
    if rank == 0:
        print("\n" + report(res), flush=True)
        path = os.path.join(a.out, "results.json" if world == 1 else f"results_w{world}.json")  # torchrun: ledger only
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        if world == 1 and ("rl" in res or "gae" in res or "ledger" in res):
            plot(res, os.path.join(a.out, "bench.png"))
        print(f"\nwrote {path} ({res['meta']['runtime_s']:.0f} s)", flush=True)
    dist.barrier()  # leave together: a gloo rank torn down while another still writes can abort ("terminate called")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
