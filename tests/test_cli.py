"""What a new user types and sees: each test runs the command a user would type — `python train.py ...`
from the repository root (or from their own folder), or train.main in this process for the checks made before
anything heavy — and checks the line the user reads and the exit code; nothing a user had is lost or changed.

One embedded SFT model is built once (`base`, a finished 3-step run); every other run copies it.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from helpers import copy_base, main_error, ok, one_error

import data
import distributed
import options
import train as train_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "2", "--eval-size", "4", "--sft-steps", "5",
        "--plot", "false", "--seed", "0"]
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PYTHONPATH", "TRAIN_FAULT")} | {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(*args, cwd=ROOT, env=None, script="train.py", timeout=240) -> subprocess.CompletedProcess:
    """`python train.py ARGS` as a user types it; stdout and stderr kept apart."""
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=cwd, env=env or ENV, capture_output=True,
                          text=True, timeout=timeout)


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_steps(out) -> list[int]:
    return [r["step"] for r in metrics(out) if "reward_mean" in r]


def eval_rows(out) -> list[dict]:
    return [r for r in metrics(out) if "eval_accuracy" in r]


def screen(text: str) -> list[str]:
    """The lines a terminal shows: each `\\r` returns the carriage, so only what follows the last one stays."""
    return [line.split("\r")[-1].strip() for line in text.splitlines()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 3-step run of the embedded task, with a checkpoint at every step; stdout and stderr together, as
    `python train.py ... > log 2>&1` would keep them."""
    out = tmp_path_factory.mktemp("base") / "out"
    p = subprocess.run([sys.executable, "train.py", "--out", str(out), *TINY, "--steps", "3", "--save-every", "1"],
                       cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:]
    (out.parent / "run.log").write_text(p.stdout)
    return out


# ======================================================================================================================
# 1. --chat-template with a tokenizer that has none: one line, exit 2, before anything is built or loaded
# ======================================================================================================================
def test_chat_template_with_the_embedded_character_tokenizer(tmp_path, capsys):
    line = main_error(capsys, "--out", tmp_path / "out", *TINY, "--chat-template")
    assert line == "error: --chat-template: the embedded tiny model's character tokenizer has no chat template"
    assert not os.path.exists(tmp_path / "out")


def test_chat_template_with_a_local_model_without_one(base, tmp_path):
    model = shutil.copytree(base / "sft" / "hf", tmp_path / "my_model")
    p = run("--out", tmp_path / "out", *TINY, "--model", model, "--chat-template")
    line = one_error(p)
    assert line.startswith(f"error: --chat-template: the tokenizer of {str(model)!r} has no chat template"), line
    assert not os.path.exists(tmp_path / "out" / "embedded_data"), "checked before the data and the model are loaded"
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")


# ======================================================================================================================
# 2. Resume
# ======================================================================================================================
def test_finished_run_resumed_with_the_same_arguments_says_so(base, tmp_path):
    out = shutil.copytree(base, tmp_path / "out")
    p = ok(run("--out", out, *TINY, "--steps", "3", "--save-every", "1", "--resume"))
    assert f"the run in {out} is already complete at step 3 (--steps 3): nothing to do" in p.stdout, p.stdout
    assert metrics(out) == metrics(base), "nothing is written"
    assert sorted(os.listdir(out / "checkpoints")) == sorted(os.listdir(base / "checkpoints"))


def test_resume_with_more_steps_and_new_hyperparameters_is_announced(base, tmp_path):
    out = shutil.copytree(base, tmp_path / "out")
    p = ok(run("--out", out, *TINY, "--steps", "5", "--save-every", "1", "--resume", "--lr", "0.05", "--ent-coef", "0.9"))
    lines = p.stdout.splitlines()
    assert "--steps 3 → 5 from step 4" in lines, p.stdout
    assert "--lr 0.001 → 0.05 from step 4" in lines, p.stdout
    assert "--ent-coef 0.05 → 0.9 from step 4" in lines, p.stdout
    assert any(line.startswith("the linear learning-rate decay is re-planned to reach 0 after step 5: lr × 0.4000 at step 4")
               for line in lines), p.stdout
    assert not any(line.startswith("--critic-lr") for line in lines), "GRPO has no critic: its learning rate is not news"
    assert train_steps(out) == [1, 2, 3, 4, 5]
    assert metrics(out)[: len(metrics(base))] == metrics(base), "the first 3 steps are kept as they were"


