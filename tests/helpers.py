"""Helpers shared by the test modules (not a test file): free ports, the checks on what a user sees, tiny models."""

import shutil
import socket
import subprocess

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def one_error(p: subprocess.CompletedProcess, *, code: int | None = 2, torchrun: bool = False) -> str:
    """Exit `code` (any non-zero when None), exactly one line starting with `error:`, no traceback from train.py;
    returns that line. Under torchrun, torchrun's own report of the failed worker follows (a traceback of its own)."""
    assert p.returncode != 0 and (code is None or p.returncode == code), p.stdout[-2000:] + p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, p.stderr[-3000:]
    if torchrun:
        assert 'train.py", line' not in p.stderr, p.stderr[-3000:]
    else:
        assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return errors[0]


def main_error(capsys, *args) -> str:
    """train.main in this process, for the checks made before setup_distributed (no process group, nothing loaded)."""
    import train

    code = train.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def copy_base(base, out):
    """A fresh --out holding the warm start (OUT/sft) and the data of the run in `base`: reused, not rebuilt."""
    for d in ("sft", "embedded_data"):
        shutil.copytree(base / d, out / d)
    return out


def save_tiny_llama(path, chat_template: str | None = None) -> str:
    """A random tiny Llama (GQA, untied head, large init so log-probs are far from uniform) + the char tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import embedded_task

    tok = embedded_task.make_char_tokenizer()
    if chat_template:
        tok.chat_template = chat_template
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def step_on(run, rollout, scores, logprobs=None, values=None) -> dict:
    """train.rl_step on a rollout made here: train.sample and train.score are replaced (in this process, for this
    call) by functions returning `rollout` and `scores`; with `logprobs` = (old, ref), train.token_logprobs returns
    them, and with `values`, train.token_values does. The rest of the step (advantages, the epochs × minibatches
    loop, the optimizer steps, the logged row) is the trainer's own. Returns the logged row, plus "_advantages" and
    "_returns" as rl_step computed them."""
    import train

    seen, advantages = {}, train.compute_advantages

    def keep_advantages(run, batch):
        seen["_advantages"], seen["_returns"] = advantages(run, batch)
        return seen["_advantages"], seen["_returns"]

    patched = {"sample": lambda run, rows, repeat: rollout, "score": lambda run, batch, step: (scores, None),
               "compute_advantages": keep_advantages}
    if logprobs is not None:
        patched["token_logprobs"] = lambda run, model, batch: logprobs[0] if model is run.policy else logprobs[1]
    if values is not None:
        patched["token_values"] = lambda run, batch: values
    return rl_step_with(run, patched) | seen


def rl_step_with(run, patched: dict) -> dict:
    """train.rl_step(run, step=1) with some of train's functions replaced in this process for this call: `patched`
    maps a name of train (sample, score, compute_advantages, token_logprobs, token_values) to its stand-in."""
    import train

    originals = {name: getattr(train, name) for name in patched}
    try:
        for name, fn in patched.items():
            setattr(train, name, fn)
        return train.rl_step(run, step=1)
    finally:
        for name, fn in originals.items():
            setattr(train, name, fn)
