"""plumbing.py — what every stage of train.py needs that is not the algorithm: options, the run directory, torchrun +
FSDP2, data, models, the optimizer step, checkpoints, export, logging. A reader of the RL step never needs this file;
one who runs it on a cluster does.

Contents, in order: options (parse, check, resume rules) · the run directory (one run per --out, workers that outlive
their launcher) · distributed (the process group, collectives on the group's device) · data · tokenizer and models
(rank-0 load + broadcast into FSDP2 shards, the loading report, activation checkpointing) · the optimizer step ·
checkpoints and export · metrics log, memory, plots.

Every function that holds a collective (every rank must call it, the same number of times) says so in its first line.
"""

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
import threading
import time
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

import rewards as rewards_lib

warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # FSDP2 on HF heads: we never write in place


class UserError(Exception):
    """A problem with the user's input: printed as one line by rank 0, exit code 2 on every rank, no traceback."""


def say(text: str) -> None:
    """One line from rank 0 (every rank before the process group exists), on its own line under a progress bar."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        from tqdm import tqdm

        tqdm.write(text)
        sys.stdout.flush()


def load_reward_functions(spec: str) -> list:
    """[(name, weight, fn(completion, answer) -> float)] from 'math=1,format=0.2', 'my_module:my_fn=0.5' or 'none' (no
    verifiable reward: a reward model then scores alone). Built-in names and their weights are parsed by
    rewards.parse_reward_spec; module:function terms are imported from the working directory first (as `python -m`
    would), then from sys.path."""
    if spec.strip() == "none":
        return []
    terms = [t.strip() for t in spec.split(",") if t.strip()]
    custom = [t for t in terms if ":" in t.partition("=")[0]]
    builtin = ",".join(t for t in terms if t not in custom)
    try:
        parsed = rewards_lib.parse_reward_spec(builtin) if builtin else []
    except ValueError as e:
        raise UserError(f"--reward: {e} (or module:function, or none)") from None
    out = [(n, w, rewards_lib.REWARD_FUNCTIONS[n]) for n, w in parsed]
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
        raise UserError("--reward is empty (give 'none' for no verifiable reward)")
    return out


def apply_rewards(reward_fns: list, texts: list, answers: list, where) -> tuple[torch.Tensor, UserError | None]:
    """Σ_k w_k·reward_k(text_i, answer_i) for each i: (B,) float32, and the first problem: a reward that raised or
    returned a non-finite value, named with where(i) (e.g. "sample 3 of step 12"); the caller stops every rank on it."""
    total, problem = torch.zeros(len(texts)), None
    for name, weight, fn in reward_fns:
        for i, (text, answer) in enumerate(zip(texts, answers)):
            try:
                value = float(fn(text, answer))
            except Exception as e:
                said = " ".join(str(e).split())[:200]
                problem = problem or UserError(f"reward {name!r} raised {type(e).__name__}: {said} on {where(i)} "
                                               f"(completion {text[:60]!r})")
                continue
            if not math.isfinite(value):
                problem = problem or UserError(f"reward {name!r} returned {value} on {where(i)} (completion "
                                               f"{text[:60]!r}); rewards must be finite")
            total[i] += weight * value
    return total, problem


# ======================================================================================================================
# The run directory: one live run per --out, and no worker left behind by its launcher
# ======================================================================================================================
def claim_out(out: str, rank: int, check) -> tuple[object, bool]:
    """Collective: rank 0 takes an exclusive OS lock on OUT/.lock for the life of the process, or stops every rank
    with one line naming the holder's pid; then, with the lock held, it runs check() (the resume rules), whose
    UserError stops every rank too. The kernel releases the lock when the process ends, however it ends (kill -9
    included), so a lock is never stale. Returns the open lock file (the lock lasts while it is open) and whether
    this run created --out."""
    import fcntl  # POSIX: Linux and macOS

    created, error, handle = not os.path.exists(out), None, None
    if rank == 0:
        try:
            os.makedirs(out, exist_ok=True)
            handle = open(os.path.join(out, ".lock"), "a+")
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()} {socket.gethostname()}\n")
            handle.flush()
            check()
        except BlockingIOError:
            handle.seek(0)
            holder = (handle.read().split() + ["?", "?"])[:2]
            error = UserError(f"--out {out!r} is in use by another run (pid {holder[0]} on {holder[1]}): wait for it "
                              "to end, or choose another --out")
        except OSError as e:
            error = UserError(f"--out {out!r} cannot be written: {e.strerror or e}")
        except UserError as e:
            error = e
        if error is not None and handle is not None:
            release_out(out, handle, created)
    stop_if_any_rank(error)
    return handle, created


def release_out(out: str, handle, created: bool) -> None:
    """Rank 0, when a run ends: the lock is released; and when the run created --out and stopped on bad input, the
    lock file goes and --out too if nothing else is in it (nothing is written before the inputs pass their checks)."""
    if handle is None or handle.closed:
        return
    handle.close()
    if created:
        os.remove(os.path.join(out, ".lock"))
        try:
            os.rmdir(out)
        except OSError:  # not empty: something else was written (a warm start, embedded data)
            pass


def watch_launcher() -> None:
    """Under torchrun, end this worker within a second or two once the torchrun agent that started it is gone.

    torch starts each worker in a session of its own, so `kill -9` of torchrun's process group leaves the workers
    training, writing checkpoints into an --out that a --resume started meanwhile would also write. A daemon thread
    polls the parent's pid; when the agent dies, the worker is re-parented and the thread ends the process at once
    (os._exit). A checkpoint it was writing stays a .partial directory, which is never loaded (save_checkpoint)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # plain `python train.py`: a dead shell must not stop a nohup run
        return
    agent = os.getppid()

    def watch():
        while os.getppid() == agent:
            time.sleep(0.5)
        rank = os.environ.get("RANK", "?")
        os.write(2, f"rank {rank}: the torchrun agent (pid {agent}) is gone; stopping\n".encode())
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


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
    """Collective: the reduction of x over ranks (x itself is not modified), on x's device."""
    y = x.detach().to(group_device(), copy=True)
    dist.all_reduce(y, op=op)
    return y.to(x.device)


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Collective: equal-shaped tensors from all ranks, concatenated along dim 0 in rank order, on x's device."""
    y = x.detach().to(group_device()).contiguous()
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y)
    return torch.cat(parts).to(x.device)


