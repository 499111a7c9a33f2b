"""train.py — PPO and GRPO for language models: one loop, one process or many, CPU or GPU, FSDP2 throughout.

This file is the plumbing (config, torchrun/FSDP2, models, rollout, checkpoints, logging). The algorithms live in
gae.py, ppo.py, grpo.py, rewards.py, memory_ledger.py; the loop below reads like the documents' training loop
(document 002, "Implementation and Training Loop"; document 004, "PPO training loop: one iteration"):
sample G completions per prompt → score them → advantages (GAE with a critic for PPO, group-relative for GRPO)
→ a few epochs of clipped-surrogate steps, anchored to a frozen reference by a KL term.

Run manual
----------
One process (CPU, the embedded offline task; a few minutes on 2 cores):
    python train.py --algo grpo
Several processes on one machine (gloo on CPU, NCCL with bf16 mixed precision on GPUs), the same code path:
    torchrun --nproc_per_node 2 train.py --algo ppo
A Hugging Face model and dataset (GSM8K's `question` / `answer` columns are the defaults):
    torchrun --nproc_per_node 8 train.py --algo grpo --model Qwen/Qwen2.5-0.5B-Instruct --dataset openai/gsm8k \
        --dataset-config main --max-new-tokens 512 --group-size 8 --prompts-per-step 64 --lr 1e-6 --beta 0.04
Two nodes (run on each node, same rendezvous endpoint):
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py --algo grpo ...
Resume the newest complete checkpoint in --out with the same arguments plus --resume (a run without --resume
refuses an --out that already holds checkpoints, rather than overwrite them).

Outputs in --out: metrics.jsonl (one JSON object per line), memory.json, checkpoints/step_XXXXXX (DCP),
curves.png (when matplotlib is installed).

Shape legend: B sequences on this rank (prompts × G), P prompt tokens (left-padded), T completion tokens
(padded to --max-new-tokens), S = P + T, V vocabulary.
"""

import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

import gae
import grpo
import memory_ledger
import ppo
import rewards as rewards_lib


warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # FSDP2 on HF heads: we never write in place


class UserError(Exception):
    """A problem with the user's input: printed as one line by rank 0, exit code 2 on every rank, no traceback."""


# ======================================================================================================================
# Config
# ======================================================================================================================
def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    algo: str = arg("grpo", "grpo or ppo")
    model: str = arg("", "hub name or local dir of a causal LM; empty = build the embedded tiny model offline")
    dataset: str = arg("", "hub name, local dir, or .json/.jsonl/.parquet/.csv file; empty = embedded arithmetic")
    dataset_config: str = arg("", "dataset configuration name (e.g. 'main' for openai/gsm8k)")
    split: str = arg("train", "split used for training prompts")
    eval_split: str = arg("test", "split for evaluation; when missing, the last --eval-size training rows are held out")
    eval_size: int = arg(200, "number of evaluation prompts (greedy decoding)")
    prompt_column: str = arg("question", "dataset column holding the prompt")
    answer_column: str = arg("answer", "dataset column holding the reference answer")
    prompt_template: str = arg("{prompt}", "format string applied to each prompt ({prompt} is replaced)")
    chat_template: bool = arg(False, "wrap prompts with the tokenizer's chat template")
    reward: str = arg("math", "weighted rewards: 'math=1.0,format=0.2', names from rewards.py or module:function")
    reward_model: str = arg("", "optional frozen sequence-classification reward model (hub name or local dir)")
    reward_model_weight: float = arg(1.0, "weight of the reward model's score in the total reward")
    group_size: int = arg(8, "G: completions sampled per prompt")
    prompts_per_step: int = arg(64, "prompts per step, across all ranks (must divide by the number of ranks)")
    max_new_tokens: int = arg(6, "T: the most completion tokens per sample")
    temperature: float = arg(1.0, "sampling temperature (log-probs are taken under the same tempered policy)")
    mask_truncated: bool = arg(False, "drop completions that hit --max-new-tokens without EOS from the loss")
    lr: float = arg(None, "policy learning rate (AdamW); default 1e-3 for the embedded tiny model, 1e-6 for --model")
    critic_lr: float = arg(None, "critic learning rate (PPO); default 5x --lr (the critic lags: document 004, section 10)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping (global norm)")
    lr_schedule: str = arg("linear", "linear (decay to 0 at --steps) | constant")
    beta: float = arg(0.0, "KL coefficient to the frozen reference (0 = no reference model is loaded)")
    eps: float = arg(0.2, "clip range ε of the surrogate")
    vf_coef: float = arg(0.5, "c_v: weight of the critic loss (PPO)")
    ent_coef: float = arg(None, "c_h: entropy bonus; default 0.05 (GRPO) or 0.08 (PPO) on the embedded model, 0 with --model")
    value_clip: float = arg(0.0, "PPO value clipping range (0 = off)")
    epochs: int = arg(1, "inner epochs over one rollout batch")
    minibatch_size: int = arg(256, "sequences per optimizer step across all ranks")
    gamma: float = arg(1.0, "GAE discount γ (PPO)")
    lam: float = arg(1.0, "GAE λ (PPO); 1 (verl's default) = return minus V, unbiased for a sparse terminal reward")
    whiten_advantages: bool = arg(True, "whiten PPO advantages over the batch")
    loss_agg: str = arg("seq-mean-token-mean", "seq-mean-token-mean (GRPO) | token-mean (DAPO) | seq-mean-token-sum-norm (Dr.GRPO)")
    scale_rewards: bool = arg(True, "GRPO: divide by the group std (False = Dr.GRPO)")
    steps: int = arg(400, "RL steps (one rollout batch each)")
    eval_every: int = arg(50, "evaluate every this many steps (and at step 0)")
    save_every: int = arg(100, "checkpoint every this many steps (0 = only at the end)")
    keep_checkpoints: int = arg(2, "complete checkpoints kept")
    sft_steps: int = arg(300, "embedded task only: supervised warm-start steps (the SFT checkpoint)")
    seed: int = arg(0, "random seed")
    out: str = arg("", "output directory (default out/<algo>)")
    resume: bool = arg(False, "resume from the newest complete checkpoint in --out")
    dtype: str = arg("auto", "auto (bf16 mixed precision on GPU, fp32 on CPU) | fp32 | bf16")
    plot: bool = arg(True, "write curves.png when matplotlib is installed")