@pytest.mark.parametrize("change, says", [
    (["--prompt-column", "q"], "--prompt-column 'question' → 'q'"),
    (["--answer-column", "a"], "--answer-column 'answer' → 'a'"),
    (["--split", "other"], "--split 'train' → 'other'"),
    (["--eval-split", "other"], "--eval-split 'test' → 'other'"),
    (["--prompt-template", "Q: {prompt}"], "--prompt-template '{prompt}' → 'Q: {prompt}'"),
    (["--eval-size", "8"], "--eval-size 4 → 8"),
])
def test_resume_refuses_options_that_define_the_experiment(change, says, base, capsys):
    line = main_error(capsys, "--out", base, *TINY, "--steps", "3", "--resume", *change)  # refused before any write
    assert line.startswith("error: --resume: checkpoint") and says in line, line


def test_resume_names_every_refused_change(base, capsys):
    line = main_error(capsys, "--out", base, *TINY, "--steps", "3", "--resume", "--split", "x", "--seed", "1")
    assert "--split 'train' → 'x'" in line and "--seed 0 → 1" in line, line


def test_resume_into_a_missing_or_empty_folder(tmp_path, capsys):
    line = main_error(capsys, "--out", tmp_path / "nothing_here", *TINY, "--resume")
    assert line == f"error: --resume: no complete checkpoint in {tmp_path / 'nothing_here' / 'checkpoints'}"
    assert not os.path.exists(tmp_path / "nothing_here"), "a refused --resume creates nothing"
    (tmp_path / "empty").mkdir()
    assert "--resume: no complete checkpoint in" in main_error(capsys, "--out", tmp_path / "empty", *TINY, "--resume")
    assert os.listdir(tmp_path / "empty") == []


# ======================================================================================================================
# 3. A reward module in the folder the user runs from; 4. --eval-size 0 on the embedded task
# ======================================================================================================================
def test_reward_module_in_the_working_directory_and_no_evaluation(base, tmp_path):
    project = tmp_path / "myproj"
    project.mkdir()
    (project / "mymod.py").write_text("def fn(completion, answer):\n    return 0.25\n")
    out = copy_base(base, tmp_path / "out")
    p = ok(run("--out", out, *TINY, "--steps", "1", "--eval-size", "0", "--reward", "mymod:fn", cwd=project,
               script=os.path.join(ROOT, "train.py")))
    assert "700 train / 0 eval rows" in p.stdout, p.stdout
    assert [r["step"] for r in metrics(out)] == [1] and eval_rows(out) == [], "--eval-size 0: no evaluation at all"
    assert metrics(out)[0]["reward_mean"] == 0.25, "the reward is mymod.fn from the working directory"


# ======================================================================================================================
# 4. --eval-size 0 with a dataset file; eval rows carry eval_n; 7. --dtype bf16 on CPU says fsdp2_mixed; 8. booleans
# ======================================================================================================================
def test_dataset_file_without_evaluation_in_bf16_on_cpu(base, tmp_path):
    data = shutil.copy(base / "embedded_data" / "train.jsonl", tmp_path / "my_data.jsonl")
    out = copy_base(base, tmp_path / "out")
    p = ok(run("--out", out, *TINY, "--steps", "1", "--eval-size", "0", "--dataset", data, "--dtype", "bf16",
               "--scale-rewards", "no", "--model", out / "sft" / "hf"))  # the warm start was made in fp32
    assert "train / 0 eval rows" in p.stdout and "dtype bf16" in p.stdout, p.stdout
    with open(out / "memory.json") as f:
        assert json.load(f)["accounting"] == "fsdp2_mixed"
    assert train_steps(out) == [1] and eval_rows(out) == []