def global_sum(*values: float) -> list[float]:
    """Collective: Σ over ranks of a few Python numbers (float64 on the group's device)."""
    return all_reduce(torch.tensor(values, dtype=torch.float64, device=group_device())).tolist()


def all_gather_objects(obj) -> list:
    """Collective: every rank's picklable `obj`, in rank order."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)  # pickled, sent on the group's device (torch.cuda.current_device for NCCL)
    return out


def broadcast_from_rank0(t: torch.Tensor) -> torch.Tensor:
    """Collective: rank 0's t on every rank, on t's device."""
    y = t.detach().to(group_device(), copy=True)
    dist.broadcast(y, src=0)
    return y.to(t.device)


def stop_if_any_rank(error: UserError | None) -> None:
    """Collective: when any rank hit an error of its own, every rank raises it (exit 2, none left waiting in a
    collective), with the message of the lowest such rank, so that rank 0 prints it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    first = int(all_reduce(torch.tensor([rank if error else world]), op=dist.ReduceOp.MIN).item())
    if first < world:
        raise UserError(all_gather_objects(str(error) if rank == first else None)[first])


def seed_for(*keys) -> int:
    """A seed derived from (seed, step, rank, ...): every step's randomness is a pure function of its indices,
    so a resumed run replays exactly what the uninterrupted run would have done, with no RNG state to save."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:7], "little")


def rows_for_step(n_rows: int, per_step: int, seed: int, step: int, rank: int,
                  world: int) -> tuple[np.ndarray, np.ndarray]:
    """The --prompts-per-step row indices of step `step` (1, 2, ...), and this rank's share of them.

    The rows are read in epochs: epoch e is a permutation of all n_rows drawn by a seed of (seed, e), and step s takes
    positions (s − 1)·per_step … s·per_step − 1 of the epochs laid end to end. So ceil(N / B) steps read every row
    once (the last of them fills up from the next epoch's permutation), and the draw is a pure function of (seed,
    step): 1 rank and 2 ranks read the same rows, and a resumed run reads what the uninterrupted one would."""
    positions = np.arange((step - 1) * per_step, step * per_step)  # (B,) in the epochs laid end to end
    epochs = positions // n_rows  # (B,)
    orders = {e: np.random.default_rng(seed_for(seed, "epoch", e)).permutation(n_rows) for e in set(epochs.tolist())}
    picks = np.array([orders[e][p % n_rows] for e, p in zip(epochs.tolist(), positions.tolist())])  # (B,)
    return picks, picks[rank * per_step // world : (rank + 1) * per_step // world]


def epochs_done(step: int, per_step: int, n_rows: int) -> float:
    """The passes over the data completed at the end of step `step` (logged as `epoch`): 1.0 after one pass."""
    return step * per_step / n_rows


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA kernels, so that a time.perf_counter() reading after it includes them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ======================================================================================================================
# Data: datasets.load_dataset on a hub name, a local directory or a local file
# ======================================================================================================================
class PromptRow(NamedTuple):
    """One prompt of the data set, tokenised once."""

    text: str  # the prompt exactly as the policy sees it (--prompt-template and --chat-template applied)
    answer: str  # the reference answer: what verifiable rewards check; the response the sft stage imitates
    ids: list[int]  # text's token ids


def load_split(args, name: str, split: str):
    """One split through datasets.load_dataset; None when that split does not exist. Any other failure is a UserError.
    `split` may slice ("train[:200]"): datasets' own split syntax."""
    import datasets

    ext = os.path.splitext(name)[1].lower().lstrip(".")
    builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(ext)
    local_file = os.path.isfile(name)
    if local_file and not builder:
        raise UserError(f"--dataset {name!r}: a local file must be .json, .jsonl, .parquet or .csv")
    if local_file and os.path.getsize(name) == 0:
        raise UserError(f"dataset {name!r} is empty: no rows to train on")
    if local_file and re.match(r"[\w-]+", split).group() != "train":
        if split == args.split:  # the training split itself
            raise UserError(f"--split {split!r}: a single local file is the split 'train' (slice it: 'train[:90%]')")
        return None  # a local file has no evaluation split: rows are held out
    try:
        if local_file:  # a single local file is the train split
            before = datasets.logging.get_verbosity()
            datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a parser's error comes back in our one line
            try:
                return datasets.load_dataset(builder, data_files=name, split=split)
            finally:
                datasets.logging.set_verbosity(before)
        return datasets.load_dataset(name, args.dataset_config or None, split=split)
    except ValueError as e:
        if "split" in str(e).lower() and "unknown" in str(e).lower() and split != args.split:
            return None
        if "corresponds to no data" in str(e):  # e.g. a CSV file with a header only
            raise UserError(f"dataset {name!r} (split {split!r}) is empty: no rows") from None
        raise UserError(f"cannot load dataset {name!r} (split {split!r}): {str(e).splitlines()[0]}") from None
    except Exception as e:  # the hub, the file system and the parsers raise many kinds
        cause = e.__cause__ or e  # datasets wraps a parser's error (e.g. bad JSON) in DatasetGenerationError
        raise UserError(f"cannot load dataset {name!r} (split {split!r}): {type(cause).__name__}: "
                        f"{str(cause).splitlines()[0] if str(cause) else ''}") from None


