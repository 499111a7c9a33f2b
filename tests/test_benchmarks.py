"""The benchmark suite kept honest on small sizes: it runs (1 rank and a 2-rank torchrun launched by it), the bytes it
measures equal sums computed here from the parameter shapes alone, its memory counters (CPU peak in-process, a child's
resident memory) count known allocations, both GAE implementations it times agree, the TRL comparison runs train.py
with the settings it reports, and the GPU check runs on CPU. No timing is asserted: the CPU is shared and timings are
noise. (That TRL's GRPOTrainer computes train.py's loss and gradient is tests/test_trl_equivalence.py.)
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import common, gae_part, ledger_part, trl_part  # noqa: E402

ADAM_STEP = 4  # one 0-dim float32 `step` per parameter tensor, on every rank


def local_rows(d0: int, world: int, rank: int) -> int:
    """Rows of a dim-0 shard as torch.chunk gives them (FSDP2's sharding), counted without memory_ledger."""
    chunks = torch.empty(d0, 0).chunk(world)
    return chunks[rank].shape[0] if rank < len(chunks) else 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--quick", "--part", "ledger,rl,gae,trl",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Ledger vs measured" in proc.stdout and "PPO vs GRPO" in proc.stdout and "GAE" in proc.stdout
    return json.loads((out / "results.json").read_text())


def test_ledger_rows_on_1_and_2_ranks_equal_independent_sums(quick):
    rows = quick["ledger"]
    assert sorted((r["world"], r["rank"]) for r in rows) == [(1, 0), (2, 0), (2, 1)]
    for r in rows:
        shapes, W, rank = [tuple(s) for s in r["shapes"]], r["world"], r["rank"]
        numel = sum(local_rows(s[0], W, rank) * math.prod(s[1:]) for s in shapes)
        padded = sum(-(-s[0] // W) * math.prod(s[1:]) for s in shapes)  # ⌈d_0/W⌉ rows allocated per parameter
        # fp32 AdamW: weights, grads, exp_avg, exp_avg_sq at 4 B each + the step scalars
        exact = 16 * numel + ADAM_STEP * len(shapes)
        assert r["tensors"] == r["measure_state_bytes"] == r["ledger_exact"] == exact
        adam = 8 * numel + ADAM_STEP * len(shapes)  # m and v, and the step scalars
        assert r["tensors_by_kind"] == {"params": 4 * numel, "grads": 4 * numel, "optimizer": adam}
        # what the allocator holds: params and grads padded to ⌈d_0/W⌉ rows, AdamW moments unpadded
        assert r["storage_by_kind"] == {"params": 4 * padded, "grads": 4 * padded, "optimizer": adam}
        assert r["storage"] == r["padded"]
    w2 = [r for r in rows if r["world"] == 2]
    n_params = w2[0]["n_params"]
    assert sum(r["tensors_by_kind"]["params"] for r in w2) == 4 * n_params  # the shards add up to the model
    assert w2[0]["tensors"] != w2[1]["tensors"]  # vocab 127 splits 64/63: the uneven case is exercised
    assert w2[1]["storage"] > w2[1]["tensors"]  # ... and rank 1's padding shows


def test_ppo_and_grpo_state_bytes_equal_16_bytes_per_parameter(quick):
    rl = {r["algo"]: r for r in quick["rl"]}
    grpo, ppo = rl["grpo"], rl["ppo"]
    policy = 16 * grpo["n_params"]["policy"] + ADAM_STEP * grpo["n_tensors"]["policy"]
    critic = 16 * ppo["n_params"]["critic"] + ADAM_STEP * ppo["n_tensors"]["critic"]
    assert grpo["state_bytes"] == grpo["state_bytes_ledger"] == policy
    assert ppo["state_bytes"] == ppo["state_bytes_ledger"] == policy + critic
    assert ppo["n_params"]["policy"] == grpo["n_params"]["policy"] and "critic" not in grpo["n_params"]
    for r in (grpo, ppo):
        trained, frozen = sum(r["n_params"].values()), sum(r["n_frozen"].values())
        assert r["live_bytes_at_step_start"] >= 4 * (trained + frozen)  # every model's fp32 parameters
        # gradients and AdamW state are allocated inside the measured step and are all alive after its first update
        assert r["peak_bytes"] >= r["live_bytes_at_step_start"] + r["state_bytes"] - 4 * trained
        assert r["completion_tokens"] > 0 and r["update_flops"] > 0
    assert [c["measured"] for c in quick["claims"]][0] == pytest.approx(ppo["state_bytes"] / grpo["state_bytes"])


def test_trl_part_ran_or_says_why_not(quick):
    rows = quick["trl"]
    if not trl_part.available():
        assert rows == [{"skipped": "trl is not installed (optional: pip install trl)"}]  # the record says why
        pytest.skip("trl not installed")
    # installed: every size ran through GRPOTrainer and was timed (an exception inside it is recorded as "skipped")
    assert [r["size"] for r in rows] == ["tiny"]
    for r in rows:
        assert "skipped" not in r, r["skipped"]
        assert r["steps_timed"] >= 1 and r["t_step"] > 0 and r["ours_grpo_t_step"] > 0


def test_quick_gae_rows_agree(quick):
    assert quick["gae"] and all(r["agree"] for r in quick["gae"])


def test_naive_gae_by_hand_and_against_compute_gae():
    # r = [0, 0, 1], V = 0.5 everywhere, γ = 1, λ = 0.5: δ = [0, 0, 0.5] → A = [0.125, 0.25, 0.5], R = A + V
    adv, ret = gae_part.naive_gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5), [3], gamma=1.0, lam=0.5)
    assert adv.tolist() == [[0.125, 0.25, 0.5]] and ret.tolist() == [[0.625, 0.75, 1.0]]
    rows = gae_part.run([64, 128], B=3, repeats=1, log=lambda *a, **k: None)
    assert all(r["agree"] and r["max_abs_diff"] < 1e-4 for r in rows)
    rewards, values, mask, lengths = gae_part.batch(3, 16, seed=0)
    values = torch.where(mask.bool(), values, torch.full_like(values, 1e6))  # garbage in the padding must not leak
    import gae

    A, _ = gae.compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    A0, _ = gae_part.naive_gae(rewards, values, lengths, 1.0, 0.95)
    torch.testing.assert_close(A, A0)


def test_cpu_peak_counter_counts_known_allocations():
    with common.PeakBytes(torch.device("cpu"), base=1000) as peak:
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(2_000_000)  # 8 MB → 12 MB live
        del a
        c = torch.empty(500_000)  # 2 MB → 10 MB live
        del b, c
    assert 1000 + 12_000_000 <= peak.peak < 1000 + 12_000_000 + 65_536  # allow a few small bookkeeping allocations


@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="no GNU time here (benchmarks/memory.py needs it)")
def test_child_rss_counter_sees_a_known_allocation():
    """common.run_measuring_rss (benchmarks/memory.py's two outside readings): a child that holds 300 MB of touched
    memory for a second peaks at least that high by both readings, and they agree within 1 MiB (the kernel's
    per-thread RSS counters are batched: the polled VmRSS can read a few pages above ru_maxrss)."""
    code = "import time; x = bytearray(300 * 2**20); time.sleep(1.0)"  # bytearray zero-fills: every page is touched
    run = common.run_measuring_rss([sys.executable, "-c", code])
    assert run["returncode"] == 0, run["stderr"][-2000:]
    assert 300 / 1024 <= run["rss_polled_gib"] <= run["rss_time_gib"] + 1 / 1024
    assert 300 / 1024 <= run["rss_time_gib"] < 300 / 1024 + 0.2  # + the interpreter