def test_eval_rows_carry_eval_n(base):
    assert [(r["step"], r["eval_n"]) for r in eval_rows(base)] == [(0, 4), (3, 4)]


@pytest.mark.parametrize("argv, field, value", [
    (["--plot", "false"], "plot", False),
    (["--plot", "TRUE"], "plot", True),
    (["--chat-template"], "chat_template", True),
    (["--scale-rewards", "no"], "scale_rewards", False),
    (["--resume", "1"], "resume", True),
    (["--loss-agg", "token-mean"], "loss_agg", "token-mean"),  # a Literal | None option
    (["--lr", "0.01"], "lr", 0.01),
])
def test_options_parse(argv, field, value):
    assert getattr(options.parse_args(train_module.Args, argv), field) == value


# ======================================================================================================================
# 5. Templates
# ======================================================================================================================
def test_prompt_template_typed_with_backslash_n_is_a_newline(tmp_path):
    data_file = tmp_path / "d.jsonl"
    data_file.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(10)))
    for typed, expected in ((r"Q: {prompt}\nA:", "Q: 0+1=\nA:"), (r"Q:\t{prompt}\\n", "Q:\t0+1=\\n")):
        argv = ["--dataset", str(data_file), "--eval-size", "0", "--prompt-template", typed]
        args = options.resolve_defaults(options.parse_args(train_module.Args, argv), 1)
        rows, evals = data.load_prompts(args, args.dataset)
        assert rows[0] == (expected, "1") and evals == []


# ======================================================================================================================
# 7. --help; a mistyped hub name
# ======================================================================================================================
def test_help_prints_each_default_once():
    p = ok(run("--help"))
    assert "(default: )" not in p.stdout and "(default: None)" not in p.stdout
    blocks = [b for b in p.stdout.split("\n  --")[1:]]
    assert len(blocks) == len(train_module.dataclasses.fields(train_module.Args)), p.stdout
    for block in blocks:
        assert block.count("(default:") <= 1 and not ("(default:" in block and block.count("default") > 1), block
    assert "(default: grpo)" in p.stdout and "at most 20% ×" in p.stdout


@pytest.mark.parametrize("flag", ["--model", "--reward-model"])
def test_mistyped_hub_name_when_offline_fails_at_once(flag, tmp_path):
    line = one_error(run("--out", tmp_path / "out", *TINY, flag, "tiny-llama"))
    assert line.startswith(f"error: {flag} 'tiny-llama' is not a local directory and not in the Hugging Face cache, "
                           "and HF_HUB_OFFLINE=1 forbids downloading it"), line
    assert not os.path.exists(tmp_path / "out" / "embedded_data"), "before anything is built or loaded"


def test_hub_probe_names_an_unreachable_hub_at_once(monkeypatch):
    from huggingface_hub import constants

    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    with socket.socket() as s:  # a port nobody listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(distributed.UserError, match=f"the Hub \\(127.0.0.1:{port}\\) cannot be reached"):
        data.check_hub_reachable("--model", "tiny-llama")
    assert time.monotonic() - start < 6
    with socket.socket() as server:  # a reachable endpoint (with its port): no error
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        data.check_hub_reachable("--model", "tiny-llama")
    data.check_hub_reachable("--model", ROOT)  # a local directory is never probed