# Arguments that change what a checkpoint means: resuming with different ones is refused.
RESUME_KEYS = ("steps", "lr_schedule", "algo", "model", "dataset", "dataset_config", "group_size", "prompts_per_step", "max_new_tokens",
               "reward", "reward_model", "beta", "loss_agg", "seed", "sft_steps")


def parse_args(argv=None) -> Args:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), nargs="?", const=True,
                           default=f.default, help=f.metadata["help"])
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(flag, type=typ, default=f.default, help=f.metadata["help"])

    def error(message: str):  # one `error: ...` line instead of argparse's usage block
        raise UserError(f"{message} (see --help)")

    p.error = error
    a = Args(**vars(p.parse_args(argv)))
    a.out = a.out or os.path.join("out", a.algo)
    return a


def check_args(a: Args, world_size: int) -> None:
    """Everything that can be checked before loading anything heavy."""
    if a.algo not in ("grpo", "ppo"):
        raise UserError(f"--algo must be 'grpo' or 'ppo', not {a.algo!r}")
    if a.algo == "grpo" and a.group_size < 2:
        raise UserError("--group-size must be at least 2 for GRPO: the group std (and a group baseline) needs 2 samples")
    if a.group_size < 1 or a.prompts_per_step < 1 or a.steps < 0 or a.epochs < 1:
        raise UserError("--group-size, --prompts-per-step and --epochs must be positive, --steps non-negative")
    if a.prompts_per_step % world_size:
        raise UserError(f"--prompts-per-step {a.prompts_per_step} is not divisible by the {world_size} ranks")
    batch = a.prompts_per_step * a.group_size
    if a.minibatch_size % world_size or batch % a.minibatch_size:
        raise UserError(f"--minibatch-size {a.minibatch_size} must divide the batch ({a.prompts_per_step} prompts × "
                        f"{a.group_size} = {batch}) and be divisible by the {world_size} ranks")
    if a.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, not {a.max_new_tokens}")
    if (a.lr is not None and not a.lr > 0) or (a.critic_lr is not None and not a.critic_lr > 0):
        raise UserError(f"learning rates must be positive (--lr {a.lr}, --critic-lr {a.critic_lr})")
    if not (a.temperature > 0 and a.eps > 0 and a.beta >= 0):
        raise UserError("--temperature and --eps must be positive and --beta non-negative")
    if a.eval_every < 1 or a.save_every < 0 or a.keep_checkpoints < 1 or a.eval_size < 0:
        raise UserError("--eval-every and --keep-checkpoints must be positive, --save-every and --eval-size non-negative")
    try:
        a.prompt_template.format(prompt="")
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"--prompt-template {a.prompt_template!r} is not a format string with only {{prompt}}: {e!r}") from None
    for flag, name in (("--model", a.model), ("--reward-model", a.reward_model), ("--dataset", a.dataset)):
        # a hub id is 'name' or 'org/name'; anything else that does not exist cannot be loaded
        looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith((".json", ".jsonl", ".parquet", ".csv"))
        if name and looks_local and not os.path.exists(os.path.expanduser(name)):
            raise UserError(f"{flag} {name!r}: no such file or directory")
    if a.loss_agg not in grpo.LOSS_AGGREGATIONS:
        raise UserError(f"--loss-agg must be one of {', '.join(grpo.LOSS_AGGREGATIONS)}, not {a.loss_agg!r}")
    if a.lr_schedule not in ("linear", "constant"):
        raise UserError(f"--lr-schedule must be linear or constant, not {a.lr_schedule!r}")
    if a.dtype not in ("auto", "fp32", "bf16"):
        raise UserError(f"--dtype must be auto, fp32 or bf16, not {a.dtype!r}")
    load_reward_functions(a.reward)  # names and weights
    try:
        os.makedirs(a.out, exist_ok=True)
        probe = os.path.join(a.out, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--out {a.out!r} cannot be written: {e.strerror or e}") from None
    check_resume(a)


def fill_model_defaults(a: Args) -> Args:
    """Options left unset get a value that depends on the model: tuned on the embedded tiny task (README, "What
    tuning showed"), or a common value for a pretrained LLM with --model."""
    embedded = not a.model
    if a.lr is None:
        a.lr = 1e-3 if embedded else 1e-6
    if a.critic_lr is None:
        a.critic_lr = 5 * a.lr  # verl's defaults give the critic 10x (1e-5 vs 1e-6); 5x beat 2x on the tiny task
    if a.ent_coef is None:
        # the tiny policy's entropy collapses without it (PPO stalled at 0.785 once with 0.05); LLMs: verl's default 0
        a.ent_coef = (0.08 if a.algo == "ppo" else 0.05) if embedded else 0.0
    return a


def check_resume(a: Args) -> None:
    """--resume needs a complete checkpoint written with the same RESUME_KEYS; a fresh run never overwrites one."""
    path = latest_checkpoint(a.out)
    if not a.resume:
        if path is not None:
            raise UserError(f"--out {a.out!r} already holds checkpoint {path}: add --resume to continue that run, "
                            "or choose another --out")
        return
    if path is None:
        raise UserError(f"--resume: no complete checkpoint in {os.path.join(a.out, 'checkpoints')}")
    try:
        saved = json.load(open(os.path.join(path, "meta.json")))["args"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--resume: cannot read {os.path.join(path, 'meta.json')}: {e!r}") from None
    diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} → {getattr(a, k)!r}" for k in RESUME_KEYS if saved.get(k) != getattr(a, k)]
    if diff:
        raise UserError(f"--resume: checkpoint {path} was written with other arguments: {'; '.join(diff)}")


def load_reward_functions(spec: str) -> list:
    """[(name, weight, fn(completion, answer) -> float)] from 'math=1,format=0.2' or 'my_module:my_fn=0.5'.

    Built-in names and their weights are parsed by rewards.parse_reward_spec; module:function terms are imported here.
    """
    terms = [t.strip() for t in spec.split(",") if t.strip()]
    custom = [t for t in terms if ":" in t.partition("=")[0]]
    builtin = ",".join(t for t in terms if t not in custom)
    try:
        out = [(n, w, rewards_lib.REWARD_FUNCTIONS[n]) for n, w in (rewards_lib.parse_reward_spec(builtin) if builtin else [])]
    except ValueError as e:
        raise UserError(f"--reward: {e} (or module:function)") from None
    for term in custom:
        name, _, w = (x.strip() for x in term.partition("="))
        try:
            weight = float(w) if w else 1.0
            module, _, fn = name.partition(":")
            out.append((name, weight, getattr(importlib.import_module(module), fn)))
        except ValueError:
            raise UserError(f"--reward: weight {w!r} of {name!r} is not a number") from None
        except (ImportError, AttributeError) as e:
            raise UserError(f"--reward: cannot import {name!r}: {e}") from None
    if not out:
        raise UserError("--reward is empty")
    return out


# ======================================================================================================================
# Distributed setup: `python train.py` is a world of one, through the same code path as torchrun
# ======================================================================================================================
def setup_distributed() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:  # plain `python train.py`: a one-process group
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=int(os.environ.get("TRAIN_COLLECTIVE_TIMEOUT_S", 1800)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce(x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x, op=op)
    return x


def stop_if_any_rank(error: UserError | None, device) -> None:
    """Collective: when any rank hit an error of its own, every rank raises it (exit 2, none left waiting in a
    collective), with the message of the lowest such rank, so that rank 0 prints it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    first = int(all_reduce(torch.tensor([rank if error else world], device=device), op=dist.ReduceOp.MIN).item())
    if first < world:
        message = [str(error) if rank == first else None]
        dist.broadcast_object_list(message, src=first)
        raise UserError(message[0])


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from all ranks along dim 0 (rank order)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def seed_for(*keys: int) -> int:
    """A seed derived from (seed, step, rank, ...): every step's randomness is a pure function of its indices,
    so a resumed run replays exactly what the uninterrupted run would have done, with no RNG state to save."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:7], "little")


# ======================================================================================================================
# The embedded default: a tiny Llama, a character tokenizer and an arithmetic task, all built offline
# ======================================================================================================================
TASK_LO, TASK_HI = 0, 30  # operands of "a+b=" are drawn from [TASK_LO, TASK_HI)
TINY = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4)  # 109k parameters


def make_arithmetic_dataset(path: str, seed: int, n_eval: int) -> None:
    """Write train.jsonl / test.jsonl of 'a+b=' prompts with GSM8K-style column names, loaded later by load_dataset."""
    rng = np.random.default_rng(seed)
    pairs = [(a, b) for a in range(TASK_LO, TASK_HI) for b in range(TASK_LO, TASK_HI)]
    order = rng.permutation(len(pairs))
    rows = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a, b in (pairs[i] for i in order)]
    os.makedirs(path, exist_ok=True)
    for name, part in (("test.jsonl", rows[:n_eval]), ("train.jsonl", rows[n_eval:])):
        with open(os.path.join(path, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)


def make_char_tokenizer():
    """A character-level tokenizer as a real transformers tokenizer (save_pretrained / AutoTokenizer work)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    chars = list("0123456789+-*=# ")
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def build_embedded_model(path: str, a: Args, data_dir: str) -> None:
    """Build the tiny policy, warm-start it with a short supervised phase (the SFT checkpoint), save_pretrained.

    The warm start teaches the answer format and part of the task; RL has to do the rest (README, "Figures").
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(a.seed)
    tok = make_char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), **TINY, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    rows = [json.loads(line) for line in open(os.path.join(data_dir, "train.jsonl"))]
    texts = [(r["question"], r["answer"]) for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(a.seed)
    for _ in range(a.sft_steps):
        batch = [texts[i] for i in rng.integers(0, len(texts), 64)]
        ids = [tok(q)["input_ids"] + tok(ans)["input_ids"] + [tok.eos_token_id] for q, ans in batch]
        n_prompt = [len(tok(q)["input_ids"]) for q, _ in batch]
        L = max(map(len, ids))
        x = torch.full((len(ids), L), tok.pad_token_id)  # (B, S)
        labels = torch.full((len(ids), L), -100)  # (B, S) loss on answer tokens only
        for i, (seq, n) in enumerate(zip(ids, n_prompt)):
            x[i, : len(seq)] = torch.tensor(seq)
            labels[i, n : len(seq)] = torch.tensor(seq[n:])
        loss = model(input_ids=x, attention_mask=(x != tok.pad_token_id).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    tmp = path + f".tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path) if not os.path.exists(path) else shutil.rmtree(tmp)


def prepare_embedded(a: Args, rank: int) -> tuple[str, str]:
    """Rank 0 writes the dataset files and the SFT model under --out; the others wait. Reused when present."""
    data_dir, model_dir = os.path.join(a.out, "embedded_data"), os.path.join(a.out, "sft_model")
    if rank == 0:
        if not os.path.exists(os.path.join(data_dir, "test.jsonl")):
            make_arithmetic_dataset(data_dir, a.seed, min(a.eval_size, 200))
        if not os.path.exists(model_dir):
            print(f"building the embedded tiny model and warm-starting it ({a.sft_steps} supervised steps)", flush=True)
            build_embedded_model(model_dir, a, data_dir)
    dist.barrier()
    return data_dir, model_dir


# ======================================================================================================================
# Data: datasets.load_dataset on a hub name, a local directory or a local file
# ======================================================================================================================
def load_split(a: Args, name: str, split: str):
    """One split through datasets.load_dataset; None when that split does not exist. Any other failure is a UserError."""
    import datasets

    ext = os.path.splitext(name)[1].lower().lstrip(".")
    builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(ext)
    local_file = builder and os.path.isfile(name)
    if local_file and os.path.getsize(name) == 0:
        raise UserError(f"dataset {name!r} is empty: no rows to train on")
    try:
        if local_file:  # a single local file is the train split
            if split != a.split:
                return None
            return datasets.load_dataset(builder, data_files=name, split="train")
        return datasets.load_dataset(name, a.dataset_config or None, split=split)
    except ValueError as e:
        if "split" in str(e).lower() and "unknown" in str(e).lower() and split != a.split:
            return None
        if "corresponds to no data" in str(e):  # e.g. a CSV file with a header only
            raise UserError(f"dataset {name!r} (split {split!r}) is empty: no rows") from None
        raise UserError(f"cannot load dataset {name!r} (split {split!r}): {str(e).splitlines()[0]}") from None
    except Exception as e:  # the hub, the file system and the parsers raise many kinds
        raise UserError(f"cannot load dataset {name!r} (split {split!r}): {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None


def load_prompts(a: Args, name: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(prompt, answer) rows for training and evaluation, columns checked by name."""
    train = load_split(a, name, a.split)
    evals = load_split(a, name, a.eval_split) if a.eval_split else None
    if len(train) == 0:
        raise UserError(f"dataset {name!r} (split {a.split!r}) is empty: no rows to train on")
    for ds in filter(None, (train, evals)):
        missing = [c for c in (a.prompt_column, a.answer_column) if c not in ds.column_names]
        if missing:
            raise UserError(f"dataset {name!r} has no column {missing[0]!r}; its columns are {ds.column_names} "
                            "(choose them with --prompt-column / --answer-column)")
    rows = [(a.prompt_template.format(prompt=str(p)), str(ans)) for p, ans in zip(train[a.prompt_column], train[a.answer_column])]
    if evals is not None:
        eval_rows = [(a.prompt_template.format(prompt=str(p)), str(s)) for p, s in zip(evals[a.prompt_column], evals[a.answer_column])]
    else:  # hold out the last rows of the training split
        n = min(a.eval_size, len(rows) // 5)
        rows, eval_rows = rows[: len(rows) - n], rows[len(rows) - n :]
    if not rows:
        raise UserError(f"dataset {name!r} (split {a.split!r}) has no rows to train on")
    return rows, eval_rows[: a.eval_size]


# ======================================================================================================================
# Models: transformers classes, FSDP2 on every transformer block and on the root
# ======================================================================================================================
def load_model(kind: str, path: str, dtype: torch.dtype):
    """AutoModelForCausalLM (policy, reference), ...ForTokenClassification (critic), ...ForSequenceClassification (RM)."""
    import transformers

    cls = {"causal": transformers.AutoModelForCausalLM, "critic": transformers.AutoModelForTokenClassification,
           "reward": transformers.AutoModelForSequenceClassification}[kind]
    kwargs = {} if kind == "causal" else {"num_labels": 1}
    try:
        transformers.logging.set_verbosity_error()  # the critic's fresh head is expected, not news
        model = cls.from_pretrained(path, dtype=dtype, **kwargs)
    except Exception as e:
        raise UserError(f"cannot load model {path!r} as {cls.__name__}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if kind == "critic":  # document 004, "Initialization": the critic starts from the SFT model; V ≡ 0 at first
        head = getattr(model, "score", None) or getattr(model, "classifier")
        torch.nn.init.zeros_(head.weight)
        if getattr(head, "bias", None) is not None:
            torch.nn.init.zeros_(head.bias)
    return model


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise UserError(f"cannot load a tokenizer from {path!r}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if tok.pad_token is None:  # common for base models: pad with EOS (the completion mask never uses pad ids)
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token is None:
        raise UserError(f"tokenizer of {path!r} has neither a pad, an EOS nor an UNK token to pad with")
    tok.padding_side = "left"  # decoder-only generation continues from the right edge
    return tok


def shard(model: torch.nn.Module, mixed_precision: bool) -> torch.nn.Module:
    """fully_shard each transformer block, then the root (FSDP2). bf16 compute, fp32 master weights and reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


@contextlib.contextmanager
def unsharded(model: torch.nn.Module):
    """Gather the policy's parameters once for a whole rollout, instead of once per generated token.

    Without this, every decoding step's forward would all-gather every block and reshard it afterwards.
    """
    from torch.distributed.fsdp import FSDPModule

    blocks = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    for m in blocks:
        m.set_reshard_after_forward(False, recurse=False)
    for m in [model] + blocks:
        m.unshard()
    try:
        yield model
    finally:
        for m in [model] + blocks:
            m.reshard()
        for m in blocks:
            m.set_reshard_after_forward(True, recurse=False)


def sequence_logprobs(model, input_ids, attention_mask, n_prompt: int, temperature: float, with_entropy: bool = False):
    """log π(token_{t+1} | tokens_≤t) for the completion tokens, with the one-token shift: the logits at position
    p score the token at p + 1, so completion token t (at position P + t) is scored by the logits at P + t − 1."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, S) left padding: first real token at 0
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits  # (B, S, V)
    logits = logits[:, n_prompt - 1 : -1].float() / temperature  # (B, T, V) the tempered policy that sampled
    targets = input_ids[:, n_prompt:]  # (B, T)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, T)
    return (logprobs, ppo.entropy_from_logits(logits)) if with_entropy else (logprobs, None)


def critic_values(critic, input_ids, attention_mask, n_prompt: int) -> torch.Tensor:
    """V(s_t) for each completion token t: the critic's output at position P + t − 1, the state before token t."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, S)
    out = critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits  # (B, S, 1)
    return out[:, n_prompt - 1 : -1, 0].float()  # (B, T)


# ======================================================================================================================
# Rollout: sample G completions per prompt, score them
# ======================================================================================================================
@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, S) prompt (left-padded) + completion (right-padded to T)
    attention_mask: torch.Tensor  # (B, S)
    mask: torch.Tensor  # (B, T) completion tokens up to and including the first EOS
    n_prompt: int  # P
    texts: list  # B decoded completions
    truncated: torch.Tensor  # (B,) no EOS within max_new_tokens


def tokenize_prompts(tok, prompts: list[str], a: Args, device) -> tuple[torch.Tensor, torch.Tensor]:
    if a.chat_template:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                   for p in prompts]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=not a.chat_template)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)  # (B, P), (B, P)