def check_columns(ds, name: str, columns: list[str], hint: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing and {"chosen", "rejected"} <= set(ds.column_names) and "chosen" not in columns:
        raise UserError(f"dataset {name!r} is preference data (columns {ds.column_names}): it trains a reward model, "
                        "with --algo rm")
    if missing:
        raise UserError(f"dataset {name!r} has no column {missing[0]!r}; its columns are {ds.column_names} ({hint})")


def load_prompts(args, name: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(prompt, answer) rows for training and evaluation, columns checked by name. Rows whose prompt or answer is null
    or empty are dropped, and the run says how many. With --eval-size 0 no evaluation split is read; without an
    evaluation split the last rows of the training split are held out (at most 20% of them), and the run says so."""
    train = load_split(args, name, args.split)
    evals = load_split(args, name, args.eval_split) if args.eval_split and args.eval_size else None
    for ds in filter(None, (train, evals)):
        check_columns(ds, name, [args.prompt_column, args.answer_column],
                      "choose them with --prompt-column / --answer-column")
    rows = usable_rows(train, args, f"{name!r} (split {args.split!r})")
    if not rows:
        raise UserError(f"dataset {name!r} (split {args.split!r}) has no rows to train on")
    eval_rows = usable_rows(evals, args, f"{name!r} (split {args.eval_split!r})") if evals is not None else []
    if evals is None and args.eval_size:  # hold out the last rows of the training split
        n = min(args.eval_size, len(rows) // 5)
        if n == 0:
            raise UserError(f"dataset {name!r} has {len(rows)} usable training rows and no split {args.eval_split!r}: "
                            "too few to hold out an evaluation set (20% of them); give --eval-size 0 or --eval-split")
        fewer = f" (fewer than --eval-size {args.eval_size}: at most 20%)" if n < args.eval_size else ""
        say(f"dataset {name!r} has no split {args.eval_split!r}: the last {n} of {len(rows)} training rows are held "
            f"out for evaluation{fewer}")
        rows, eval_rows = rows[: len(rows) - n], rows[len(rows) - n :]
    elif args.eval_size and not eval_rows:
        raise UserError(f"dataset {name!r} (split {args.eval_split!r}) has no rows to evaluate on")
    elif args.eval_size and len(eval_rows) < args.eval_size:
        say(f"evaluation: {len(eval_rows)} prompts, all of split {args.eval_split!r} (fewer than --eval-size "
            f"{args.eval_size})")
    return rows, eval_rows[: args.eval_size]


def unescape(template: str) -> str:
    """--prompt-template 'Q: {prompt}\\nA:' typed in a shell: \\n and \\t become a newline and a tab, \\\\ a
    backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], template)


