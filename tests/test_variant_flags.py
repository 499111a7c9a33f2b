"""The 2024-25 variants as flags of train.py: the checks made before anything loads, GSPO's clip range, every flag in a
2-rank run of the real script, and --dynamic-sampling's exact resume. Their math: tests/test_variants.py; inside the
trainer's step on a fixed batch, 1 rank against 2: tests/test_train.py."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import free_port, main_error

import options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} | {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TINY = ["--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "4", "--eval-size", "4",
        "--sft-steps", "20",
        "--plot", "false", "--seed", "0", "--save-every", "1"]
TIMING = ("time_generate_s", "time_score_s", "time_forward_s", "time_update_s", "step_time_s", "tokens_per_s",
          "host_peak_rss_gib")
# every flag in one of two runs: (name, flags)
RUNS = {
    "rloo-gspo-overlong-correction": ["--advantage", "rloo", "--policy-loss", "gspo", "--overlong-buffer", "2",
                                      "--sampler-correction-cap", "2", "--beta", "0.04"],
    "reinforce-dynamic-mask": ["--advantage", "reinforce-pp-baseline", "--dynamic-sampling", "--max-sample-batches",
                               "3", "--sampler-correction-cap", "1.5", "--sampler-correction-mask"],
}


@pytest.mark.parametrize("flags, says", [
    (["--algo", "ppo", "--advantage", "rloo"], "--advantage, --policy-loss and --dynamic-sampling are GRPO's options"),
    (["--algo", "ppo", "--dynamic-sampling"], "--advantage, --policy-loss and --dynamic-sampling are GRPO's options"),
    (["--policy-loss", "gspo", "--loss-agg", "token-mean"], "--policy-loss gspo is an objective per sequence: it needs "
                                                            "--loss-agg seq-mean-token-mean, not token-mean"),
    (["--max-sample-batches", "0"], "--max-sample-batches must be at least 1, not 0"),
    (["--overlong-buffer", "7"], "--overlong-buffer 7 must be in [0, --max-new-tokens 6]"),
    (["--sampler-correction-cap", "0.5"], "--sampler-correction-cap must be greater than 1 (0 = off), not 0.5"),
    (["--sampler-correction-mask"], "--sampler-correction-mask needs --sampler-correction-cap C"),
    (["--algo", "sft", "--advantage", "rloo"], "--advantage has no effect with --algo sft (an RL option)"),
    (["--advantage", "loo"], "--advantage must be 'grpo', 'rloo' or 'reinforce-pp-baseline', not 'loo'"),
])
def test_a_variant_option_that_cannot_work_is_one_line(flags, says, capsys, tmp_path):
    line = main_error(capsys, "--out", tmp_path / "out", *flags)
    assert says in line, line
    assert not (tmp_path / "out").exists()


def test_gspo_takes_its_papers_clip_range_unless_told_otherwise():
    """Zheng et al. 2025 clip the sequence ratio at 1 − 3e-4 … 1 + 4e-4: --policy-loss gspo alone takes that band; a
    given --eps is both sides unless --eps-high is given too; the token-level surrogate keeps 0.2."""
    parse = lambda *argv: options.resolve_defaults(options.parse_args(options.Args, list(argv)), 1)  # noqa: E731
    assert (parse("--policy-loss", "gspo").eps, parse("--policy-loss", "gspo").eps_high) == (3e-4, 4e-4)
    assert (parse("--policy-loss", "gspo", "--eps", "0.1").eps_high, parse().eps, parse().eps_high) == (0.1, 0.2, None)
    assert parse("--policy-loss", "gspo", "--eps", "1e-3", "--eps-high", "2e-3").eps_high == 2e-3


def torchrun(out, *args, nproc: int = 2) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master-port", str(free_port())]
    p = subprocess.run([sys.executable, *(launcher if nproc > 1 else []), "train.py", "--out", str(out), *TINY,
                        *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def rows(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Each of RUNS, 3 GRPO steps on 2 ranks from the embedded warm start (one warm start, copied)."""
    root = tmp_path_factory.mktemp("variants")
    out = {}
    for i, (name, flags) in enumerate(RUNS.items()):
        if i:  # the warm start of the first run, reused (its settings are the same)
            shutil.copytree(root / next(iter(RUNS)) / "sft", root / name / "sft")
        torchrun(root / name, "--steps", 3, *flags)
        out[name] = root / name
    return out


def test_every_variant_flag_runs_on_two_ranks_and_logs_what_it_did(runs):
    a = [r for r in rows(runs["rloo-gspo-overlong-correction"]) if "reward_mean" in r]
    b = [r for r in rows(runs["reinforce-dynamic-mask"]) if "reward_mean" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for r in a + b:  # the sampler is the scored policy here: its log-probs agree up to rounding, so every weight is ~1
        assert abs(r["sampler_weight_mean"] - 1) < 1e-3 and r["sampler_frac_truncated"] == 0, r
        assert 0 <= r["clipfrac"] <= 1 and r["approx_kl"] >= 0
    assert all(r["sampler_frac_masked"] == 0 for r in a + b)
    for r in b:  # DAPO: at most 3 batches read; the kept groups have a spread unless the batches ran out
        assert 1 <= r["sample_batches"] <= 3 and 0 <= r["frac_reward_zero_std_drawn"] <= 1
        assert r["frac_reward_zero_std"] == 0 or r["sample_batches"] == 3, r
        assert r["frac_reward_zero_std"] <= r["frac_reward_zero_std_drawn"] + 1e-9
    # the epochs count the prompt batches read, --prompts-per-step rows each, not the steps
    read, per_batch = 0, a[0]["epoch"]  # run a read one batch a step
    for r in b:
        read += r["sample_batches"]
        assert abs(r["epoch"] - read * per_batch) < 1e-9, (r["epoch"], read)
    assert "sample_batches" not in a[0] and "sampler_weight_mean" in a[0]
    assert all(r["kl"] is not None and r["kl"] >= 0 for r in a) and all(r["kl"] is None for r in b)  # β 0.04 and 0
    for out in runs.values():  # the ledger's bytes are what the ranks held, for the policy and the frozen reference
        memory = json.loads((out / "memory.json").read_text())
        assert memory["world_size"] == 2 and memory["predicted_bytes"] == memory["measured_bytes"]
        assert memory["frozen_predicted_bytes"] == memory["frozen_measured_bytes"]
    assert set(json.loads((runs["rloo-gspo-overlong-correction"] / "memory.json").read_text())[
        "frozen_measured_bytes"]) == {"ref"}


def test_dynamic_sampling_resumes_exactly(tmp_path, runs):
    """--dynamic-sampling reads more prompt batches than steps: the 2-rank run of the fixture, cut back to its step-2
    checkpoint (as a kill after that checkpoint leaves it) and resumed, reads at step 3 the batch the uninterrupted
    run read (the count is in the checkpoint) and logs the same rows."""
    full, cut = runs["reinforce-dynamic-mask"], tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_000003")
    torchrun(cut, "--steps", 3, "--resume", *RUNS["reinforce-dynamic-mask"])
    reference = rows(full)
    assert sum(r["sample_batches"] for r in reference if r.get("step") in (1, 2) and "reward_mean" in r) > 2, \
        "steps 1-2 read extra batches: otherwise the resumed step 3 would read the right one by chance"
    assert rows(cut) == reference