@torch.no_grad()
def generate(policy, tok, prompts: list[str], a: Args, device, greedy: bool = False, repeat: int = 1) -> Rollout:
    """Sample (or greedily decode) max_new_tokens per prompt with transformers' generate, parameters gathered once."""
    prompt_ids, prompt_mask = tokenize_prompts(tok, prompts, a, device)  # (B, P)
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(repeat, 0), prompt_mask.repeat_interleave(repeat, 0)
    P, T = prompt_ids.shape[1], a.max_new_tokens
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=a.temperature, top_k=0, top_p=1.0)
    with unsharded(policy):
        out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=T, min_new_tokens=0,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True,
                              synced_gpus=False, **sampling)  # gathered already: no collective per token
    completion = out[:, P:]  # (B, ≤T) generate stops early when every row has finished
    completion = torch.nn.functional.pad(completion, (0, T - completion.shape[1]), value=tok.pad_token_id)  # (B, T)
    is_eos = completion == tok.eos_token_id  # (B, T)
    first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(is_eos[:, 0], T, dtype=torch.long))  # (B,)
    mask = (torch.arange(T, device=device)[None, :] <= first_eos[:, None]).float()  # (B, T) through the first EOS
    texts = [tok.decode(c[: int(e)].tolist(), skip_special_tokens=True) for c, e in zip(completion, first_eos)]
    completion = torch.where(mask.bool(), completion, torch.full_like(completion, tok.pad_token_id))  # (B, T)
    input_ids = torch.cat([prompt_ids, completion], 1)  # (B, S)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(completion)], 1)  # (B, S)
    return Rollout(input_ids, attention_mask, mask, P, texts, first_eos >= T)


