"""Bad input and faults: real runs of train.py, small, one process and 2-process torchrun on CPU.

Bad input → exit code ≠ 0, exactly one `error: ...` line naming the problem, no traceback.
Faults → atomic checkpoints, exact resume after SIGKILL (bit-for-bit on CPU), a failing rank stops every rank
promptly, a non-finite loss skips the step and leaves the weights untouched, the same seed gives the same metrics.

train.py carries no test hooks: a fault is a reward (`--reward _fault_rewards:NAME`) or is installed by
tests/_fault_launcher.py, which runs train.main after monkeypatching train / checkpoints / torch.distributed.checkpoint
as the environment variable FAULT says (a NaN loss, a rank that raises, a SIGKILL inside or right after a checkpoint
save). The kills come from inside the process at a fixed point of the run, so they do not depend on timing.

Hang guards: every run gets TRAIN_COLLECTIVE_TIMEOUT_S = COLLECTIVE_TIMEOUT_S (300 s), so a rank left waiting in a
collective would end only through that timeout. A run that must stop after a fault passes when (a) its stderr shows
the fault's own message and no "timed out" (what gloo and the c10d store say at that timeout), and (b) it stopped
within half the timeout of its last metrics row. A hang fails both; a slow, loaded machine fails neither.

The reference run (`base`) builds the embedded SFT model once; every other run copies it and they all start from one
module fixture (`runs`), two at a time. The checks made before anything heavy call train.main in this process.
"""

import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
import torch
from helpers import copy_base, main_error, ok, one_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
TINY = ["--prompts-per-step", "4", "--group-size", "4", "--minibatch-size", "8", "--eval-size", "16", "--sft-steps", "5",
        "--max-new-tokens", "4", "--epochs", "2", "--seed", "0", "--save-every", "1", "--keep-checkpoints", "10", "--plot", "false",
        "--reward", "_fault_rewards:length"]  # a reward that varies within each group: every step moves the weights
STEPS = 4
PPO_ADAPTIVE = ("--algo", "ppo", "--beta", "0.05", "--adaptive-kl-target", "0.001", "--kl-horizon", "100")
TIMING = ("time_generate_s", "time_score_s", "time_forward_s", "time_update_s", "step_time_s", "tokens_per_s",
          "host_peak_rss_gib", "cuda_max_allocated_gib")  # vary from run to run
COLLECTIVE_TIMEOUT_S = 300  # the only way a rank left waiting in a collective can end (see the module docstring)
TIMED_OUT = re.compile(r"timed out", re.IGNORECASE)  # gloo: "Timed out waiting …ms for recv operation"; c10d store
ENV = {k: v for k, v in os.environ.items() if k not in ("FAULT", "TRAIN_FAULT", "RANK", "WORLD_SIZE", "LOCAL_RANK")} | {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([TESTS, ROOT]),
    "TRAIN_COLLECTIVE_TIMEOUT_S": str(COLLECTIVE_TIMEOUT_S)}


def command(args: list, nproc: int = 1, fault: str = "") -> list:
    """train.py, or tests/_fault_launcher.py (train.main with the fault FAULT installed) when there is a fault."""
    script = os.path.join("tests", "_fault_launcher.py") if fault else "train.py"
    if nproc == 1:
        return [sys.executable, script, *map(str, args)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master-port", str(port),
            script, *map(str, args)]