def test_trl_compare_runs_train_py_with_the_settings_it_reports():
    """benchmarks/trl_compare.py's command line for our side is one train.py accepts, and it resolves to the settings
    the comparison reports (SETTINGS): the flags cannot drift from train.py's options unseen, without TRL installed."""
    import options
    import train
    from benchmarks.trl_compare import SETTINGS, ours_command

    cmd = ours_command("python", "MODEL", "DATA", "OUT", seed=3, steps=7)
    assert cmd[1].endswith("train.py")
    a = options.resolve_defaults(options.parse_args(train.Args, cmd[2:]), 1)
    assert (a.algo, a.model, a.dataset, a.out, a.seed, a.steps) == ("grpo", "MODEL", "DATA", "OUT", 3, 7)
    assert {k: getattr(a, k) for k in SETTINGS} == SETTINGS
    B = SETTINGS["prompts_per_step"] * SETTINGS["group_size"]
    assert (a.minibatch_size, a.micro_batch_size, a.epochs, a.ent_coef) == (B, B, 1, 0)  # one on-policy step a batch
    assert (a.loss_agg, a.kl_estimator, a.lr_schedule, a.scale_rewards) == ("token-mean", "k3", "constant", True)


def test_trl_compare_says_when_the_trl_virtualenv_is_missing(tmp_path):
    p = subprocess.run([sys.executable, "benchmarks/trl_compare.py", "--trl-python", str(tmp_path / "none")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "trl_requirements.txt" in p.stderr.splitlines()[-1], p.stderr


def test_padded_bytes_by_hand():
    # (5, 3) over 2 ranks: c = 3 rows → 9 elements allocated on each rank; rank 1 holds 2 real rows (6 elements)
    got = ledger_part.padded_bytes(shapes=[(5, 3)], world_size=2, rank=1)
    assert got == {"params": 36, "grads": 36, "optimizer": 2 * 6 * 4 + 4, "total": 36 + 36 + 52}


def test_gpu_check_smoke_on_cpu(tmp_path):
    """benchmarks/gpu_check.py --smoke: the script a GPU runs first, on CPU with a tiny Qwen2 config (the real 151,936
    vocabulary and tokenizer), gloo, one step of each run: every run exits 0, reports its phases, MFU and the ledger's
    prediction, sampling matches the scored policy (fp32), and every collective's tensors are on the group's device."""
    import os

    p = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=600,
                       env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
                       | {"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["environment"]["missing"] is None and results["environment"]["torch"]
    assert [r["name"] for r in results["runs"]] == ["ppo"]  # the smoke run: PPO only (policy, critic, reference)
    for r in results["runs"]:
        assert r["exit"] == 0 and r["steps"] == 1 and r["update_flops"] > 0 and r["ledger_predicted_gib"] > 0, r
        assert r["rollout_logprob_diff"] < 1e-3 and r["time_update_s"] > 0
    terms = results["runs"][0]["ledger_terms_gib"]  # PPO trains the critic too: two models' 16 bytes a parameter
    assert math.isclose(terms["trainable_state"], 2 * 16 * results["model"]["n_params"] / 2**30, rel_tol=0.01), terms
    for algo in ("grpo", "ppo"):
        assert results["collectives"][algo]["all_on_group_device"], results["collectives"]
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check")