def score(rollout: Rollout, answers: list[str], prompts: list[str], reward_fns: list, reward_model, rm_tok,
          a: Args, step: int, device) -> torch.Tensor:
    """Sequence rewards R_i = Σ_k w_k·reward_k(completion_i, answer_i) (+ w·reward model).

    A reward that raises or is not finite, on any rank, stops every rank before anything reaches the optimizer; the
    first such rank names the reward and the sample (numbered across ranks, as in the global batch)."""
    total = torch.zeros(len(rollout.texts), dtype=torch.float32)
    first = dist.get_rank() * len(rollout.texts)  # global number of this rank's first sample
    problem = None
    for name, weight, fn in reward_fns:
        for i, (text, answer) in enumerate(zip(rollout.texts, answers)):
            try:
                value = float(fn(text, answer))
            except Exception as e:
                problem = UserError(f"reward {name!r} raised {type(e).__name__}: {' '.join(str(e).split())[:200]} on "
                                    f"sample {first + i} of step {step} (completion {text[:60]!r})")
                break
            if not math.isfinite(value):
                problem = UserError(f"reward {name!r} returned {value} on sample {first + i} of step {step} "
                                    f"(completion {text[:60]!r}); rewards must be finite")
                break
            total[i] += weight * value
        if problem is not None:
            break
    stop_if_any_rank(problem, device)
    if reward_model is not None:
        rm = rewards_lib.score_with_reward_model(reward_model, rm_tok, prompts, rollout.texts).float().cpu()
        bad = (~torch.isfinite(rm)).nonzero()
        stop_if_any_rank(UserError(f"the reward model returned {rm[int(bad[0])].item()} on sample {first + int(bad[0])} "
                                   f"of step {step}") if len(bad) else None, device)
        total += a.reward_model_weight * rm
    return total.to(device)  # (B,)