def marked(mark: str) -> list[int]:
    """The live processes (not zombies) whose environment holds FAULT_TEST_RUN=mark: a run's launcher and every process
    it started, whatever session or process group they moved to (torch starts each worker in a session of its own)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"FAULT_TEST_RUN={mark}".encode() in f.read().split(b"\0") and running(int(pid)):
                    found.append(int(pid))
        except OSError:  # gone meanwhile, or not ours
            pass
    return found


def train(out, *args, nproc: int = 1, fault: str = "", timeout: int = 2 * COLLECTIVE_TIMEOUT_S + 300) -> subprocess.CompletedProcess:
    """Run train.py (through the launcher when `fault` is set) to the end, every process of it marked by an environment
    variable of its own; the result also lists the marked processes that outlived it (`survivors`), and none is left
    afterwards."""
    mark = uuid.uuid4().hex
    p = subprocess.Popen(command(["--out", out, *args], nproc, fault), cwd=ROOT,
                         env=ENV | {"FAULT_TEST_RUN": mark} | ({"FAULT": fault} if fault else {}),
                         start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
        done = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
        done.survivors = marked(mark)
        return done
    finally:
        for pid in marked(mark):
            os.kill(pid, signal.SIGKILL)
        p.wait()


def stopped_promptly(seen: dict, says: str) -> None:
    """The hang guard of a run that a fault must stop (see the module docstring): the fault's own message, no
    collective timeout, no surviving process, and an end well before the collective timeout could have ended it."""
    stderr = seen["p"].stderr
    assert says in stderr, stderr[-3000:]
    assert not TIMED_OUT.search(stderr), "a rank was left waiting until the collective timeout:\n" + stderr[-3000:]
    assert not seen["p"].survivors, "no process may outlive the run"
    assert seen["stopped_after_s"] < COLLECTIVE_TIMEOUT_S / 2, (
        f"took {seen['stopped_after_s']:.0f} s after the last row: a hang guard, not a performance bound")


def rows(out) -> list[dict]:
    """metrics.jsonl without the timing keys, which differ from run to run."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f if line.strip()]


def train_steps(out) -> list[int]:
    return [r["step"] for r in rows(out) if "reward_mean" in r]


def checkpoints(out) -> list[str]:
    root = os.path.join(out, "checkpoints")
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def checkpoint_state(out, step: int) -> dict:
    """The whole checkpoint of `step` as one dict: {"policy": weights, "policy_optim": AdamW's state, ...}."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = os.path.join(out, f"step_{step}.pt")
    if not os.path.exists(flat):
        dcp_to_torch_save(os.path.join(out, "checkpoints", f"step_{step:06d}"), flat)
    return torch.load(flat, weights_only=False)


def policy_weights(out, step: int) -> dict:
    return checkpoint_state(out, step)["policy"]


def tensors(tree, prefix: str = "") -> dict:
    """Every tensor of a nested dict/list (an optimizer state), by its path."""
    if torch.is_tensor(tree):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else []
    return {k: v for key, sub in items for k, v in tensors(sub, f"{prefix}/{key}").items()}


def seconds_since_last_row(out) -> float:
    """Wall time from the last metrics row written to now: how long the ranks took to stop after a fault, without
    the start-up (which is slow on a loaded machine)."""
    path = os.path.join(out, "metrics.jsonl")
    return time.time() - os.path.getmtime(path) if os.path.exists(path) else float("inf")


# ======================================================================================================================
# Fixtures: one embedded SFT model for every run; the runs without timing assertions, two at a time
# ======================================================================================================================
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The uninterrupted single-process reference run; it builds the embedded SFT model and dataset, which every
    other run copies into its --out instead of building them again."""
    out = tmp_path_factory.mktemp("full")
    ok(train(out, *TINY, "--steps", STEPS))
    return out


def sigkill_then_resume(out, nproc: int = 1, extra: tuple = ()) -> dict:
    """FAULT=kill_after_save:2 SIGKILLs every rank as soon as checkpoint 2 is committed (before step 3, where it falls
    whatever the machine's load), then --resume it."""
    killed = train(out, *TINY, "--steps", STEPS, *extra, nproc=nproc, fault="kill_after_save:2")
    resumed_from = ([d for d in checkpoints(out) if not d.endswith(".partial")] or [None])[-1]
    return {"killed": killed, "checkpoints": checkpoints(out), "resumed_from": resumed_from, "steps_logged": train_steps(out),
            "resume": train(out, *TINY, "--steps", STEPS, *extra, "--resume", nproc=nproc)}


