"""data.py — what a stage reads: `datasets.load_dataset` on a hub name, a local directory or a local file; the prompt
and answer columns, checked and cleaned; prompts tokenised once (chat template or --prompt-template); which rows a step
reads (epochs of permutations sliced by step); and whether a hub name can be reached before anything waits on it.
"""

import os
import re
import socket
from typing import NamedTuple

import numpy as np

import rewards as rewards_lib
from distributed import UserError, say, seed_for


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