# ======================================================================================================================
# Checkpoints: torch.distributed.checkpoint into a .partial directory, renamed only when complete
# ======================================================================================================================
def latest_checkpoint(out: str) -> str | None:
    """The newest complete checkpoint directory (a name without .partial, holding meta.json), or None."""
    root = os.path.join(out, "checkpoints")
    done = [d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".partial")
            and os.path.exists(os.path.join(root, d, "meta.json"))] if os.path.isdir(root) else []
    return os.path.join(root, max(done)) if done else None


def atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(a: Args, step: int, trainables: dict, rank: int) -> None:
    """A kill at any point leaves either the previous checkpoint or the new complete one, never a torn one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = os.path.join(a.out, "checkpoints")
    final, partial = os.path.join(root, f"step_{step:06d}"), os.path.join(root, f"step_{step:06d}.partial")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    state = {}
    for name, (model, opt) in trainables.items():
        state[name], state[name + "_optim"] = get_state_dict(model, opt)
    dcp.save(state, checkpoint_id=partial)
    if fault_now("kill", step):  # the test-suite's kill during a save: shards written, not yet committed
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    if rank == 0:
        atomic_write(os.path.join(partial, "meta.json"), json.dumps({"step": step, "args": dataclasses.asdict(a)}))
        os.replace(partial, final)  # the commit point: a directory rename is atomic
        kept = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".partial"))
        for old in kept[: -a.keep_checkpoints]:  # renamed to .partial first: a kill mid-delete leaves nothing loadable
            doomed = os.path.join(root, old + ".partial")
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(os.path.join(root, old), doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    dist.barrier()


def load_checkpoint(a: Args, trainables: dict) -> int:
    """Restore models and optimizers from the newest complete checkpoint (its arguments were checked by check_resume);
    .partial directories left by a kill during a save are removed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = latest_checkpoint(a.out)
    meta = json.load(open(os.path.join(path, "meta.json")))
    if dist.get_rank() == 0:
        for d in os.listdir(os.path.dirname(path)):
            if d.endswith(".partial"):
                shutil.rmtree(os.path.join(os.path.dirname(path), d), ignore_errors=True)
    state = {}
    for name, (model, opt) in trainables.items():
        state[name], state[name + "_optim"] = get_state_dict(model, opt)
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as e:  # a checkpoint damaged after it was committed, or written by another model
        raise UserError(f"--resume: cannot load checkpoint {path}: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    for name, (model, opt) in trainables.items():
        set_state_dict(model, opt, model_state_dict=state[name], optim_state_dict=state[name + "_optim"])
    return int(meta["step"])


class MetricsLog:
    """metrics.jsonl, written by rank 0 only; on resume, rows after the checkpoint's step are dropped first."""

    def __init__(self, path: str, rank: int, resume_step: int | None):
        self.path, self.rank = path, rank
        if rank == 0 and resume_step is not None and os.path.exists(path):
            # a step writes its train row, then its eval row, then its checkpoint: rows ≤ the step are complete lines;
            # a line torn by a kill (no trailing newline) came after the checkpoint
            atomic_write(path, "".join(line for line in open(path) if line.endswith("\n") and line.strip()
                                       and json.loads(line)["step"] <= resume_step))
        elif rank == 0 and resume_step is None:
            atomic_write(path, "")

    def write(self, row: dict) -> None:
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in row.items()}) + "\n")