def usable_rows(ds, args, where: str) -> list[tuple[str, str]]:
    """(prompt after --prompt-template, answer) of every row; a null or empty prompt or answer drops its row (counted,
    announced)."""
    template, rows, dropped = unescape(args.prompt_template), [], []
    for i, (p, a) in enumerate(zip(ds[args.prompt_column], ds[args.answer_column])):
        if p is None or a is None or not str(p).strip() or not str(a).strip():
            dropped.append(i)
            continue
        rows.append((template.format(prompt=str(p)), str(a)))
    if dropped:
        say(f"dataset {where}: dropped {len(dropped)} of {len(ds)} rows whose {args.prompt_column!r} or "
            f"{args.answer_column!r} is null or empty (rows {first_rows(dropped)})")
    return rows


def first_rows(rows: list[int]) -> str:
    """'4, 17, 250' — the first five row numbers of a message, then '...'."""
    return ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")


def tokenize_prompts(tok, args, rows: list, context: int | None) -> list[PromptRow]:
    """A PromptRow for each (prompt, answer), tokenised once; a prompt too long for the context is an error."""
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             if args.chat_template else p for p, _ in rows]
    ids = tok(texts, add_special_tokens=not args.chat_template)["input_ids"] if texts else []
    for i, n in enumerate(map(len, ids)):
        if context and n + args.max_new_tokens > context:
            raise UserError(f"prompt {i} has {n} tokens; with --max-new-tokens {args.max_new_tokens} it exceeds the "
                            f"model's context of {context} tokens (shorten it or lower --max-new-tokens)")
    return [PromptRow(text=t, answer=a, ids=i) for t, (_, a), i in zip(texts, rows, ids)]


