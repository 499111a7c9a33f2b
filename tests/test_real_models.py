"""Real architectures on the --model path, offline: Qwen2.5's tokenizer rebuilt from its BPE ranks, a random Qwen2 (tied
embeddings, 151,936-row vocabulary) and a random Llama (untied head, 152,064 rows), saved with save_pretrained and
trained for 2 steps on 2 CPU ranks through the command line a GPU user types; the trainer's export (OUT/hf) is then
reloaded with the Auto classes. Fixtures: tests/real_models.py."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import real_models as rm
import torch
from helpers import free_port

REPO = Path(__file__).resolve().parents[1]

# The end-to-end runs: (model kind, algorithm, xfail reason or None). Extend this list to cover more combinations; give
# a run a reason string (it becomes pytest.mark.xfail(reason=..., strict=True): a fix makes it fail until the reason goes) while the trainer cannot run it.
E2E_RUNS = [  # PPO on Qwen2 (tied embeddings, a 151,936 vocabulary); a real Llama runs GRPO and PPO in test_smollm2.py
    # two micro-batches of 2 sequences per rank, gradients accumulating; activation checkpointing on every block
    ("qwen2", "ppo", ["--micro-batch-size", "2", "--gradient-checkpointing"], None),
]
SMOKE = ["--chat-template", "--steps", "2", "--prompts-per-step", "4", "--group-size", "2", "--max-new-tokens", "8",
         "--eval-size", "4", "--eval-every", "1", "--plot", "false",
         # math (the default) is 0 on every completion of a random model: add a reward that varies within each group
         "--reward", "math=1.0,real_models:varied_reward=1.0"]


@pytest.fixture(scope="module")
def tok():
    return rm.qwen_tokenizer()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("real_models")
    return {"qwen2": rm.save_qwen2(root / "qwen2"), "llama": rm.save_llama_large_vocab(root / "llama")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return rm.write_arithmetic_jsonl(tmp_path_factory.mktemp("data") / "arith.jsonl", 40)


# ---- the tokenizer -----------------------------------------------------------------------------------------------------
def test_tokenizer_matches_qwen25(tok):
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert tok.encode("<|im_start|>user\n") == [151644, 872, 198]  # "user" and "\n" as in Qwen's vocabulary
    assert tok.encode("12") == [16, 17]  # Qwen2 splits digits one at a time
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 151645, "<|endoftext|>", 151643)
    assert tok.bos_token is None and len(tok) == 151665


def test_chat_template(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 151644 and ids.count(151645) == 1 and ids[-3:-1] == [151644, 77091]  # 77091 = "assistant"
    assert not tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).endswith("assistant\n")


@pytest.mark.parametrize("text", ["What is 12 + 345? #### 357", "héllo wörld, naïve café", "日本語のテキスト 🙂 Привет",
                                  "  two  spaces\n\nand\ttabs 0.5%", "<|im_start|>user\nx<|im_end|>"])
def test_decode_encode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


# ---- save / load ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_save_load_round_trip(model_dirs, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = model_dirs[kind]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    cfg = model.config
    assert type(model).__name__ == {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[kind]
    assert cfg.vocab_size == {"qwen2": 151936, "llama": 152064}[kind] and len(tok) <= cfg.vocab_size
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.num_key_value_heads) == (151645, 151643, 2)
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == (kind == "qwen2")
    ids = tok("What is 3 + 4?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size) and torch.isfinite(logits).all()
    gen = GenerationConfig.from_pretrained(path)
    assert gen.do_sample and gen.eos_token_id == [151645, 151643] and gen.pad_token_id == 151643
    if kind == "qwen2":
        assert (gen.temperature, gen.top_p, gen.top_k, gen.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    else:
        assert (gen.temperature, gen.top_p) == (0.6, 0.9)


# ---- end to end: torchrun, 2 ranks, both algorithms, then export + reload ---------------------------------------------------
def torchrun(args: list[str], tmp: Path, timeout: int = 300) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_DATASETS_CACHE=str(tmp / "hf_cache"), TRAIN_COLLECTIVE_TIMEOUT_S="60",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(free_port()),
           "train.py", *args]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return p, time.perf_counter() - t0


@pytest.mark.parametrize("kind,algo,extra", [pytest.param(k, a, x, marks=[pytest.mark.xfail(reason=why, strict=True)] if why else [],
                                                          id=f"{k}-{a}") for k, a, x, why in E2E_RUNS])
def test_train_two_steps_two_ranks(model_dirs, dataset, tmp_path, kind, algo, extra):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = tmp_path / "out"
    p, seconds = torchrun(["--algo", algo, "--model", model_dirs[kind], "--dataset", dataset, "--out", str(out), *SMOKE, *extra], tmp_path)
    print(f"\n{kind}-{algo}: torchrun took {seconds:.1f} s")
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if line.strip()]
    train_rows = [r for r in rows if "reward_mean" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for r in train_rows:
        assert math.isfinite(r["reward_mean"]) and math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r
        assert r["grad_norm"] > 0 and r["skipped_updates"] == 0, r  # the varied reward moves the weights every step
        # the checkpoint's generation_config (top-k 20, top-p 0.8, repetition penalty 1.05) must not reach the sampler
        assert r.get("rollout_logprob_diff", 0.0) < 1e-3, r
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 1, 2]
    assert (out / "checkpoints" / "step_000002" / "meta.json").is_file()
    # the export: OUT/hf reloads as a fine-tuned checkpoint would, trained weights, the model's own generation config
    hf = out / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf)
    assert type(model).__name__ == {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[kind]
    assert model.config.vocab_size == AutoModelForCausalLM.from_pretrained(model_dirs[kind]).config.vocab_size
    initial, trained = load_file(Path(model_dirs[kind]) / "model.safetensors"), load_file(hf / "model.safetensors")
    assert initial.keys() <= trained.keys() and any(not torch.equal(initial[k], trained[k]) for k in initial)
    if model.config.tie_word_embeddings:  # one matrix, written once (Qwen2.5's tied lm_head is not stored twice)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert "lm_head.weight" not in trained
    assert GenerationConfig.from_pretrained(hf).to_dict() == GenerationConfig.from_pretrained(model_dirs[kind]).to_dict()
    assert tok("Hello world")["input_ids"] == [9707, 1879] and tok.eos_token_id == 151645
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.isfinite(model(**prompt).logits).all()
        new = model.generate(**prompt, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert prompt["input_ids"].shape[1] < new.shape[1] <= prompt["input_ids"].shape[1] + 3
    # identical greedy outputs: the exported model decodes the final evaluation's prompts exactly as the trainer did
    samples = [json.loads(line) for line in open(out / "eval_completions.jsonl")]
    assert len(samples) == 4
    eos = [151645, 151643]
    for s in samples:
        ids = tok(s["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 eos_token_id=eos, pad_token_id=tok.pad_token_id)[0, ids.shape[1] :].tolist()
        new = new[: next((i for i, t in enumerate(new) if t in eos), len(new))]
        assert tok.decode(new, skip_special_tokens=True) == s["completion"], s