# ======================================================================================================================
# The algorithm: one RL step = rollout → rewards → advantages → epochs of clipped updates
# ======================================================================================================================
@torch.no_grad()
def evaluate(policy, tok, eval_rows, a: Args, rank: int, world: int, device) -> float:
    """Greedy accuracy (the 'math' reward equals 1) on the fixed evaluation prompts, split across ranks."""
    mine = eval_rows[rank::world]
    correct = torch.zeros(2, device=device)  # [correct, total]
    for i in range(0, math.ceil(len(eval_rows) / world), 64):  # the same number of generate calls on every rank
        chunk = mine[i : i + 64]
        ro = generate(policy, tok, [p for p, _ in chunk] or [eval_rows[0][0]], a, device, greedy=True)
        correct[0] += sum(rewards_lib.math_reward(t, ans) == 1.0 for t, (_, ans) in zip(ro.texts, chunk))
        correct[1] += len(chunk)
    correct = all_reduce(correct)
    return (correct[0] / correct[1].clamp(min=1)).item()


@torch.no_grad()
def compute_advantages(a: Args, ro: Rollout, scores, old_logprobs, ref_logprobs, values):
    """GRPO: A_i = (R_i − mean_group)/(std_group + ε) on each rank's whole groups (grpo.group_advantages).
    PPO: per-token rewards with the KL folded in (ppo.kl_shaped_rewards), then GAE (gae.compute_gae), whitened
    over the global batch. Returns (advantages (B,) or (B, T), returns (B, T) or None)."""
    if a.algo == "grpo":
        adv = grpo.group_advantages(scores.view(-1, a.group_size), scale=a.scale_rewards)  # (B/G, G)
        return adv.reshape(-1), None  # (B,)
    ref = ref_logprobs if ref_logprobs is not None else old_logprobs  # β = 0: no shaping
    token_rewards = ppo.kl_shaped_rewards(scores, old_logprobs, ref, ro.mask, a.beta)  # (B, T)
    adv, returns = gae.compute_gae(token_rewards, values, ro.mask, gamma=a.gamma, lam=a.lam)  # (B, T), (B, T)
    if a.whiten_advantages:  # statistics over every rank's tokens, so 1 rank and N ranks agree
        full = gae.whiten(all_gather_cat(adv), all_gather_cat(ro.mask))  # (W·B, T)
        adv = full.view(dist.get_world_size(), *adv.shape)[dist.get_rank()]  # (B, T)
    return adv, returns


def update(a: Args, ro: Rollout, adv, returns, old_logprobs, ref_logprobs, old_values, policy, critic, opts, step,
           world: int, mem_probe=None) -> dict:
    """Epochs × minibatches of clipped-surrogate steps on one rollout batch. Non-finite gradients skip the step."""
    B = ro.input_ids.shape[0]
    mb = a.minibatch_size // world  # sequences per rank per optimizer step
    stats, skipped = [], 0
    for epoch in range(a.epochs):
        order = torch.randperm(B, generator=torch.Generator().manual_seed(seed_for(a.seed, step, epoch, dist.get_rank())))
        for start in range(0, B, mb):
            idx = order[start : start + mb].to(ro.input_ids.device)
            ids, att, m = ro.input_ids[idx], ro.attention_mask[idx], ro.mask[idx]  # (b, S), (b, S), (b, T)
            n_tok = max(all_reduce(m.sum()).item(), 1.0) / world  # global token count / W: FSDP averages gradients
            logprobs, entropy = sequence_logprobs(policy, ids, att, ro.n_prompt, a.temperature, with_entropy=True)
            if a.algo == "grpo":
                out = grpo.grpo_loss(logprobs, old_logprobs[idx], adv[idx], m, None if ref_logprobs is None else ref_logprobs[idx],
                                     eps=a.eps, beta=a.beta, loss_agg=a.loss_agg, max_len=a.max_new_tokens,
                                     num_sequences=mb, num_tokens=n_tok)
                out["entropy"] = ppo.masked_mean(entropy, m, n_tok)
                loss = out["loss"] - a.ent_coef * out["entropy"]
                out.pop("kl", None)  # the logged kl is the rollout's KL to the reference (step_metrics)
                ratio = torch.exp(logprobs - old_logprobs[idx]).detach()  # (b, T)
                out.update(clipfrac=ppo.clip_fraction(ratio, adv[idx].unsqueeze(-1), m, a.eps, a.eps, num_tokens=n_tok),
                           approx_kl=ppo.approx_kl(logprobs.detach(), old_logprobs[idx], m, num_tokens=n_tok))
            else:
                values = critic_values(critic, ids, att, ro.n_prompt)  # (b, T)
                out = ppo.ppo_loss(logprobs, old_logprobs[idx], adv[idx], m, values=values, returns=returns[idx],
                                   old_values=old_values[idx], entropy=entropy, eps=a.eps, vf_coef=a.vf_coef,
                                   ent_coef=a.ent_coef, value_clip=a.value_clip or None, num_tokens=n_tok)
                loss = out["loss"]
            if fault_now("nan", step):
                loss = loss * float("nan")
            loss.backward()
            norms = [grad_norm(model, a.max_grad_norm) for model in (policy, critic) if model is not None]
            if all(math.isfinite(n) for n in norms):
                for opt in opts:
                    opt.step()
            else:
                skipped += 1
            if mem_probe is not None:  # after the first step: gradients and optimizer state both exist
                mem_probe()
                mem_probe = None
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            stats.append({k: float(v.detach()) for k, v in out.items() if k != "loss"} | {"loss": loss.item(), "grad_norm": norms[0]})
    avg = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}
    return avg | {"skipped_updates": skipped}