def verifiable(rows: list[PromptRow]) -> bool:
    """True when every answer holds a number the 'math' checker can compare against (so a gold reward exists)."""
    return bool(rows) and all(rewards_lib.parse_number(rewards_lib.extract_answer(r.answer)) is not None for r in rows)


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
    offline = [k for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
               if os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")]
    if offline:
        raise UserError(f"{flag} {name!r} is not a local directory and not in the Hugging Face cache, and {offline[0]}="
                        f"{os.environ[offline[0]]} forbids downloading it: check the name (a local directory needs a "
                        "path that exists)")
    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError:
        raise UserError(f"{flag} {name!r} is not a local directory, not in the Hugging Face cache, and the Hub "
                        f"({host}:{port}) cannot be reached: check the name, or download it where there is a "
                        "network") from None


def load_tokenizer(path: str, flag: str = "--model", chat_template: bool = False):
    """AutoTokenizer of `path`, left-padded, with a pad token (EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    local = os.path.isdir(os.path.expanduser(path))
    if local and not os.path.exists(os.path.join(path, "config.json")):
        raise UserError(f"{flag} {path!r} is not a model directory (no config.json)")
    if local and not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                          "tokenizer.model", "vocab.json")):
        raise UserError(f"{flag} {path!r} has no tokenizer (no tokenizer.json or tokenizer_config.json): save one "
                        "beside the model with tokenizer.save_pretrained")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise UserError(f"{flag} {path!r}: cannot load its tokenizer: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if chat_template and not tok.chat_template:
        raise UserError(f"--chat-template: the tokenizer of {path!r} has no chat template (a base model?); "
                        "drop --chat-template or use --prompt-template")
    if tok.pad_token is None:  # common for base models: pad with EOS (every mask is built from lengths, not pad ids)
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token is None:
        raise UserError(f"tokenizer of {path!r} has neither a pad, an EOS nor an UNK token to pad with")
    tok.padding_side = "left"  # decoder-only generation continues from the right edge
    return tok


# role: (transformers class, may the checkpoint lack the scalar head?, how a missing head starts)
ROLES = {"policy": ("AutoModelForCausalLM", False, None), "reference": ("AutoModelForCausalLM", False, None),
         "reward_model": ("AutoModelForSequenceClassification", False, None),
         "reward_model_init": ("AutoModelForSequenceClassification", True, "normal"),
         "critic": ("AutoModelForTokenClassification", True, "zeros")}


@dataclasses.dataclass
class ModelSpec:
    """What to load, and as what: the role decides the class, whether the scalar head may be new, how it starts."""

    role: str  # a key of ROLES
    path: str  # hub name or local directory
    flag: str  # the option that named `path`, for messages
    dtype: torch.dtype = torch.float32
    checkpointing: bool = False  # --gradient-checkpointing
    head_affine: tuple[float, float] | None = None  # (a, b): the scalar head computes a·head(h) + b once loaded


def load_model(spec: ModelSpec, device: torch.device, mixed: bool):
    """Collective: build on the meta device, shard with FSDP2, allocate the shards on `device`, then fill them from
    rank 0's copy of the checkpoint (set_model_state_dict(..., broadcast_from_rank0=True)); buffers (RoPE frequencies)
    are broadcast too. Returns (model, parameter shapes before sharding, the checkpoint's generation config or None).

    One process in fp32 has nothing to shard and no precision to manage, so the model stays a plain module there:
    FSDP2 would still copy every parameter into and out of its flat buffers around each forward and backward and run
    AdamW over DTensors (on the tiny model, AdamW 7.9 ms sharded against 2.6 ms plain)."""
    import transformers
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full, error = None, None
    if dist.get_rank() == 0:
        try:
            full = load_full_model(spec)
        except UserError as e:
            error = e
    stop_if_any_rank(error)
    auto_class = ROLES[spec.role][0]
    config = transformers.AutoConfig.from_pretrained(spec.path, **({} if "Causal" in auto_class else {"num_labels": 1}))
    with torch.device("meta"):
        model = getattr(transformers, auto_class).from_config(config, dtype=spec.dtype)
    shapes = [tuple(p.shape) for p in model.parameters()]
    if spec.checkpointing:
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
    generation_config = all_gather_objects(getattr(full, "generation_config", None))[0]  # rank 0's, everywhere
    return model.eval(), shapes, generation_config


def load_full_model(spec: ModelSpec):
    """The whole model in host memory, with transformers' loading report checked: weights the checkpoint lacks are
    allowed only for a new scalar head where the role makes one (the critic from a causal LM: zeros, V ≡ 0 at first,
    document 004 "Initialization"; a reward model from a causal LM: N(0, 1/(H+1)), mean reward ≈ 0: init_head).
    Anything else missing (a causal LM's LM head, a reward model's score head) would start random: refused."""
    import transformers

    auto_class, new_head_ok, init = ROLES[spec.role]
    cls = getattr(transformers, auto_class)
    try:
        model, info = cls.from_pretrained(spec.path, dtype=spec.dtype, output_loading_info=True,
                                          **({} if "Causal" in auto_class else {"num_labels": 1}))
    except Exception as e:
        raise UserError(f"{spec.flag} {spec.path!r}: cannot load it as {cls.__name__}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    kind = (model.config.architectures or ["?"])[0]
    head = "score" if hasattr(model, "score") else "classifier"
    missing = sorted(info["missing_keys"])
    new_head = [k for k in missing if k.split(".")[0] == head] if new_head_ok else []
    wrong_kind = "Causal" in auto_class and kind.endswith(("ForSequenceClassification", "ForTokenClassification"))
    if wrong_kind or len(new_head) < len(missing):
        what = ", ".join(k for k in missing if k not in new_head) or "its LM head is the classifier's backbone"
        raise UserError(f"{spec.flag} {spec.path!r} is a {kind} checkpoint: loaded as {model.__class__.__name__} "
                        f"({spec.role.replace('_', ' ')}) it would start with random weights ({what}); give a "
                        + ("causal LM" if "Causal" in auto_class else "reward model (train one with --algo rm)"))
    if new_head:
        init_head(getattr(model, head), init, weight=f"{head}.weight" in new_head)
    if spec.head_affine is not None:
        a, b = spec.head_affine  # head(h) → a·head(h) + b, exactly: w ← a·w, bias ← a·bias + b
        getattr(model, head).weight.data.mul_(a)
        getattr(model, head).bias.data.mul_(a).add_(b)
    return model


def init_head(head: torch.nn.Linear, init: str, weight: bool) -> None:
    """A new scalar head: its weight when the checkpoint lacks it (zeros, or N(0, 1/(H+1)), variance 1/(H+1)); its bias,
    if it has one, at 0 either way. With hidden states of norm about √H (RMS-normalised), the first scores then centre
    on 0 with a spread of about one unit. OpenRLHF draws its head with std 1/(H+1), not 1/√(H+1): a spread of about
    1/√H. The unit spread is this project's choice, and every reward-model figure in the README was measured with it."""
    if weight and init == "zeros":
        torch.nn.init.zeros_(head.weight)
    elif weight:
        torch.nn.init.normal_(head.weight, std=1 / math.sqrt(head.in_features + 1))
    if head.bias is not None:
        torch.nn.init.zeros_(head.bias)


def critic_head_affine(weight: float, norm: tuple[float, float] | None) -> tuple[float, float]:
    """(a, b) for a critic started from the reward model that scores the run: its head then computes a·r_φ + b, the
    reward as score() adds it, w·(r_φ − mean)/std with the stored statistics (w·r_φ without them), so that at step 0
    V_ψ(s) at the last real token equals R. Applied to the loaded head in load_full_model (ModelSpec.head_affine)."""
    if norm is None:
        return weight, 0.0
    mean, std = norm
    return weight / std, -weight * mean / std


def same_checkpoint(a: str, b: str) -> bool:
    """Whether two --model-like names are one checkpoint: local paths compared after resolving them (./out/rm/hf/ is
    out/rm/hf), hub names as they are written."""
    local = [os.path.exists(os.path.expanduser(p)) for p in (a, b)]
    if all(local):
        return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))
    return a == b


