"""plumbing.py — everything train.py needs that is not the algorithm: options, torchrun + FSDP2, models, data,
checkpoints, export, logging. A reader of the RL step never needs to open this file; one who runs it on a cluster does.

Contents, in order: options (parse, check, resume rules) · distributed (process group, collectives on the group's
device) · the embedded offline task · data · tokenizer and models (rank-0 load + broadcast, FSDP2, activation
checkpointing, the neutral sampler) · checkpoints and export · metrics log, memory, plots.
"""

import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import types
import typing
import warnings

import numpy as np
import torch
import torch.distributed as dist

import rewards as rewards_lib

warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # FSDP2 on HF heads: we never write in place


class UserError(Exception):
    """A problem with the user's input: printed as one line by rank 0, exit code 2 on every rank, no traceback."""


# ======================================================================================================================
# Options: parsed from the Args dataclass in train.py, checked before anything heavy is loaded
# ======================================================================================================================
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def strict_bool(text: str) -> bool:
    if text.lower() in TRUE + FALSE:
        return text.lower() in TRUE
    raise ValueError(text)


strict_bool.__name__ = "boolean (true/false)"  # argparse names the type in its error: "invalid boolean (true/false) value"


def parse_args(args_class, argv=None):
    """argparse from the dataclass: one --flag per field, its help from the field's metadata, choices from Literal."""
    import argparse

    class Formatter(argparse.HelpFormatter):  # print a default only when there is one worth printing
        def _get_help_string(self, action):
            shown = action.default not in (None, "", argparse.SUPPRESS) and "default" not in action.help
            text = action.help + (f" (default: {action.default})" if shown else "")
            return text.replace("%", "%%")  # argparse %-formats the help: a literal % ("±20%") must be doubled

    p = argparse.ArgumentParser(prog="train.py", description=sys.modules[args_class.__module__].__doc__.split("\n")[0],
                                formatter_class=Formatter)
    hints = typing.get_type_hints(args_class)
    for f in dataclasses.fields(args_class):
        flag, typ, kw = "--" + f.name.replace("_", "-"), hints[f.name], {}
        if typing.get_origin(typ) in (typing.Union, types.UnionType):  # X | None
            typ = next(t for t in typing.get_args(typ) if t is not type(None))
        if typing.get_origin(typ) is typing.Literal:  # also Literal[...] | None, e.g. --loss-agg
            typ, kw = str, {"choices": typing.get_args(typ)}
        if typ is bool:  # --flag, --flag true|false (anything else is an error, not False)
            p.add_argument(flag, type=strict_bool, nargs="?", const=True, default=f.default, help=f.metadata["help"])
        else:
            p.add_argument(flag, type=typ, default=f.default, help=f.metadata["help"], **kw)

    def error(message: str):  # one `error: ...` line instead of argparse's usage block
        choice = re.fullmatch(r"argument (--[\w-]+): invalid choice: (.*) \(choose from (.*)\)", message)
        if choice:  # "--algo must be 'grpo' or 'ppo', not 'sac'"
            flag, value, options = choice.groups()
            options = [repr(o.strip().strip("'")) for o in options.split(",")]
            raise UserError(f"{flag} must be {', '.join(options[:-1])} or {options[-1]}, not {value.strip(chr(39))!r}")
        raise UserError(f"{message} (see --help)")

    p.error = error
    return args_class(**vars(p.parse_args(argv)))