def kill_in_save_then_resume(out) -> dict:
    """FAULT=kill_in_save:3 SIGKILLs the run after step 3's shards are written, before the commit; add a torn later
    save full of garbage and a torn metrics row, then --resume."""
    killed = train(out, *TINY, "--steps", STEPS, fault="kill_in_save:3")
    partial = out / "checkpoints" / "step_000003.partial"
    seen = {"killed": killed, "checkpoints": checkpoints(out), "partial": sorted(os.listdir(partial)) if partial.is_dir() else [],
            "rows": rows(out)}
    os.makedirs(out / "checkpoints" / "step_000009.partial")
    (out / "checkpoints" / "step_000009.partial" / "__0_0.distcp").write_text("garbage")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "rew')
    return seen | {"resume": train(out, *TINY, "--steps", STEPS, "--resume")}


def reward_inf_on_rank_1(out) -> dict:
    p = train(out, *TINY, "--steps", 2, "--reward", "_fault_rewards:inf_on_rank_1", "--eval-size", 0, nproc=2)
    return {"p": p, "stopped_after_s": seconds_since_last_row(out)}  # no row: metrics.jsonl as the run created it


def rank_1_raises(out) -> dict:
    """FAULT=raise:1:2 under 2-rank torchrun, in its own process group, to see whether any rank outlives it."""
    p = train(out, *TINY, "--steps", STEPS, nproc=2, fault="raise:1:2")
    return {"p": p, "stopped_after_s": seconds_since_last_row(out)}  # the last row: step 1's


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun's workers, when `pid` is the agent)."""
    ps = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in ps.split()]


def running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie waits for init, which may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(predicate, timeout: float) -> float:
    """Seconds until predicate() holds (polling every 0.2 s), or inf after `timeout`."""
    start = time.time()
    while time.time() - start < timeout:
        if predicate():
            return time.time() - start
        time.sleep(0.2)
    return float("inf")