def has_scalar_head(path: str) -> bool:
    """Whether the checkpoint at `path` is a reward model or a critic (a *ForSequenceClassification or
    *ForTokenClassification): a critic loaded from it carries its scalar head over; from a causal LM the head is new."""
    import transformers

    kind = (transformers.AutoConfig.from_pretrained(path).architectures or ["?"])[0]
    return kind.endswith(("ForSequenceClassification", "ForTokenClassification"))


BLOCKS_FROM = 50_000_000  # parameters from which each transformer block is its own FSDP2 unit


def shard(model: torch.nn.Module, mixed_precision: bool) -> torch.nn.Module:
    """FSDP2: fully_shard each transformer block, then the root; bf16 compute, fp32 master weights and reduction.

    A block of its own is gathered alone, so only one block's full parameters are alive at a time: what lets a 7B
    model train. Below BLOCKS_FROM parameters that saving is a few MB, and each unit costs its own all-gather and
    reduce-scatter every forward and backward: the root alone is one unit. Measured on the embedded 108k-parameter
    reward model, 2 ranks (gloo, one thread each): 5.1 steps/s with a unit per block, 11.8 with the root only."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    if sum(p.numel() for p in model.parameters()) >= BLOCKS_FROM:
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

        def recomputed(*a, _f=forward, **k):
            return checkpoint(_f, *a, use_reentrant=False, **k) if torch.is_grad_enabled() else _f(*a, **k)

        block.forward = recomputed


def reward_model_stats(path: str) -> tuple[float, float] | None:
    """(mean, std) of a reward model's scores on held-out pairs, stored in its config: `reward_mean`/`reward_std` by
    --algo rm, or `mean`/`std` by OpenRLHF's train_rm. A checkpoint with neither (or std ≤ 0) returns None: its score
    is used raw, and the start-up line says "reward-model scale raw"."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    mean = getattr(config, "reward_mean", getattr(config, "mean", None))
    std = getattr(config, "reward_std", getattr(config, "std", None))
    return (float(mean), float(std)) if mean is not None and std and std > 0 else None