def fill_model_defaults(args, world_size: int = 1):
    """Options left unset get a value that depends on the model and the algorithm: tuned on the embedded tiny task
    (README, "What tuning showed"), or a common value for a pretrained LLM with --model. Explicit values always win."""
    embedded = not args.model
    args.out = args.out or os.path.join("out", args.algo)
    if args.lr is None:
        args.lr = 1e-3 if embedded else 1e-6
    if args.critic_lr is None:
        args.critic_lr = 5 * args.lr  # verl's defaults give the critic 10x (1e-5 vs 1e-6); 5x beat 2x on the tiny task
    if args.ent_coef is None:
        # the tiny policy's entropy collapses without it (PPO stalled at 0.785 once with 0.05); LLMs: verl's default 0
        args.ent_coef = (0.08 if args.algo == "ppo" else 0.05) if embedded else 0.0
    if args.loss_agg is None:  # PPO's loss is document 000's token mean E_t; GRPO's document 001's per-sequence mean
        args.loss_agg = "token-mean" if args.algo == "ppo" else "seq-mean-token-mean"
    if args.minibatch_size is None:  # the whole rollout batch, at most 256 sequences per optimizer step
        batch = args.prompts_per_step * args.group_size
        args.minibatch_size = next(m for m in range(min(256, batch), 0, -1) if batch % m == 0 and m % world_size == 0) \
            if batch % world_size == 0 else batch
    if args.micro_batch_size is None:  # see README, "GPU": 8 sequences of 512 tokens keep a 0.5B-7B model in 80 GB
        per_rank = max(1, args.minibatch_size // world_size)
        args.micro_batch_size = per_rank if embedded else max(m for m in range(1, min(8, per_rank) + 1) if per_rank % m == 0)
    return args


def check_args(args, world_size: int) -> None:
    """Everything that can be checked before loading anything heavy: batch shapes, values, names; then --out."""
    check_batch_shapes(args, world_size)
    check_values(args)
    load_reward_functions(args.reward)  # names and weights
    check_resume(args)  # before --out is created: a refused --resume leaves nothing behind
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--out {args.out!r} cannot be written: {e.strerror or e}") from None


def check_batch_shapes(args, world_size: int) -> None:
    if args.algo == "grpo" and args.group_size < 2:
        raise UserError("--group-size must be at least 2 for GRPO: the group std (and a group baseline) needs 2 samples")
    if args.group_size < 1 or args.prompts_per_step < 1 or args.steps < 0 or args.epochs < 1:
        raise UserError("--group-size, --prompts-per-step and --epochs must be positive, --steps non-negative")
    if args.prompts_per_step % world_size:
        raise UserError(f"--prompts-per-step {args.prompts_per_step} is not divisible by the {world_size} ranks")
    batch = args.prompts_per_step * args.group_size
    if args.minibatch_size < 1 or args.minibatch_size % world_size or batch % args.minibatch_size:
        raise UserError(f"--minibatch-size {args.minibatch_size} must divide the batch ({args.prompts_per_step} prompts × "
                        f"{args.group_size} = {batch}) and be divisible by the {world_size} ranks")
    per_rank = args.minibatch_size // world_size
    if args.micro_batch_size < 1 or per_rank % args.micro_batch_size:
        raise UserError(f"--micro-batch-size {args.micro_batch_size} must be positive and divide the per-rank minibatch "
                        f"({args.minibatch_size} sequences / {world_size} ranks = {per_rank})")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")


def check_values(args) -> None:
    if (args.lr is not None and not args.lr > 0) or (args.critic_lr is not None and not args.critic_lr > 0):
        raise UserError(f"learning rates must be positive (--lr {args.lr}, --critic-lr {args.critic_lr})")
    if not (args.temperature > 0 and args.eps > 0 and args.beta >= 0):
        raise UserError("--temperature and --eps must be positive and --beta non-negative")
    if args.eps_high is not None and args.eps_high < args.eps:
        raise UserError(f"--eps-high {args.eps_high} must be at least --eps {args.eps} (clip-higher widens the upper side)")
    if args.dual_clip and not args.dual_clip > 1:
        raise UserError(f"--dual-clip {args.dual_clip} must be greater than 1 (it caps −c·A for A < 0; 0 = off)")
    if args.kl_target and (args.beta <= 0 or args.kl_horizon <= 0):
        raise UserError("--kl-target adapts β from its start --beta: give --beta > 0 (and --kl-horizon > 0)")
    if args.algo == "ppo" and args.loss_agg != "token-mean":
        raise UserError(f"--loss-agg {args.loss_agg}: PPO's loss is the token mean of document 000 (E_t over every "
                        "completion token); the other aggregations are GRPO's")
    if args.eval_every < 1 or args.save_every < 0 or args.keep_checkpoints < 1 or args.eval_size < 0:
        raise UserError("--eval-every and --keep-checkpoints must be positive, --save-every and --eval-size non-negative")
    if "{prompt}" not in args.prompt_template:
        raise UserError(f"--prompt-template {args.prompt_template!r} has no {{prompt}}: every prompt would be the same text")
    try:
        args.prompt_template.format(prompt="")
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"--prompt-template {args.prompt_template!r} is not a format string with only {{prompt}}: {e!r}") from None
    if not (0 <= args.sft_target <= 1 and args.sft_steps >= 0):
        raise UserError(f"--sft-target {args.sft_target} must be an accuracy in [0, 1] and --sft-steps {args.sft_steps} "
                        "non-negative")
    if args.chat_template and not args.model:
        raise UserError("--chat-template: the embedded tiny model's character tokenizer has no chat template")
    for flag, name in (("--model", args.model), ("--reward-model", args.reward_model), ("--dataset", args.dataset)):
        # a hub id is 'name' or 'org/name'; anything else that does not exist cannot be loaded
        looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith((".json", ".jsonl", ".parquet", ".csv"))
        if name and looks_local and not os.path.exists(os.path.expanduser(name)):
            raise UserError(f"{flag} {name!r}: no such file or directory")


def unescape(template: str) -> str:
    """--prompt-template 'Q: {prompt}\\nA:' typed in a shell: \\n and \\t become a newline and a tab, \\\\ a backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], template)


# What a resumed run may change. REFUSED: options that define the experiment (a different run, not a continuation).
# ANNOUNCED: hyperparameters a user may retune mid-run; the change is printed as one line and recorded in the next
# checkpoint. Anything else (--out, --plot, --micro-batch-size, --gradient-checkpointing, ...) changes no number.
RESUME_REFUSED = ("algo", "model", "dataset", "dataset_config", "split", "eval_split", "eval_size", "prompt_column",
                  "answer_column", "prompt_template", "chat_template", "reward", "reward_model", "reward_model_weight",
                  "group_size", "prompts_per_step", "max_new_tokens", "seed", "sft_steps", "sft_target", "dtype",
                  "loss_agg", "kl_estimator", "scale_rewards", "whiten_advantages", "mask_truncated", "gamma", "lam", "temperature")
RESUME_ANNOUNCED = ("steps", "lr", "critic_lr", "lr_schedule", "weight_decay", "max_grad_norm", "beta", "eps", "eps_high",
                    "dual_clip", "vf_coef", "ent_coef", "value_clip", "epochs", "minibatch_size", "target_kl", "kl_target",
                    "kl_horizon")


def check_resume(args) -> None:
    """--resume needs a complete checkpoint and may not change an option of RESUME_REFUSED; a fresh run never
    overwrites a checkpoint."""
    path = latest_checkpoint(args.out)
    if not args.resume:
        if path is not None:
            raise UserError(f"--out {args.out!r} already holds checkpoint {path}: add --resume to continue that run, "
                            "or choose another --out")
        return
    if path is None:
        raise UserError(f"--resume: no complete checkpoint in {os.path.join(args.out, 'checkpoints')}")
    saved = read_meta(path)["args"]
    diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} → {getattr(args, k)!r}" for k in RESUME_REFUSED if saved.get(k) != getattr(args, k)]
    if diff:
        raise UserError(f"--resume: checkpoint {path} was written with other arguments: {'; '.join(diff)} "
                        "(these define the experiment; start a new --out, e.g. from the exported policy --model OUT/hf)")


def resume_changes(args, saved: dict, step: int) -> list[str]:
    """One line per announced option that differs from the checkpoint's, e.g. "--lr 0.001 → 0.05 from step 4"."""
    unused = ("critic_lr", "vf_coef", "value_clip") if args.algo == "grpo" else ()  # no critic: --lr moves the unset critic_lr
    lines = [f"--{k.replace('_', '-')} {saved.get(k)!r} → {getattr(args, k)!r} from step {step + 1}"
             for k in RESUME_ANNOUNCED if k in saved and k not in unused and saved.get(k) != getattr(args, k)]
    if args.steps != saved.get("steps") and args.lr_schedule == "linear" and args.steps > step:  # else nothing runs
        lines.append(f"the linear learning-rate decay is re-planned to reach 0 after step {args.steps}: "
                     f"lr × {1 - step / args.steps:.4f} at step {step + 1} (it was × {max(0.0, 1 - (step - 1) / saved['steps']):.4f} at step {step})")
    return lines