def agent_killed_then_resume(out) -> dict:
    """`setsid torchrun --nproc_per_node 2 train.py ...` as a user starts it, then `kill -9 -- -PGID` of torchrun's
    process group once checkpoint 2 is committed: torch starts each worker in a session of its own, so the kill
    reaches the agent only. Every worker must then stop by itself (run_dir.watch_launcher); then --resume."""
    args, mark = [*TINY, "--steps", STEPS, "--reward", "_fault_rewards:length_slow"], uuid.uuid4().hex
    agent = subprocess.Popen(command(["--out", out, *args], 2), cwd=ROOT, env=ENV | {"FAULT_TEST_RUN": mark},
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    committed = wait_for(lambda: os.path.exists(os.path.join(out, "checkpoints", "step_000002", "meta.json")), 300)
    workers = children(agent.pid)
    sessions = {"agent": os.getsid(agent.pid), "workers": [os.getsid(w) for w in workers]}  # before the kill
    os.killpg(agent.pid, signal.SIGKILL)
    agent.wait()
    gone_after_s = wait_for(lambda: not marked(mark), 60)
    for pid in marked(mark):  # leave nothing behind whatever the test concludes
        os.kill(pid, signal.SIGKILL)
    return {"committed_after_s": committed, "workers": workers, "sessions": sessions, "gone_after_s": gone_after_s,
            "left_behind": checkpoints(out), "resume": train(out, *args, "--resume", nproc=2)}


def second_run_into_a_live_out(out) -> dict:
    """Run A into --out, held in its reward from its first checkpoint on (HOLD_AFTER, HOLD_FILE); while it is alive, a
    second run into the same --out, fresh and with --resume; then A is killed and --resume goes on from step 1."""
    hold, first_checkpoint = os.path.join(os.path.dirname(out), "hold"), os.path.join(out, "checkpoints", "step_000001",
                                                                                       "meta.json")
    open(hold, "w").close()
    args = [*TINY, "--steps", STEPS, "--reward", "_fault_rewards:length_held"]
    first = subprocess.Popen(command(["--out", out, *args]), cwd=ROOT, env=ENV | {"HOLD_FILE": hold,
                             "HOLD_AFTER": first_checkpoint}, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(first_checkpoint), 300)
        fresh, resumed = train(out, *args), train(out, *args, "--resume")
        alive = first.poll() is None
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        os.remove(hold)
    return {"pid": first.pid, "fresh": fresh, "resumed": resumed, "alive_meanwhile": alive,
            "after": train(out, *args, "--resume")}


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory) -> dict:
    """name → (out, result) for every run of train.py the tests look at, two at a time. The hang guards time only
    what follows a fault (seconds_since_last_row), against half the collective timeout, not a guess at the speed."""
    root = tmp_path_factory.mktemp("runs")
    no_pad = shutil.copytree(base / "sft" / "hf", root / "no_pad_model")  # a tokenizer (and config) without pad
    for name, key in (("tokenizer_config.json", "pad_token"), ("config.json", "pad_token_id"), ("generation_config.json", "pad_token_id")):
        cfg = json.loads((no_pad / name).read_text())
        cfg.pop(key)
        (no_pad / name).write_text(json.dumps(cfg))
    jobs = {  # name: arguments after TINY and keywords of train(), or a function of --out; the longest first
        "full_2ranks": (["--steps", STEPS], {"nproc": 2}),
        "agent_killed_then_resume": agent_killed_then_resume,
        "second_run_into_a_live_out": second_run_into_a_live_out,
        "sigkill_then_resume_2ranks": lambda out: sigkill_then_resume(out, nproc=2),
        "sigkill_then_resume": lambda out: sigkill_then_resume(out, extra=PPO_ADAPTIVE),
        "ppo_adaptive": (["--steps", STEPS, *PPO_ADAPTIVE], {}),
        "kill_in_save_then_resume": kill_in_save_then_resume,
        "rank_1_raises": rank_1_raises,
        "reward_inf_on_rank_1": reward_inf_on_rank_1,
        "nan": (["--steps", 3], {"fault": "nan:2"}),
        "no_pad": (["--steps", 1, "--model", no_pad, "--dataset", base / "embedded_data"], {}),
        "dataset_hub": (["--dataset", "no-such-org/no-such-dataset-xyz"], {}),  # datasets' offline mode: at its import
    }

    if os.environ.get("FAULT_JOBS"):  # benchmarks/planted_bugs.py: only the runs the one test it runs reads
        jobs = {name: job for name, job in jobs.items() if name in os.environ["FAULT_JOBS"].split(",")}

    def go(name):
        out = copy_base(base, root / name)
        job = jobs[name]
        return name, (out, job(out) if callable(job) else train(out, *TINY, *job[0], **job[1]))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(pool.map(go, jobs))


# ======================================================================================================================
# Bad input: one line, non-zero exit, no traceback
# ======================================================================================================================
def test_bad_argument_exits_2_with_one_line(tmp_path):
    p = train(tmp_path / "out", *TINY, "--algo", "sac")
    assert p.returncode == 2
    assert one_error(p) == "error: --algo must be 'sft', 'rm', 'grpo' or 'ppo', not 'sac'"