# ======================================================================================================================
# The optimizer step, the same for every stage
# ======================================================================================================================
def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with its fused kernel (one kernel for every parameter, on CUDA and on CPU): over FSDP2's DTensors the
    default per-tensor path pays a dispatch per operation. Measured on the embedded model, 2 ranks: 15.6 ms a step,
    1.7 ms fused. The update is AdamW's either way (Loshchilov & Hutter 2019)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


def clip_and_step(trained: dict, max_norm: float) -> dict:
    """Collective (the norms of FSDP2 gradients reduce across ranks): clip each trained model's global gradient norm,
    then step every optimizer, or none of them when a norm is not finite (a NaN loss or gradient: the weights stay as
    they were, and the step counts as skipped); zero the gradients. `trained` is {name: (model, optimizer)}.
    Returns the first model's norm before clipping and whether the step was skipped."""
    norms = []
    for model, _ in trained.values():
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
        norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
    finite = all(math.isfinite(n) for n in norms)
    for _, optimizer in trained.values() if finite else ():
        optimizer.step()
    for _, optimizer in trained.values():  # after every step: memory.json's hook sees all the gradients
        optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": norms[0], "skipped_updates": int(not finite)}


def set_learning_rates(trained: dict, base: dict, step: int, steps: int, schedule: str) -> float:
    """lr = base × (1 − (step − 1)/steps) with the linear schedule (base otherwise): a pure function of the step, so a
    resumed run continues it exactly. Returns the first model's lr."""
    factor = 1 - (step - 1) / steps if schedule == "linear" else 1.0
    for name, (_, optimizer) in trained.items():
        for group in optimizer.param_groups:
            group["lr"] = base[name] * factor
    return base[next(iter(trained))] * factor


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
    """Collective: checkpoints are one directory written by every rank and committed by rank 0, so all nodes must
    see one --out."""
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


def save_checkpoint(args, step: int, trained: dict, state: dict) -> None:
    """Collective: models and optimizers of `trained` ({name: (model, optimizer)}) at `step`. A kill at any point
    leaves either the previous checkpoint or the new complete one, never a torn one. `state` (β, whether the run is
    complete) goes into meta.json with the step and the arguments; meta.json is the commit marker."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, root = dist.get_rank(), os.path.join(args.out, "checkpoints")
    final, partial = os.path.join(root, f"step_{step:06d}"), os.path.join(root, f"step_{step:06d}.partial")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    sd = {}
    for name, (model, opt) in trained.items():
        sd[name], sd[name + "_optim"] = get_state_dict(model, opt)
    dcp.save(sd, checkpoint_id=partial)
    dist.barrier()
    if rank == 0:
        meta = state | {"step": step, "args": dataclasses.asdict(args)}
        atomic_write(os.path.join(partial, "meta.json"), json.dumps(meta))
        os.replace(partial, final)  # the commit point: a directory rename is atomic
        kept = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".partial"))
        for old in kept[: -args.keep_checkpoints]:  # renamed to .partial first: a kill mid-delete leaves none loadable
            doomed = os.path.join(root, old + ".partial")
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(os.path.join(root, old), doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    dist.barrier()


def load_checkpoint(args, trained: dict) -> dict:
    """Collective: restore models and optimizers from the newest complete checkpoint; returns its meta.json.
    .partial directories left by a kill during a save are removed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = latest_checkpoint(args.out)
    meta = read_meta(path)
    if dist.get_rank() == 0:
        for d in os.listdir(os.path.dirname(path)):
            if d.endswith(".partial"):
                shutil.rmtree(os.path.join(os.path.dirname(path), d), ignore_errors=True)
    sd = {}
    for name, (model, opt) in trained.items():
        sd[name], sd[name + "_optim"] = get_state_dict(model, opt)
    try:
        dcp.load(sd, checkpoint_id=path)
    except Exception as e:  # a checkpoint damaged after it was committed, or written by another model
        raise UserError(f"--resume: cannot load checkpoint {path}: {type(e).__name__}: "
                        f"{' '.join(str(e).split())[:300]}") from None
    for name, (model, opt) in trained.items():
        set_state_dict(model, opt, model_state_dict=sd[name], optim_state_dict=sd[name + "_optim"])
    return meta