def grad_norm(model, max_norm: float) -> float:
    """Clip the global gradient norm (FSDP2 DTensors reduce across ranks) and return it, identical on every rank."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def fault_now(kind: str, step: int, rank: int | None = None) -> bool:
    """Fault injection for the test-suite only: TRAIN_FAULT="nan:STEP" (NaN loss), "raise:RANK:STEP" (one rank
    raises) or "kill:STEP" (SIGKILL inside that step's checkpoint save, before it is committed)."""
    spec = os.environ.get("TRAIN_FAULT", "").split(":")
    if spec[0] != kind:
        return False
    return int(spec[-1]) == step and (rank is None or int(spec[1]) == rank)


def run(a: Args, rank: int, world: int, device: torch.device) -> None:
    fill_model_defaults(a)  # every caller of run() gets the same unset-option values
    mixed = a.dtype == "bf16" or (a.dtype == "auto" and device.type == "cuda")
    log = print if rank == 0 else (lambda *args, **kw: None)
    # ---- data and models -------------------------------------------------------------------------------------------
    tok = load_tokenizer(a.model) if a.model else None  # a model that cannot be found fails before any embedded build
    data_dir, model_dir = prepare_embedded(a, rank) if not (a.model and a.dataset) else (None, None)
    model_path, dataset = a.model or model_dir, a.dataset or data_dir
    tok = tok if tok is not None else load_tokenizer(model_path)
    train_rows, eval_rows = load_prompts(a, dataset)
    reward_fns = load_reward_functions(a.reward)
    policy = load_model("causal", model_path, torch.float32)
    context = getattr(policy.config, "max_position_embeddings", None)
    lengths = tokenize_prompts(tok, [p for p, _ in train_rows + eval_rows], a, "cpu")[1].sum(1).tolist()  # one batch
    for i, n in enumerate(lengths):
        if context and n + a.max_new_tokens > context:
            raise UserError(f"prompt {i} has {n} tokens; with --max-new-tokens {a.max_new_tokens} it exceeds the "
                            f"model's context of {context} tokens (shorten it or lower --max-new-tokens)")
    shapes = {"policy": [tuple(p.shape) for p in policy.parameters()]}
    policy = shard(policy, mixed).eval()  # .eval(): no dropout, so log-probs at rollout and update agree
    ref = shard(load_model("causal", model_path, torch.float32), mixed).eval().requires_grad_(False) if a.beta > 0 else None
    critic = None
    if a.algo == "ppo":
        critic = load_model("critic", model_path, torch.float32)
        shapes["critic"] = [tuple(p.shape) for p in critic.parameters()]
        critic = shard(critic, mixed).eval()
    reward_model = rm_tok = None
    if a.reward_model:
        reward_model = shard(load_model("reward", a.reward_model, torch.float32), mixed).eval().requires_grad_(False)
        rm_tok = load_tokenizer(a.reward_model)
    opts = [torch.optim.AdamW(policy.parameters(), lr=a.lr, weight_decay=a.weight_decay)]
    trainables = {"policy": (policy, opts[0])}
    if critic is not None:
        opts.append(torch.optim.AdamW(critic.parameters(), lr=a.critic_lr, weight_decay=a.weight_decay))
        trainables["critic"] = (critic, opts[1])
    start = load_checkpoint(a, trainables) if a.resume else 0
    metrics = MetricsLog(os.path.join(a.out, "metrics.jsonl"), rank, start if a.resume else None)
    # ---- the memory ledger's prediction for this run, per rank; measured after the first optimizer step ---------------
    accounting = "fsdp2_mixed" if mixed else "fp32"
    predicted = {name: memory_ledger.per_rank_bytes_exact(shapes=s, world_size=world, rank=rank, accounting=accounting)["total"]
                 for name, s in shapes.items()}
    memory = {"rank": rank, "world_size": world, "accounting": accounting, "predicted_bytes": predicted}

    def mem_probe():
        memory["measured_bytes"] = {n: memory_ledger.measure_state_bytes(m, o)["total"] for n, (m, o) in trainables.items()}
        log("memory per rank (rank 0): " + ", ".join(f"{n} ledger {predicted[n] / 2**20:.3f} MiB / measured "
            f"{memory['measured_bytes'][n] / 2**20:.3f} MiB" for n in predicted), flush=True)
        if rank == 0:
            atomic_write(os.path.join(a.out, "memory.json"), json.dumps(memory, indent=1))

    log(f"{a.algo} | {world} rank(s) on {device.type} | policy {sum(map(math.prod, shapes['policy'])):,} params | "
        f"{len(train_rows)} train / {len(eval_rows)} eval prompts | ledger (fp32 state, per rank): "
        + ", ".join(f"{n} {b / 2**20:.3f} MiB" for n, b in predicted.items()), flush=True)
    if start == 0:
        acc = evaluate(policy, tok, eval_rows, a, rank, world, device)
        metrics.write({"step": 0, "eval_accuracy": acc})
        log(f"step 0 eval_accuracy {acc:.3f}", flush=True)
    # ---- the loop ----------------------------------------------------------------------------------------------------
    from tqdm import tqdm

    per_rank = a.prompts_per_step // world
    bar = tqdm(range(start + 1, a.steps + 1), disable=rank != 0, desc=a.algo, dynamic_ncols=True)
    for step in bar:
        for opt, base in zip(opts, (a.lr, a.critic_lr)):  # a pure function of the step: nothing to checkpoint
            for group in opt.param_groups:
                group["lr"] = base * (1 - (step - 1) / a.steps if a.lr_schedule == "linear" else 1.0)
        t0 = time.perf_counter()
        torch.manual_seed(seed_for(a.seed, step, rank))  # sampling noise: a pure function of (seed, step, rank)
        picks = np.random.default_rng(seed_for(a.seed, step)).choice(len(train_rows), a.prompts_per_step,
                                                                      replace=len(train_rows) < a.prompts_per_step)
        mine = [train_rows[i] for i in picks[rank * per_rank : (rank + 1) * per_rank]]
        prompts = [p for p, _ in mine for _ in range(a.group_size)]  # B = prompts × G, groups contiguous
        answers = [ans for _, ans in mine for _ in range(a.group_size)]
        # 1. sample G completions per prompt under π_θold
        ro = generate(policy, tok, [p for p, _ in mine], a, device, repeat=a.group_size)
        t1 = time.perf_counter()
        if fault_now("raise", step, rank):
            raise RuntimeError(f"injected fault on rank {rank} at step {step} (TRAIN_FAULT)")
        # 2. score them
        scores = score(ro, answers, prompts, reward_fns, reward_model, rm_tok, a, step, device)  # (B,)
        t2 = time.perf_counter()
        # 3. log-probs under π_θold and π_ref, values under V_φold
        with torch.no_grad():
            old_logprobs = sequence_logprobs(policy, ro.input_ids, ro.attention_mask, ro.n_prompt, a.temperature)[0]
            ref_logprobs = sequence_logprobs(ref, ro.input_ids, ro.attention_mask, ro.n_prompt, a.temperature)[0] if ref else None
            old_values = critic_values(critic, ro.input_ids, ro.attention_mask, ro.n_prompt) if critic else None
        # 4. advantages
        adv, returns = compute_advantages(a, ro, scores, old_logprobs, ref_logprobs, old_values)
        if a.mask_truncated:
            ro.mask = ro.mask * (~ro.truncated).float()[:, None]  # (B, T) overlong completions leave the loss
        t3 = time.perf_counter()
        # 5. epochs of clipped-surrogate updates
        stats = update(a, ro, adv, returns, old_logprobs, ref_logprobs, old_values, policy, critic, opts, step, world,
                       mem_probe if "measured_bytes" not in memory else None)
        t4 = time.perf_counter()
        row = step_metrics(a, ro, scores, old_logprobs, ref_logprobs, old_values, returns, stats, world)
        row |= {"time_generate_s": t1 - t0, "time_score_s": t2 - t1, "time_forward_s": t3 - t2, "time_update_s": t4 - t3,
                "step_time_s": t4 - t0, "tokens_per_s": row.pop("_tokens") / (t4 - t0)}
        metrics.write({"step": step} | row)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl']:.4f}" if row["kl"] is not None else "-")
        if step % a.eval_every == 0 or step == a.steps:
            acc = evaluate(policy, tok, eval_rows, a, rank, world, device)
            metrics.write({"step": step, "eval_accuracy": acc})
            bar.write(f"step {step} eval_accuracy {acc:.3f} reward_mean {row['reward_mean']:.3f}") if rank == 0 else None
        if (a.save_every and step % a.save_every == 0) or step == a.steps:
            save_checkpoint(a, step, trainables, rank)
    bar.close()
    if rank == 0 and a.plot:
        plot_curves(a.out)


def step_metrics(a: Args, ro: Rollout, scores, old_logprobs, ref_logprobs, old_values, returns, stats, world) -> dict:
    """The logged row: global reductions over all ranks (metric glossary in README.md)."""
    all_scores = all_gather_cat(scores)  # (W·B,)
    groups = all_scores.view(-1, a.group_size)  # (W·B/G, G)
    lengths = all_gather_cat(ro.mask.sum(1))  # (W·B,)
    row = {"reward_mean": all_scores.mean().item(), "reward_std": all_scores.std().item() if len(all_scores) > 1 else 0.0,
           "frac_reward_zero_std": (groups.std(1) == 0).float().mean().item() if a.group_size > 1 else 1.0,
           "completion_len_mean": lengths.mean().item(), "_tokens": lengths.sum().item(), "kl": None}
    if ref_logprobs is not None:
        kl = all_reduce(torch.stack([(grpo.kl_k3(old_logprobs, ref_logprobs) * ro.mask).sum(), ro.mask.sum()]))
        row["kl"] = (kl[0] / kl[1].clamp(min=1)).item()
    keys = sorted(stats)
    averaged = all_reduce(torch.tensor([stats[k] for k in keys], dtype=torch.float64)) / world
    row |= dict(zip(keys, averaged.tolist()))
    row["skipped_updates"] = int(round(row["skipped_updates"] * world))  # identical on every rank
    if a.algo == "ppo":
        ev = ppo.explained_variance(all_gather_cat(old_values), all_gather_cat(returns), all_gather_cat(ro.mask))
        row["explained_variance"] = ev.item()
    return row


def plot_curves(out: str) -> None:
    """curves.png: reward and eval accuracy against step (skipped when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if line.strip()]
    train = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "eval_accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["reward_mean"] for r in train], label="reward_mean (train, sampled)")
    ax.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", label="eval_accuracy (greedy)")
    ax.set_xlabel("step")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    rank = int(os.environ.get("RANK", 0))
    try:
        a = parse_args(argv)
        check_args(a, int(os.environ.get("WORLD_SIZE", 1)))  # before anything heavy
        rank, world, device = setup_distributed()
        run(a, rank, world, device)
        code = 0
    except UserError as e:
        if rank == 0:
            from tqdm import tqdm

            tqdm.write("error: " + " ".join(str(e).splitlines()), file=sys.stderr)  # on its own line, below any progress bar
            sys.stderr.flush()
        code = 2
    if dist.is_initialized():
        if code == 0:
            dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