def test_prompts_per_step_not_divisible_across_ranks(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun --nproc_per_node 2 sets; checked before the process group
    line = main_error(capsys, "--out", tmp_path / "out", *TINY, "--prompts-per-step", "3", "--minibatch-size", "4")
    assert "--prompts-per-step 3 is not divisible by the 2 ranks" in line


def test_output_directory_that_cannot_be_written(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    line = main_error(capsys, "--out", tmp_path / "a_file" / "out", *TINY)
    assert "--out" in line and "a_file" in line and "cannot be written" in line


def test_a_hub_dataset_out_of_reach_is_one_line(runs):
    out, p = runs["dataset_hub"]
    assert "cannot load dataset 'no-such-org/no-such-dataset-xyz'" in one_error(p)
    assert not os.path.exists(os.path.join(out, "metrics.jsonl")), "stopped before the first evaluation"


def in_process_error(out, argv, capsys, monkeypatch) -> str:
    """train.main in this process, offline, one rank (what the user sees is the same: exit 2, one line, no traceback),
    for errors found after the process group is up; returns the line."""
    import torch.distributed as dist

    import train

    for k, v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1")):
        monkeypatch.setenv(k, v)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    try:
        code = train.main([str(a) for a in ["--out", out, *TINY, *argv]])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err[-3000:]
    return errors[0]


@pytest.mark.parametrize("flags, says", [
    (["--model", "no-such-org/no-such-model-xyz"], "--model 'no-such-org/no-such-model-xyz' is not a local directory "
                                                   "and not in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
                                                   "downloading it"),
    (["--dataset", "{data}/empty.jsonl"], "empty.jsonl' is empty: no rows to train on"),
    (["--dataset", "{data}/columns.jsonl"], "columns.jsonl' has no column 'question'; its columns are ['q', 'a']"),
    (["--dataset", "{data}/long.jsonl"], "tokens; with --max-new-tokens 4 it exceeds the model's context of 64 tokens"),
])
def test_model_or_dataset_that_cannot_be_used(flags, says, base, tmp_path, capsys, monkeypatch):
    """After the process group is up: the model and data are read there."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "empty.jsonl").write_text("")
    (data / "columns.jsonl").write_text("".join(json.dumps({"q": f"{i}+1=", "a": str(i + 1)}) + "\n" for i in range(10)))
    (data / "long.jsonl").write_text("".join(json.dumps({"question": "1+" * 40 + "1=", "answer": "41"}) + "\n"
                                             for _ in range(10)))
    out = copy_base(base, tmp_path / "out")
    line = in_process_error(out, [f.format(data=data) for f in flags], capsys, monkeypatch)
    assert says in line, line
    assert not os.path.exists(os.path.join(out, "metrics.jsonl")), "stopped before the first evaluation"


@pytest.mark.parametrize("flags, says, logged", [
    (["--reward", "_fault_rewards:raises", "--eval-size", 0],
     "reward '_fault_rewards:raises' raised ValueError: boom on sample 0 of step 1", []),
    (["--reward", "_fault_rewards:nan_on_third", "--eval-size", 0],
     "reward '_fault_rewards:nan_on_third' returned nan on sample 2 of step 1", []),
    (["--reward", "_fault_rewards:raises"], "reward '_fault_rewards:raises' raised ValueError: boom on evaluation "
                                            "prompt 0", []),
])
def test_reward_that_raises_or_is_not_finite(flags, says, logged, base, tmp_path, capsys, monkeypatch):
    """In a step (no evaluation) and in the step-0 evaluation, which scores its greedy completions with --reward."""
    out = copy_base(base, tmp_path / "out")
    assert says in in_process_error(out, ["--steps", 2, *flags], capsys, monkeypatch)
    assert [r["step"] for r in rows(out)] == logged and checkpoints(out) == [], "nothing may reach the optimizer"


def test_reward_not_finite_on_one_rank_stops_both_and_rank_0_names_it(runs):
    out, seen = runs["reward_inf_on_rank_1"]
    line = one_error(seen["p"], code=None, torchrun=True)
    # rank 1 holds samples 8..15 of the global batch (2 prompts × G=4 per rank)
    assert "reward '_fault_rewards:inf_on_rank_1' returned inf on sample 8 of step 1" in line
    stopped_promptly(seen, line)
    assert rows(out) == [] and checkpoints(out) == [], "nothing may reach the optimizer"


def test_resume_with_another_configuration_is_refused(base, tmp_path, capsys):
    full = base
    out = shutil.copytree(full, tmp_path / "out")
    line = main_error(capsys, "--out", out, *TINY, "--steps", STEPS, "--resume", "--group-size", 8, "--seed", 1)
    assert "--resume: checkpoint" in line and "--group-size 4 → 8" in line and "--seed 0 → 1" in line
    line = main_error(capsys, "--out", out, *TINY, "--steps", STEPS)  # a fresh run would overwrite the checkpoints
    assert "already holds checkpoint" in line and "--resume" in line
    assert rows(out) == rows(full) and checkpoints(out) == checkpoints(full), "nothing lost"


def test_tokenizer_without_pad_token_is_padded_with_eos(runs):
    """A checkpoint whose tokenizer and configs have no pad token trains, padding with EOS: the export's tokenizer and
    config name EOS as the pad."""
    from transformers import AutoConfig, AutoTokenizer

    out, p = runs["no_pad"]
    assert "pad_token" not in (out.parent / "no_pad_model" / "tokenizer_config.json").read_text()
    ok(p)
    assert train_steps(out) == [1]
    tok = AutoTokenizer.from_pretrained(out / "hf")
    assert tok.pad_token == tok.eos_token is not None and tok.pad_token_id == tok.eos_token_id
    assert AutoConfig.from_pretrained(out / "hf").pad_token_id in (None, tok.eos_token_id)


# ======================================================================================================================
# Faults
# ======================================================================================================================
def test_same_seed_same_metrics(base, runs):
    again = runs["kill_in_save_then_resume"][1]["rows"]  # another process, same seed: its rows up to the kill at step 3
    assert [r["step"] for r in again] == [0, 1, 2, 3]
    assert again == rows(base)[: len(again)]
    assert len({r["reward_mean"] for r in rows(base) if "reward_mean" in r}) > 1, "a run that never changes proves nothing"
    assert any(r["grad_norm"] > 0 for r in rows(base) if "grad_norm" in r)


@pytest.mark.parametrize("nproc", [1, 2])
def test_exact_resume_after_sigkill(nproc, runs):
    """SIGKILL of every rank right after checkpoint 2, then --resume in new processes: the same rows, and the same
    final weights and optimizer state, as the run never interrupted. 1 rank: PPO (a critic with its own AdamW) with
    --adaptive-kl-target, whose β moves every step (the controller's state must resume); 2 ranks: GRPO."""
    out, seen = runs["sigkill_then_resume" if nproc == 1 else "sigkill_then_resume_2ranks"]
    reference, p = runs["ppo_adaptive" if nproc == 1 else "full_2ranks"]  # 2 ranks draw other samples than 1
    ok(p)
    killed = seen["killed"]
    if nproc == 1:
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    else:  # torchrun exits 1 and names the signal that ended its worker(s)
        assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr, killed.stderr[-3000:]
    assert not killed.survivors
    assert seen["checkpoints"] == ["step_000001", "step_000002"] and seen["resumed_from"] == "step_000002"
    assert seen["steps_logged"] == [1, 2], "killed before step 3 wrote anything"
    ok(seen["resume"])
    assert rows(out) == rows(reference), f"resumed from {seen['resumed_from']}"
    same_final_state(out, reference)
    if nproc == 1:
        betas = [r["beta"] for r in rows(reference) if "reward_mean" in r]
        assert len(set(betas)) == STEPS, betas  # the controller moved β at every step
        assert any(k.startswith("/critic/") for k in tensors(checkpoint_state(out, STEPS)))


def same_final_state(out, reference) -> None:
    """The last checkpoint of `out` holds, bit for bit, the weights and AdamW state of the same step of `reference`."""
    mine, theirs = (tensors(checkpoint_state(o, STEPS)) for o in (out, reference))
    assert mine.keys() == theirs.keys() and any(k.startswith("/policy/") for k in mine)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine), [k for k in mine if not torch.equal(mine[k], theirs[k])]


def test_workers_stop_when_torchrun_is_killed_and_resume_is_exact(runs):
    """kill -9 of torchrun's process group: both workers are gone within 5 s (they poll their parent and stop), before
    the run could end on its own; a --resume then continues from the newest complete checkpoint to the same rows, bit
    for bit, as the run that was never interrupted (timings aside)."""
    out, seen = runs["agent_killed_then_resume"]
    reference, p = runs["full_2ranks"]
    ok(p)
    assert seen["committed_after_s"] < 300 and len(seen["workers"]) == 2, seen
    # the workers were outside the process group the kill reached (else the kill ended them, not their watch)
    assert seen["sessions"]["agent"] not in seen["sessions"]["workers"], seen["sessions"]
    # stopped by their watch (it polls every 0.5 s), not by finishing the run: a step of the slowed reward takes 2 s
    assert seen["gone_after_s"] < 5, f"workers still running {seen['gone_after_s']} s after torchrun was killed"
    assert f"step_{STEPS:06d}" not in seen["left_behind"], ("the workers finished the run", seen["left_behind"])
    ok(seen["resume"])
    assert rows(out) == rows(reference)
    assert not [d for d in checkpoints(out) if d.endswith(".partial")]


def test_a_second_run_into_a_live_out_is_refused_with_the_holders_pid(runs):
    out, seen = runs["second_run_into_a_live_out"]
    assert seen["alive_meanwhile"], "the first run ended before the second was tried: nothing was tested"
    for p in (seen["fresh"], seen["resumed"]):
        line = one_error(p)
        assert line == (f"error: --out {str(out)!r} is in use by another run (pid {seen['pid']} on "
                        f"{socket.gethostname()}): wait for it to end, or choose another --out"), line
    ok(seen["after"])  # once the first is gone (kill -9: the kernel drops its lock), --resume goes on


def test_kill_during_save_leaves_the_previous_checkpoint(base, runs):
    out, seen = runs["kill_in_save_then_resume"]
    assert seen["killed"].returncode == -signal.SIGKILL, seen["killed"].stderr[-3000:]
    assert seen["checkpoints"] == ["step_000001", "step_000002", "step_000003.partial"]
    assert any(f.endswith(".distcp") for f in seen["partial"]), "the kill came after the shards were written"
    assert "meta.json" not in seen["partial"], "the kill came before the commit"
    ok(seen["resume"])  # from step 2, past the torn step 3 and the garbage of step 9
    assert rows(out) == rows(base)
    assert not [d for d in checkpoints(out) if d.endswith(".partial")]


def test_failing_rank_stops_every_rank_promptly(runs):
    """Rank 1 raises at the start of step 2 while rank 0 goes on into step 2's collectives: torchrun must stop rank 0
    (no survivor), promptly in the sense of the module docstring (no collective timeout, within half of it)."""
    out, seen = runs["rank_1_raises"]
    assert seen["p"].returncode != 0
    stopped_promptly(seen, "RuntimeError: injected fault on rank 1 at step 2")
    assert train_steps(out) == [1]  # step 1's row was the last thing written, just before step 2 and its fault


def test_non_finite_loss_skips_the_step_and_keeps_the_weights(runs):
    out, p = runs["nan"]
    ok(p)
    skipped = {r["step"]: r["skipped_updates"] for r in rows(out) if "reward_mean" in r}
    assert skipped == {1: 0, 2: 4, 3: 0}  # 2 epochs × 16/8 minibatches at step 2
    w1, w2, w3 = (policy_weights(out, s) for s in (1, 2, 3))
    assert all(torch.isfinite(w2[k]).all() and torch.equal(w1[k], w2[k]) for k in w1), "a skipped step changed them"
    assert all(torch.isfinite(w3[k]).all() for k in w3) and not all(torch.equal(w2[k], w3[k]) for k in w2), \
        "training went on after the skipped step, with finite weights"
    o1, o2 = (tensors(checkpoint_state(out, s)["policy_optim"]) for s in (1, 2))
    assert o1.keys() == o2.keys() and len(o1) > 0
    assert all(torch.isfinite(o2[k]).all() and torch.equal(o1[k], o2[k]) for k in o1), "AdamW's state moved"