def export_hf(model, tok, out: str, generation_config=None, config_updates: dict | None = None) -> None:
    """Collective: OUT/hf, `model` as a Hugging Face checkpoint of its own class (a causal LM for the policy, a sequence
    classifier for a reward model: `from_pretrained(OUT/hf)` loads it as it is), with the tokenizer, the checkpoint's
    own generation config, and `config_updates` written into its config. The full state dict is gathered to rank 0's
    CPU only; the directory is replaced whole, by a rename."""
    import transformers
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        final, tmp = os.path.join(out, "hf"), os.path.join(out, f"hf.tmp-{os.getpid()}")
        hf_class = next(c for c in type(model).__mro__ if issubclass(c, transformers.PreTrainedModel)
                        and c.__module__.startswith("transformers."))  # LlamaForCausalLM under FSDP2's subclass
        with torch.device("meta"):
            plain = hf_class(model.config)
        kept = dict(plain.named_parameters()) | dict(plain.named_buffers())  # one name per tied tensor (Qwen2.5)
        sd = {k: v for k, v in sd.items() if k in kept}
        if generation_config is not None:
            plain.generation_config = generation_config
        plain.config.update(config_updates or {})
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
            finite = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in row.items()}
            with open(self.path, "a") as f:
                f.write(json.dumps(finite) + "\n")


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


def record_memory(out: str, trained: dict, frozen: dict, shapes: dict, mixed: bool) -> None:
    """memory.json: the ledger's per-rank bytes beside the measured ones, for each trained model (parameters +
    gradients + AdamW state, right after the first optimizer step, by a one-shot hook on the last optimizer) and
    each frozen model (its parameters: document 000's 2 bytes per parameter in bf16, 4 in fp32).
    trained: {name: (model, optimizer)}; frozen: {name: model}; shapes: {name: parameter shapes before sharding}."""
    import memory_ledger

    rank, world = dist.get_rank(), dist.get_world_size()
    accounting, frozen_bytes = ("fsdp2_mixed", 2) if mixed else ("fp32", 4)
    predicted = {n: memory_ledger.per_rank_bytes_exact(shapes=shapes[n], world_size=world, rank=rank,
                                                       accounting=accounting)["total"] for n in trained}
    predicted_frozen = {n: frozen_bytes * memory_ledger.fsdp2_local_numel(shapes=shapes[n], world_size=world, rank=rank)
                        for n in frozen}
    measured_frozen = {n: memory_ledger.measure_state_bytes(m)["params"] for n, m in frozen.items()}

    def hook(optimizer, *_):
        handle.remove()
        measured = {n: memory_ledger.measure_state_bytes(m, o)["total"] for n, (m, o) in trained.items()}
        if rank == 0:
            atomic_write(os.path.join(out, "memory.json"), json.dumps({
                "rank": rank, "world_size": world, "accounting": accounting, "predicted_bytes": predicted,
                "measured_bytes": measured, "frozen_bytes_per_param": frozen_bytes,
                "frozen_predicted_bytes": predicted_frozen, "frozen_measured_bytes": measured_frozen}, indent=1))

    handle = list(trained.values())[-1][1].register_step_post_hook(hook)


CURVES = {  # metric: (label, style); each curve is drawn when the run logged it
    "reward_mean": ("reward_mean (training reward of the samples)", "-"),
    "gold_reward_mean": ("gold_reward_mean (verifiable reward of the same samples, never trained on)", "-"),
    "token_accuracy": ("token_accuracy (sft, teacher-forced)", "-"),
    "pair_accuracy": ("pair_accuracy (rm, training pairs)", "-"),
    "eval_accuracy": ("eval_accuracy (greedy, held out)", "o-"),
    "eval_pair_accuracy": ("eval_pair_accuracy (held-out pairs)", "o-")}


def plot_curves(out: str) -> None:
    """curves.png: every metric of CURVES the run logged, against the step (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, (label, style) in CURVES.items():
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=label, markersize=3)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    plt.close(fig)