def test_startup_and_eval_lines_stand_on_their_own_lines(base):
    log = (base.parent / "run.log").read_text()
    shown = screen(log)
    assert any(line.startswith("grpo | 1 rank(s) on cpu | policy 109,376 params | 700 train / 4 eval rows | steps 3, "
                               "lr 0.001, micro-batch 4, dtype auto, c_h 0.05, β 0, minibatch 4") for line in shown), log
    evals = [line for line in shown if "eval_accuracy" in line and not line.startswith(("sft finished", "grpo fin"))]
    assert len(evals) == 4 and all(line.startswith("step ") for line in evals), log  # the warm start's 2, then 2
    finished = [line for line in shown if " finished at step " in line]  # each stage says where it ended and left
    assert [line.split(":")[0] for line in finished] == ["sft finished at step 5", "grpo finished at step 3"], log
    assert finished[-1].endswith(f"; model in {base / 'hf'}; checkpoint {base / 'checkpoints' / 'step_000003'}"), log
    assert "Writing model shards" not in log and "Loading weights" not in log  # transformers' own bars are off
    assert "memory per rank" not in log


# ======================================================================================================================
# Bad input refused before anything heavy: one line, exit 2
# ======================================================================================================================
@pytest.mark.parametrize("args, says", [
    (["--resume", "ture"], "argument --resume: invalid boolean (true/false) value: 'ture'"),
    (["--group-size", "1"], "--group-size must be at least 2 for GRPO"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, not 0"),
    (["--lr", "0"], "--lr must be positive (a learning rate), not 0.0"),
    (["--lr=-1e-3"], "--lr must be positive (a learning rate), not -0.001"),
    (["--algo", "ppo", "--critic-lr", "0"], "--critic-lr must be positive (a learning rate), not 0.0"),
    (["--steps", "-5"], "--steps must be non-negative, not -5"),
    (["--temperature", "0"], "--temperature must be positive, not 0.0"),
    (["--eval-size", "-1"], "--eval-size must be non-negative (0 = no evaluation), not -1"),
    (["--kl-target", "0.1"], "unrecognized arguments: --kl-target 0.1 (--kl-target is now --adaptive-kl-target)"),
    (["--target-kl", "0.1"], "unrecognized arguments: --target-kl 0.1 (--target-kl is now --early-stop-kl)"),
    (["--algo", "grpo", "--critic-init", "x"], "--critic-init: only PPO has a critic (--algo grpo)"),
    (["--reward", "none"], "--reward none leaves no reward: give --reward-model, or verifiable rewards with --reward"),
    (["--algo", "ppo", "--critic-init", "/nonexistent/rm"], "--critic-init '/nonexistent/rm': no such file or directory"),
    (["--resume"], "--resume: no complete checkpoint in"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["--model", "/nonexistent/model_dir"], "--model '/nonexistent/model_dir': no such file or directory"),
    (["--dataset", "/nonexistent/data.jsonl"], "--dataset '/nonexistent/data.jsonl': no such file or directory"),
    (["--reward", "no_such_reward"], "--reward: unknown reward 'no_such_reward'"),
    (["--prompt-template", "Q: {question}"], "--prompt-template 'Q: {question}' has no {prompt}"),
    (["--prompt-template", "{prompt} {x}"], "--prompt-template '{prompt} {x}' is not a format string with only {prompt}"),
    (["--algo", "sac"], "--algo must be 'sft', 'rm', 'grpo' or 'ppo', not 'sac'"),
    (["--loss-agg", "mean"], "--loss-agg must be 'seq-mean-token-mean', 'token-mean' or 'seq-mean-token-sum-norm', not 'mean'"),
    (["--prompt-template", "No placeholder"], "--prompt-template 'No placeholder' has no {prompt}"),
    (["--micro-batch-size", "-1"], "--micro-batch-size -1 must be positive and divide the per-rank minibatch"),
    (["--micro-batch-size", "0"], "--micro-batch-size 0 must be positive and divide the per-rank minibatch"),
    (["--micro-batch-size", "3"], "--micro-batch-size 3 must be positive and divide the per-rank minibatch (4 sequences"),
    (["--eps-high", "0.1"], "--eps-high 0.1 must be at least --eps 0.2"),
    (["--dual-clip", "0.5"], "--dual-clip 0.5 must be greater than 1"),
    (["--adaptive-kl-target", "0.1"], "--adaptive-kl-target adapts β from its start --beta: give --beta > 0"),
    (["--algo", "ppo", "--loss-agg", "seq-mean-token-mean"], "--loss-agg seq-mean-token-mean: PPO's loss is the token mean"),
    (["--model", "./tiny-llama"], "--model './tiny-llama': no such file or directory"),
    (["--lr", "inf"], "--lr must be a finite number, not inf"),
    (["--algo", "ppo", "--critic-lr", "inf"], "--critic-lr must be a finite number, not inf"),
    (["--beta", "inf"], "--beta must be a finite number, not inf"),
    (["--ent-coef", "nan"], "--ent-coef must be a finite number, not nan"),
    (["--reward-model-weight", "nan", "--reward-model", "rm"], "--reward-model-weight must be a finite number, not nan"),
    (["--algo", "ppo", "--lam", "1.5"], "--lam must be in [0, 1] (GAE's λ), not 1.5"),
    (["--algo", "ppo", "--gamma", "-1"], "--gamma must be a discount in [0, 1], not -1.0"),
    (["--epochs", "0"], "--epochs must be at least 1, not 0"),
    (["--algo", "ppo", "--vf-coef", "-1"], "--vf-coef must be non-negative (the critic loss's weight), not -1.0"),
    (["--ent-coef", "-0.1"], "--ent-coef must be non-negative (an entropy bonus), not -0.1"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be positive (a gradient-norm bound), not -1.0"),
    (["--early-stop-kl", "-1"], "--early-stop-kl must be non-negative (0 = off), not -1.0"),
    (["--weight-decay", "-1"], "--weight-decay must be non-negative, not -1.0"),
    (["--value-clip", "-0.2"], "--value-clip must be non-negative (0 = off), not -0.2"),
    (["--adaptive-kl-target", "-1"], "--adaptive-kl-target must be non-negative (0 = off), not -1.0"),
    (["--beta", "0.1", "--adaptive-kl-target", "-1"], "--adaptive-kl-target must be non-negative (0 = off), not -1.0"),
])
def test_bad_input_is_one_line_exit_2(args, says, tmp_path, capsys):
    line = main_error(capsys, "--out", tmp_path / "out", *TINY, *args)
    assert line.startswith("error: ") and says in line, line
    assert not os.path.exists(tmp_path / "out"), "nothing is created before the arguments are checked"


@pytest.mark.parametrize("args, says", [
    (["--algo", "sft", "--beta", "0.1"], "--beta has no effect with --algo sft (an RL option)"),
    (["--algo", "rm", "--group-size", "4"], "--group-size has no effect with --algo rm (an RL option)"),
    (["--algo", "sft", "--reward-model", "x"], "--reward-model has no effect with --algo sft (an RL option)"),
])
def test_an_option_the_stage_never_reads_is_refused(args, says, tmp_path, capsys):
    assert main_error(capsys, "--out", tmp_path / "out", *args) == "error: " + says
    assert not os.path.exists(tmp_path / "out")


# ======================================================================================================================
# 9. The default minibatch follows the batch on any number of ranks
# ======================================================================================================================
def test_default_minibatch_fits_the_batch_on_2_ranks(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun --nproc_per_node 2 sets; checked before the process group
    argv = ["--out", str(tmp_path / "a"), "--prompts-per-step", "16"]
    args = options.resolve_defaults(options.parse_args(train_module.Args, argv), 2)
    options.check_args(args, 2)
    assert args.minibatch_size == 128  # 16 × 8: the whole batch
    big = options.resolve_defaults(options.parse_args(train_module.Args, ["--prompts-per-step", "96"]), 2)
    assert big.minibatch_size == 256 and (96 * 8) % 256 == 0
    # through main: the checks pass the minibatch and stop at the next bad option (before any process group)
    assert "--max-new-tokens must be at least 1" in main_error(capsys, "--out", tmp_path / "b", "--prompts-per-step", 16,
                                                               "--max-new-tokens", 0)
    line = main_error(capsys, "--out", tmp_path / "c", "--prompts-per-step", 16, "--minibatch-size", 12)
    assert "--minibatch-size 12 must divide the batch (16 prompts × 8 = 128) and be divisible by the 2 ranks" in line


# ======================================================================================================================
# 10. Silent failures a new user met: stale artefacts, --model OUT/hf, data problems
# ======================================================================================================================
def test_a_warm_start_made_with_other_settings_is_refused_not_reused(base, tmp_path, capsys):
    """A run with --seed 1 into the --out of a --seed 0 run must not start RL from the seed-0 warm start, silently."""
    out = copy_base(base, tmp_path / "out")
    line = main_error(capsys, "--out", out, *[a for a in TINY if a not in ("--seed", "0")], "--seed", "1", "--steps", 1)
    assert line.startswith(f"error: {out / 'sft'} holds a warm start made with other settings (--seed 0 → 1") and \
        f"or remove {out / 'sft'}" in line, line
    assert not (out / "metrics.jsonl").exists()


def test_stale_embedded_data_is_rebuilt_and_says_what_differed(base, tmp_path):
    out = copy_base(base, tmp_path / "out")
    meta = json.loads((out / "embedded_data" / "meta.json").read_text())
    (out / "embedded_data" / "meta.json").write_text(json.dumps(meta | {"test_rows": 100}))  # as an older version
    (out / "embedded_data" / "test.jsonl").write_text("")
    p = ok(run("--out", out, *TINY, "--steps", "1", "--eval-size", "4"))
    assert f"{out / 'embedded_data'} was made with other settings (test_rows 100 → 200): building it again" in p.stdout
    assert sum(1 for _ in open(out / "embedded_data" / "test.jsonl")) == 200


def test_model_from_an_embedded_export_keeps_the_tiny_defaults_and_builds_no_model(base, tmp_path):
    """--model OUT/hf of the embedded task (the README's advice for changing a locked option): the tiny model's
    defaults stay (lr 1e-3, c_h 0.05, the whole per-rank minibatch), the start-up line shows them, and only the
    embedded data is built: no warm start, no tiny model."""
    out = tmp_path / "out"
    p = ok(run("--out", out, *TINY, "--steps", "1", "--model", base / "hf"))
    assert "lr 0.001, micro-batch 4, dtype auto, c_h 0.05, β 0, minibatch 4" in p.stdout, p.stdout
    assert (out / "embedded_data").exists() and not (out / "sft").exists() and not (out / "embedded_model").exists()


def test_data_problems_are_said_or_refused(tmp_path, capsys):
    """Null or empty prompts and answers: dropped, counted, their rows named. --eval-size larger than what the data
    holds: said. An evaluation set that comes out empty: refused."""
    import train as train_module

    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    rows = [{"question": f"{i}+1=", "answer": str(i + 1)} for i in range(300)]
    rows[4]["question"], rows[17]["answer"], rows[250]["answer"] = None, "", "  "
    args = options.resolve_defaults(options.parse_args(train_module.Args, ["--dataset", str(write("d.jsonl", rows)),
                                                                             "--eval-size", "1000"]), 1)
    train_rows, evals = data.load_prompts(args, args.dataset)
    said = capsys.readouterr().out
    assert "dropped 3 of 300 rows whose 'question' or 'answer' is null or empty (rows 4, 17, 250)" in said, said
    assert "the last 59 of 297 training rows are held out for evaluation (fewer than --eval-size 1000: at most 20%)" \
        in said, said
    assert len(train_rows) == 238 and len(evals) == 59 and all(q != "None" for q, _ in train_rows)
    tiny = write("three.jsonl", rows[:3])
    args = options.resolve_defaults(options.parse_args(train_module.Args, ["--dataset", str(tiny)]), 1)
    with pytest.raises(distributed.UserError, match="3 usable training rows and no split 'test': too few to hold out"):
        data.load_prompts(args, args.dataset)