def load_reward_functions(spec: str) -> list:
    """[(name, weight, fn(completion, answer) -> float)] from 'math=1,format=0.2' or 'my_module:my_fn=0.5'.

    Built-in names and their weights are parsed by rewards.parse_reward_spec; module:function terms are imported here,
    from the working directory first (as `python -m` would), then from sys.path.
    """
    terms = [t.strip() for t in spec.split(",") if t.strip()]
    custom = [t for t in terms if ":" in t.partition("=")[0]]
    builtin = ",".join(t for t in terms if t not in custom)
    try:
        out = [(n, w, rewards_lib.REWARD_FUNCTIONS[n]) for n, w in (rewards_lib.parse_reward_spec(builtin) if builtin else [])]
    except ValueError as e:
        raise UserError(f"--reward: {e} (or module:function)") from None
    if custom and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
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
# Distributed: `python train.py` is a world of one, through the same code path as torchrun. Every collective of the
# trainer goes through the helpers below, which move the tensor to the process group's device (CUDA for NCCL, CPU
# for gloo) and bring the result back to the caller's device.
# ======================================================================================================================
def setup_distributed() -> tuple[int, int, torch.device]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=int(os.environ.get("TRAIN_COLLECTIVE_TIMEOUT_S", 1800)))
    # plain `python train.py`: a one-process group on an in-memory store (no port to find, none to collide on)
    alone = {} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout, **alone)
    return dist.get_rank(), dist.get_world_size(), device


def group_device() -> torch.device:
    """The device the default process group communicates on: the current CUDA device for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """The reduction of x over ranks (x itself is not modified), on x's device."""
    y = x.detach().to(group_device(), copy=True)
    dist.all_reduce(y, op=op)
    return y.to(x.device)


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Equal-shaped tensors from all ranks, concatenated along dim 0 in rank order, on x's device."""
    y = x.detach().to(group_device()).contiguous()
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y)
    return torch.cat(parts).to(x.device)


def global_sum(*values: float) -> list[float]:
    """Σ over ranks of a few Python numbers (float64 on the group's device)."""
    return all_reduce(torch.tensor(values, dtype=torch.float64, device=group_device())).tolist()


def all_gather_objects(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)  # pickled, sent on the group's device (torch.cuda.current_device for NCCL)
    return out


def stop_if_any_rank(error: UserError | None) -> None:
    """Collective: when any rank hit an error of its own, every rank raises it (exit 2, none left waiting in a
    collective), with the message of the lowest such rank, so that rank 0 prints it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    first = int(all_reduce(torch.tensor([rank if error else world]), op=dist.ReduceOp.MIN).item())
    if first < world:
        raise UserError(all_gather_objects(str(error) if rank == first else None)[first])


def seed_for(*keys: int) -> int:
    """A seed derived from (seed, step, rank, ...): every step's randomness is a pure function of its indices,
    so a resumed run replays exactly what the uninterrupted run would have done, with no RNG state to save."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:7], "little")


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA kernels, so that a time.perf_counter() reading after it includes them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


SFT_HELD_OUT, SFT_CHECK_EVERY = 200, 10  # warm-start accuracy: this many training prompts kept out of SFT, checked this often


def greedy_accuracy(model, tok, rows: list[dict]) -> float:
    """Fraction of rows whose greedy completion (at most 6 new tokens) gets the 'math' reward 1."""
    import rewards

    model.eval()
    side, tok.padding_side = tok.padding_side, "left"
    enc = tok([r["question"] for r in rows], return_tensors="pt", padding=True)
    tok.padding_side = side
    with torch.no_grad():
        out = model.generate(**enc, generation_config=neutral_generation_config(6, None, [tok.eos_token_id], tok.pad_token_id))
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train()
    return float(np.mean([rewards.math_reward(t, r["answer"]) == 1.0 for t, r in zip(texts, rows)]))


def build_embedded_model(path: str, args, data_dir: str) -> float:
    """Build the tiny policy, warm-start it with a supervised phase (the SFT checkpoint), save_pretrained.

    The warm start is defined by what it reaches, not by a step count: supervised steps run until greedy accuracy
    on SFT_HELD_OUT training prompts that the supervised phase never sees reaches --sft-target (checked every
    SFT_CHECK_EVERY steps; --sft-steps caps the phase). A fixed step count would stop wherever the steep part of the
    supervised curve happens to be on that CPU's floats: 300 steps gave 0.20 on one machine and 0.25 on another,
    and seed 1 gave 0.32 on this one. Returns the accuracy reached.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    tok = make_char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), **TINY, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    rows = [json.loads(line) for line in open(os.path.join(data_dir, "train.jsonl"))]
    held_out, rows = rows[:SFT_HELD_OUT], rows[SFT_HELD_OUT:]  # RL trains on all of them later
    pairs = [(tok(r["question"])["input_ids"], tok(r["answer"])["input_ids"] + [tok.eos_token_id]) for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(args.seed)
    done, accuracy = 0, greedy_accuracy(model, tok, held_out)
    while accuracy < args.sft_target and done < args.sft_steps:
        batch = [pairs[i] for i in rng.integers(0, len(pairs), 64)]
        L = max(len(q) + len(a) for q, a in batch)
        x = torch.full((len(batch), L), tok.pad_token_id)  # (B, S)
        labels = torch.full((len(batch), L), -100)  # (B, S) loss on answer tokens only
        for i, (q, a) in enumerate(batch):
            x[i, : len(q) + len(a)] = torch.tensor(q + a)
            labels[i, len(q) : len(q) + len(a)] = torch.tensor(a)
        loss = model(input_ids=x, attention_mask=(x != tok.pad_token_id).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        done += 1
        if done % SFT_CHECK_EVERY == 0 or done == args.sft_steps:
            accuracy = greedy_accuracy(model, tok, held_out)
    print(f"warm start: {done} supervised steps, greedy accuracy {accuracy:.3f} on {len(held_out)} held-out training prompts "
          f"(--sft-target {args.sft_target}" + ("" if accuracy >= args.sft_target else ", not reached: capped by --sft-steps")
          + ")", flush=True)
    tmp = path + f".tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path) if not os.path.exists(path) else shutil.rmtree(tmp)
    return accuracy


def prepare_embedded(args, rank: int) -> tuple[str, str]:
    """Rank 0 writes the dataset files and the SFT model under --out; the others wait. Reused when present."""
    data_dir, model_dir = os.path.join(args.out, "embedded_data"), os.path.join(args.out, "sft_model")
    if rank == 0:
        if not os.path.exists(os.path.join(data_dir, "test.jsonl")):
            make_arithmetic_dataset(data_dir, args.seed, 200)
        if not os.path.exists(model_dir):
            print(f"building the embedded tiny model and warm-starting it (to --sft-target {args.sft_target})", flush=True)
            build_embedded_model(model_dir, args, data_dir)
    dist.barrier()
    return data_dir, model_dir


# ======================================================================================================================
# Data: datasets.load_dataset on a hub name, a local directory or a local file
# ======================================================================================================================
def load_split(args, name: str, split: str):
    """One split through datasets.load_dataset; None when that split does not exist. Any other failure is a UserError."""
    import datasets

    ext = os.path.splitext(name)[1].lower().lstrip(".")
    builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(ext)
    local_file = builder and os.path.isfile(name)
    if local_file and os.path.getsize(name) == 0:
        raise UserError(f"dataset {name!r} is empty: no rows to train on")
    try:
        if local_file:  # a single local file is the train split
            return datasets.load_dataset(builder, data_files=name, split="train") if split == args.split else None
        return datasets.load_dataset(name, args.dataset_config or None, split=split)
    except ValueError as e:
        if "split" in str(e).lower() and "unknown" in str(e).lower() and split != args.split:
            return None
        if "corresponds to no data" in str(e):  # e.g. a CSV file with a header only
            raise UserError(f"dataset {name!r} (split {split!r}) is empty: no rows") from None
        raise UserError(f"cannot load dataset {name!r} (split {split!r}): {str(e).splitlines()[0]}") from None
    except Exception as e:  # the hub, the file system and the parsers raise many kinds
        raise UserError(f"cannot load dataset {name!r} (split {split!r}): {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None


def load_prompts(args, name: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(prompt, answer) rows for training and evaluation, columns checked by name. With --eval-size 0 no evaluation
    split is read; without an evaluation split the last rows of the training split are held out."""
    train = load_split(args, name, args.split)
    evals = load_split(args, name, args.eval_split) if args.eval_split and args.eval_size else None
    if len(train) == 0:
        raise UserError(f"dataset {name!r} (split {args.split!r}) is empty: no rows to train on")
    for ds in filter(None, (train, evals)):
        missing = [c for c in (args.prompt_column, args.answer_column) if c not in ds.column_names]
        if missing:
            raise UserError(f"dataset {name!r} has no column {missing[0]!r}; its columns are {ds.column_names} "
                            "(choose them with --prompt-column / --answer-column)")
    template = unescape(args.prompt_template)
    rows_of = lambda ds: [(template.format(prompt=str(p)), str(a)) for p, a in zip(ds[args.prompt_column], ds[args.answer_column])]
    rows, eval_rows = rows_of(train), rows_of(evals) if evals is not None else []
    if evals is None and args.eval_size:  # hold out the last rows of the training split
        n = min(args.eval_size, len(rows) // 5)
        rows, eval_rows = rows[: len(rows) - n], rows[len(rows) - n :]
    if not rows:
        raise UserError(f"dataset {name!r} (split {args.split!r}) has no rows to train on")
    return rows, eval_rows[: args.eval_size]


# ======================================================================================================================
# Tokenizer and models: transformers classes; each rank builds its model on the meta device, rank 0 alone reads the
# checkpoint and broadcasts it into the FSDP2 shards (no rank but 0 ever holds a full copy in host memory)
# ======================================================================================================================
def looks_like_hub_id(name: str) -> bool:
    return not os.path.exists(os.path.expanduser(name)) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def check_hub_reachable(flag: str, name: str) -> None:
    """A hub id that is not in the local cache needs the Hub: say at once when it cannot be reached (or offline mode
    forbids it), instead of letting the download retry for a minute or fail with a message about connecting."""
    if not looks_like_hub_id(name):
        return
    from urllib.parse import urlsplit

    from huggingface_hub import constants, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except ValueError:  # not a valid repo id (huggingface_hub's HFValidationError): the loader names the problem
        return
    offline = [k for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")]
    if offline:
        raise UserError(f"{flag} {name!r} is not a local directory and not in the Hugging Face cache, and {offline[0]}="
                        f"{os.environ[offline[0]]} forbids downloading it: check the name (a local directory needs a path "
                        f"that exists)")
    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError:
        raise UserError(f"{flag} {name!r} is not a local directory, not in the Hugging Face cache, and the Hub "
                        f"({host}:{port}) cannot be reached: check the name, or download it where there is a network") from None


def load_tokenizer(path: str, chat_template: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise UserError(f"cannot load a tokenizer from {path!r}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if chat_template and not tok.chat_template:
        raise UserError(f"--chat-template: the tokenizer of {path!r} has no chat template (a base model?); "
                        "drop --chat-template or use --prompt-template")
    if tok.pad_token is None:  # common for base models: pad with EOS (the completion mask never uses pad ids)
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token is None:
        raise UserError(f"tokenizer of {path!r} has neither a pad, an EOS nor an UNK token to pad with")
    tok.padding_side = "left"  # decoder-only generation continues from the right edge
    return tok


MODEL_CLASSES = {"causal": "AutoModelForCausalLM", "critic": "AutoModelForTokenClassification",
                 "reward": "AutoModelForSequenceClassification"}


def load_full_model(kind: str, path: str, dtype: torch.dtype):
    """The whole model in host memory: AutoModelForCausalLM (policy, reference), ...ForTokenClassification (critic,
    its head zeroed: document 004 "Initialization", from the SFT model with V ≡ 0 at first), ...ForSequenceClassification."""
    import transformers

    cls = getattr(transformers, MODEL_CLASSES[kind])
    try:
        transformers.logging.set_verbosity_error()  # the critic's fresh head is expected, not news
        model = cls.from_pretrained(path, dtype=dtype, **({} if kind == "causal" else {"num_labels": 1}))
    except Exception as e:
        raise UserError(f"cannot load model {path!r} as {cls.__name__}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if kind == "critic":
        head = getattr(model, "score", None) or getattr(model, "classifier")
        torch.nn.init.zeros_(head.weight)
        if getattr(head, "bias", None) is not None:
            torch.nn.init.zeros_(head.bias)
    return model


def load_sharded(kind: str, path: str, dtype: torch.dtype, device, mixed: bool, checkpointing: bool = False):
    """Build on the meta device, shard with FSDP2, allocate the shards on `device`, then fill them from rank 0's copy
    of the checkpoint (set_model_state_dict(..., broadcast_from_rank0=True)); buffers (RoPE frequencies) are copied
    from rank 0 too. Returns (model, parameter shapes before sharding, the checkpoint's generation config or None).

    One process in fp32 has nothing to shard and no precision to manage, so the model stays a plain module there:
    FSDP2 would still copy every parameter into and out of its flat buffers around each forward and backward and run
    AdamW over DTensors (on the tiny model, AdamW 7.9 ms sharded against 2.6 ms plain). Every other path (checkpoints,
    export, gradient clipping, generation) is the same code for both."""
    import transformers
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full, error = None, None
    if dist.get_rank() == 0:
        try:
            full = load_full_model(kind, path, dtype)
        except UserError as e:
            error = e
    stop_if_any_rank(error)
    config = transformers.AutoConfig.from_pretrained(path, **({} if kind == "causal" else {"num_labels": 1}))
    with torch.device("meta"):
        model = getattr(transformers, MODEL_CLASSES[kind]).from_config(config, dtype=dtype)
    shapes = [tuple(p.shape) for p in model.parameters()]
    if checkpointing:
        checkpoint_blocks(model)
    plain = dist.get_world_size() == 1 and not mixed  # mixed: FSDP2's MixedPrecisionPolicy is what casts to bf16
    if not plain:
        shard(model, mixed)
    model.to_empty(device=device)
    if plain:
        model.tie_weights()  # to_empty gave the tied embedding and LM head a tensor each (FSDP2 keeps them one)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full.state_dict() if full is not None else {}, options=options)
    for name, buf in model.named_buffers():  # non-persistent buffers (RoPE inv_freq) are not in the state dict
        if full is not None:
            buf.copy_(full.get_buffer(name))
        buf.copy_(broadcast_from_rank0(buf))
    generation_config = getattr(full, "generation_config", None) if full is not None else None
    return model.eval(), shapes, all_gather_objects(generation_config)[0] if kind == "causal" else None


def broadcast_from_rank0(t: torch.Tensor) -> torch.Tensor:
    y = t.detach().to(group_device(), copy=True)
    dist.broadcast(y, src=0)
    return y.to(t.device)


def shard(model: torch.nn.Module, mixed_precision: bool) -> torch.nn.Module:
    """fully_shard each transformer block, then the root (FSDP2). bf16 compute, fp32 master weights and reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def transformer_blocks(model: torch.nn.Module) -> list:
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing on every transformer block, whatever the module's train/eval mode (transformers' own
    gradient_checkpointing_enable() only acts in train mode, and ours stay in eval mode: no dropout). A block keeps
    its input for backward and recomputes the rest."""
    from torch.utils.checkpoint import checkpoint

    blocks = transformer_blocks(model)
    if not blocks or not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"--gradient-checkpointing: {type(model).__name__} names no transformer block class "
                        "(_no_split_modules) or does not support gradient checkpointing")
    for block in blocks:
        forward = block.forward
        block.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k) if torch.is_grad_enabled() else _f(*a, **k)


@contextlib.contextmanager
def unsharded(model: torch.nn.Module):
    """Gather the policy's parameters once for a whole rollout, instead of once per generated token.

    Without this, every decoding step's forward would all-gather every block and reshard it afterwards.
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):  # a plain module (tests, benchmarks): nothing to gather
        yield model
        return
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


def eos_token_ids(tok, model_config, generation_config) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and each EOS the checkpoint's configs list (Qwen2.5-Instruct
    lists <|im_end|> and <|endoftext|>)."""
    ids = {tok.eos_token_id}
    for cfg in (model_config, generation_config):
        value = getattr(cfg, "eos_token_id", None)
        ids |= set(value) if isinstance(value, (list, tuple)) else {value}
    return sorted(i for i in ids if i is not None)


# The logits processors generate() builds from a GenerationConfig field, by class name: a sampler that applies any
# of them is not the policy that the loss scores. Only the temperature is allowed (the loss uses the same one).
PROCESSOR_FIELDS = {"RepetitionPenaltyLogitsProcessor": "repetition_penalty", "TopKLogitsWarper": "top_k",
                    "TopPLogitsWarper": "top_p", "MinPLogitsWarper": "min_p", "TypicalLogitsWarper": "typical_p",
                    "EpsilonLogitsWarper": "epsilon_cutoff", "EtaLogitsWarper": "eta_cutoff",
                    "NoRepeatNGramLogitsProcessor": "no_repeat_ngram_size", "NoBadWordsLogitsProcessor": "bad_words_ids",
                    "MinLengthLogitsProcessor": "min_length", "MinNewTokensLengthLogitsProcessor": "min_new_tokens",
                    "SequenceBiasLogitsProcessor": "sequence_bias", "SuppressTokensLogitsProcessor": "suppress_tokens",
                    "SuppressTokensAtBeginLogitsProcessor": "begin_suppress_tokens",
                    "ForcedBOSTokenLogitsProcessor": "forced_bos_token_id", "ForcedEOSTokenLogitsProcessor": "forced_eos_token_id",
                    "InfNanRemoveLogitsProcessor": "remove_invalid_values", "ExponentialDecayLengthPenalty": "exponential_decay_length_penalty"}


def neutral_generation_config(max_new_tokens: int, temperature: float | None, eos_ids: list[int], pad_id: int):
    """Sampling from exactly softmax(logits/τ) (temperature=None: greedy), stopping at any EOS. Every field that could
    add a logits processor is set to its neutral value explicitly: generate() fills unset (None) fields from the
    model's own generation_config, which train.py replaces with an empty one at load."""
    from transformers import GenerationConfig

    sampling = dict(do_sample=True, temperature=temperature) if temperature else dict(do_sample=False)
    return GenerationConfig(**sampling, top_k=0, top_p=1.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
                            repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
                            encoder_no_repeat_ngram_size=0, num_beams=1, min_length=0,
                            max_new_tokens=max_new_tokens, remove_invalid_values=False, renormalize_logits=False,
                            eos_token_id=eos_ids, pad_token_id=pad_id, use_cache=True, return_dict_in_generate=False)


def check_sampler_is_neutral(model, generation_config) -> None:
    """Build the logits processors generate() will apply and refuse any but the temperature, naming the field."""
    try:
        prepared, _ = model._prepare_generation_config(generation_config)
        model._prepare_special_tokens(prepared, device="cpu")
        processors = model._get_logits_processor(prepared, input_ids_seq_length=1, device="cpu")
    except (AttributeError, TypeError) as e:  # a transformers release that renamed these private helpers
        warnings.warn(f"could not inspect generate()'s logits processors ({e}); rollout_logprob_diff still measures it")
        return
    for p in processors:
        if type(p).__name__ != "TemperatureLogitsWarper":
            field = PROCESSOR_FIELDS.get(type(p).__name__, "an option of the model's own generate()")
            raise UserError(f"the model's generation settings add {type(p).__name__} ({field}), which cannot be "
                            "neutralised: sampling would not be the policy that the loss scores")


@contextlib.contextmanager
def recording_sampler(record: list):
    """Record log p_sampler(token) at every decoding step: generate() draws each token with torch.multinomial from the
    probabilities it has after all its logits processors, so the drawn token's probability there is exactly what the
    sampler used. One (B,) tensor per step; nothing V-wide is kept."""
    draw = torch.multinomial

    def multinomial(probs, num_samples, *args, **kwargs):
        tokens = draw(probs, num_samples, *args, **kwargs)  # (B, 1)
        record.append(probs.gather(-1, tokens).squeeze(-1).float().log())  # (B,)
        return tokens

    torch.multinomial = multinomial
    try:
        yield record
    finally:
        torch.multinomial = draw


# ======================================================================================================================
# Set-up: everything the loop needs, built once (the fields of train.Run)
# ======================================================================================================================
def setup(args, rank: int, world: int, device: torch.device) -> tuple[dict, int, "MetricsLog"]:
    """Tokenizer, prompts, models (sharded), optimizers and sampling configs; the resumed step and β."""
    import transformers

    transformers.logging.set_verbosity_error()  # the critic's fresh head, top_k=0 "unused": expected, not news
    mixed = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    check_shared_filesystem(args.out, rank)
    for flag, name in (("--model", args.model), ("--reward-model", args.reward_model)):
        if name:
            check_hub_reachable(flag, name)
    tok = load_tokenizer(args.model, args.chat_template) if args.model else None  # before any embedded build
    data_dir, model_dir = prepare_embedded(args, rank) if not (args.model and args.dataset) else (None, None)
    model_path = args.model or model_dir
    tok = tok or load_tokenizer(model_path, args.chat_template)
    rows, eval_rows = load_prompts(args, args.dataset or data_dir)
    reward_fns = load_reward_functions(args.reward)
    models, shapes = load_models(args, model_path, device, mixed)
    context = getattr(models["policy"].config, "max_position_embeddings", None)
    rows, eval_rows = (tokenize_rows(tok, args, r, context) for r in (rows, eval_rows))
    optimizers = [torch.optim.AdamW(m.parameters(), lr=args.lr if name == "policy" else args.critic_lr, weight_decay=args.weight_decay)
                  for name, m in (("policy", models["policy"]), ("critic", models["critic"])) if m is not None]
    samplers = sampler_fields(args, tok, models["policy"], models.pop("hf_generation_config"))
    trainables = {"policy": (models["policy"], optimizers[0])} | ({"critic": (models["critic"], optimizers[1])} if models["critic"] else {})
    start, beta = resume(args, trainables, rank)
    metrics = MetricsLog(os.path.join(args.out, "metrics.jsonl"), rank, start if args.resume else None)
    predicted = ledger_prediction(args, shapes, trainables, rank, world, mixed)
    if rank == 0:
        print(f"{args.algo} | {world} rank(s) on {device.type} | policy {sum(map(math.prod, shapes['policy'])):,} params | "
              f"{len(rows)} train / {len(eval_rows)} eval prompts | memory ledger ({'fsdp2_mixed' if mixed else 'fp32'} "
              "state, per rank): " + ", ".join(f"{n} {b / 2**20:.3f} MiB" for n, b in predicted.items()), flush=True)
    fields = dict(tok=tok, **models, reward_fns=reward_fns, optimizers=optimizers, train_rows=rows, eval_rows=eval_rows,
                  beta=beta, **samplers)
    return fields, start, metrics


def load_models(args, model_path: str, device, mixed: bool) -> tuple[dict, dict]:
    """Policy and critic in fp32 (FSDP2 keeps fp32 master shards); reference and reward model frozen, in the compute
    dtype (bf16 under mixed precision). Returns the models and each trained model's parameter shapes."""
    compute = torch.bfloat16 if mixed else torch.float32
    policy, shapes, hf_generation = load_sharded("causal", model_path, torch.float32, device, mixed, args.gradient_checkpointing)
    models = {"policy": policy, "ref": None, "critic": None, "reward_model": None, "rm_tok": None,
              "hf_generation_config": hf_generation}
    all_shapes = {"policy": shapes}
    if args.beta > 0 or args.kl_target:
        models["ref"] = load_sharded("causal", model_path, compute, device, mixed)[0].requires_grad_(False)
    if args.algo == "ppo":
        models["critic"], all_shapes["critic"], _ = load_sharded("critic", model_path, torch.float32, device, mixed,
                                                                 args.gradient_checkpointing)
    if args.reward_model:
        models["rm_tok"] = load_tokenizer(args.reward_model)
        models["reward_model"] = load_sharded("reward", args.reward_model, compute, device, mixed)[0].requires_grad_(False)
    return models, all_shapes


def sampler_fields(args, tok, policy, hf_generation) -> dict:
    """The sampling and greedy GenerationConfigs (temperature only, every EOS). The policy's own generation config is
    replaced by an empty one (EOS and pad ids): nothing of the checkpoint's sampling settings may reach generate()."""
    from transformers import GenerationConfig

    eos_ids = eos_token_ids(tok, policy.config, hf_generation)
    policy.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    sample_config = neutral_generation_config(args.max_new_tokens, args.temperature, eos_ids, tok.pad_token_id)
    check_sampler_is_neutral(policy, sample_config)
    return dict(sample_config=sample_config, eos_ids=eos_ids, hf_generation_config=hf_generation,
                greedy_config=neutral_generation_config(args.max_new_tokens, None, eos_ids, tok.pad_token_id))


def resume(args, trainables: dict, rank: int) -> tuple[int, float]:
    """(the step to continue after, β) from the newest checkpoint with --resume, announcing changed options; else (0, --beta)."""
    if not args.resume:
        return 0, args.beta
    meta = load_checkpoint(args, trainables)
    start = int(meta["step"])
    for line in resume_changes(args, meta["args"], start):
        print(line, flush=True) if rank == 0 else None
    return start, float(meta.get("beta", args.beta))


def ledger_prediction(args, shapes: dict, trainables: dict, rank: int, world: int, mixed: bool) -> dict:
    """memory_ledger's per-rank bytes of each trained model's parameters + gradients + AdamW state (measured after
    the first optimizer step into memory.json)."""
    import memory_ledger

    accounting = "fsdp2_mixed" if mixed else "fp32"
    predicted = {n: memory_ledger.per_rank_bytes_exact(shapes=s, world_size=world, rank=rank, accounting=accounting)["total"]
                 for n, s in shapes.items()}
    measure_memory_after_first_step(args.out, trainables, predicted, rank, world, mixed)
    return predicted


def tokenize_rows(tok, args, rows: list, context: int | None) -> list:
    """(prompt text as the policy sees it, answer, token ids) for each row, tokenised once; too long is an error."""
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             if args.chat_template else p for p, _ in rows]
    ids = tok(texts, add_special_tokens=not args.chat_template)["input_ids"] if texts else []
    for i, n in enumerate(map(len, ids)):
        if context and n + args.max_new_tokens > context:
            raise UserError(f"prompt {i} has {n} tokens; with --max-new-tokens {args.max_new_tokens} it exceeds the "
                            f"model's context of {context} tokens (shorten it or lower --max-new-tokens)")
    return [(t, a, i) for t, (_, a), i in zip(texts, rows, ids)]


def measure_memory_after_first_step(out: str, trainables: dict, predicted: dict, rank: int, world: int, mixed: bool) -> None:
    """memory.json: the ledger's per-rank prediction beside the bytes measured right after the first optimizer step
    (gradients and AdamW state both exist then), by a one-shot hook on the last optimizer to step."""
    import memory_ledger

    def hook(optimizer, *_):
        handle.remove()
        measured = {n: memory_ledger.measure_state_bytes(m, o)["total"] for n, (m, o) in trainables.items()}
        if rank == 0:
            atomic_write(os.path.join(out, "memory.json"), json.dumps({"rank": rank, "world_size": world, "accounting":
                         "fsdp2_mixed" if mixed else "fp32", "predicted_bytes": predicted, "measured_bytes": measured}, indent=1))

    handle = list(trainables.values())[-1][1].register_step_post_hook(hook)


# ======================================================================================================================
# Checkpoints: torch.distributed.checkpoint into a .partial directory, renamed only when complete; Hugging Face export
# ======================================================================================================================
def latest_checkpoint(out: str) -> str | None:
    """The newest complete checkpoint directory (a name without .partial, holding meta.json), or None."""
    root = os.path.join(out, "checkpoints")
    done = [d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".partial")
            and os.path.exists(os.path.join(root, d, "meta.json"))] if os.path.isdir(root) else []
    return os.path.join(root, max(done)) if done else None


def read_meta(path: str) -> dict:
    try:
        return json.load(open(os.path.join(path, "meta.json")))
    except (OSError, ValueError) as e:
        raise UserError(f"--resume: cannot read {os.path.join(path, 'meta.json')}: {e!r}") from None


def atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_shared_filesystem(out: str, rank: int) -> None:
    """Checkpoints are one directory written by every rank and committed by rank 0: all nodes must see one --out."""
    token = os.path.join(out, ".shared-check")
    if rank == 0:
        atomic_write(token, str(os.getpid()))
    dist.barrier()
    seen = os.path.exists(token)
    dist.barrier()
    if rank == 0:
        os.remove(token)
    stop_if_any_rank(None if seen else UserError(f"--out {out!r} is not on a file system shared by every node (rank "
                                                 f"{dist.get_rank()} cannot see rank 0's files): checkpoints need one"))


def save_checkpoint(args, step: int, trainables: dict, state: dict) -> None:
    """A kill at any point leaves either the previous checkpoint or the new complete one, never a torn one.
    `state` (the step, β, the arguments) goes into meta.json, the commit marker."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = dist.get_rank()
    root = os.path.join(args.out, "checkpoints")
    final, partial = os.path.join(root, f"step_{step:06d}"), os.path.join(root, f"step_{step:06d}.partial")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    sd = {}
    for name, (model, opt) in trainables.items():
        sd[name], sd[name + "_optim"] = get_state_dict(model, opt)
    dcp.save(sd, checkpoint_id=partial)
    dist.barrier()
    if rank == 0:
        atomic_write(os.path.join(partial, "meta.json"), json.dumps(state | {"step": step, "args": dataclasses.asdict(args)}))
        os.replace(partial, final)  # the commit point: a directory rename is atomic
        kept = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".partial"))
        for old in kept[: -args.keep_checkpoints]:  # renamed to .partial first: a kill mid-delete leaves nothing loadable
            doomed = os.path.join(root, old + ".partial")
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(os.path.join(root, old), doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    dist.barrier()


def load_checkpoint(args, trainables: dict) -> dict:
    """Restore models and optimizers from the newest complete checkpoint; returns its meta.json. .partial directories
    left by a kill during a save are removed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = latest_checkpoint(args.out)
    meta = read_meta(path)
    if dist.get_rank() == 0:
        for d in os.listdir(os.path.dirname(path)):
            if d.endswith(".partial"):
                shutil.rmtree(os.path.join(os.path.dirname(path), d), ignore_errors=True)
    sd = {}
    for name, (model, opt) in trainables.items():
        sd[name], sd[name + "_optim"] = get_state_dict(model, opt)
    try:
        dcp.load(sd, checkpoint_id=path)
    except Exception as e:  # a checkpoint damaged after it was committed, or written by another model
        raise UserError(f"--resume: cannot load checkpoint {path}: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    for name, (model, opt) in trainables.items():
        set_state_dict(model, opt, model_state_dict=sd[name], optim_state_dict=sd[name + "_optim"])
    return meta


def export_hf(model, tok, generation_config, out: str) -> None:
    """OUT/hf: the policy as a Hugging Face checkpoint (AutoModelForCausalLM.from_pretrained(OUT/hf) loads it), with the
    tokenizer and the checkpoint's own generation config. The full state dict is gathered to rank 0's CPU only."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        import transformers

        final, tmp = os.path.join(out, "hf"), os.path.join(out, f"hf.tmp-{os.getpid()}")
        with torch.device("meta"):
            plain = transformers.AutoModelForCausalLM.from_config(model.config)
        kept = dict(plain.named_parameters()) | dict(plain.named_buffers())  # one name per tied tensor (Qwen2.5's lm_head)
        sd = {k: v for k, v in sd.items() if k in kept}
        if generation_config is not None:
            plain.generation_config = generation_config
        plain.save_pretrained(tmp, state_dict=sd)
        tok.save_pretrained(tmp)
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


# ======================================================================================================================
# Metrics log, memory, plots
# ======================================================================================================================
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


def write_jsonl(path: str, rows: list) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def peak_memory_gib(device: torch.device) -> dict:
    """GPU: torch.cuda.max_memory_allocated since the start; CPU: the process's peak resident set (ru_maxrss)."""
    if device.type == "cuda":
        return {"cuda_max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}


class StepTimer:
    """Seconds per phase of a step; on CUDA, queued kernels are waited for before each reading."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, {}
        self.start = self.last = self.now()

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str) -> None:
        now = self.now()
        self.times[f"time_{name}_s"] = self.times.get(f"time_{name}_s", 0.0) + now - self.last
        self.last = now

    def total(self) -> float:
        return self.last - self.start


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
