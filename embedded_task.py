"""embedded_task.py — the offline default: a character tokenizer, a tiny Llama and an addition task, built here.

With no --model and no --dataset, every stage of train.py works without a network on this task: prompts "a+b=" with
a, b in [0, 30), answers "a+b", GSM8K's column names (`question`, `answer`). The files are written as JSON lines and
read back with `datasets.load_dataset`; the model is saved with `save_pretrained` and read back with `from_pretrained`:
the same loading code a user's data set and checkpoint go through.

The split is fixed (it does not follow --seed): 200 problems for testing, 700 for training, of which the supervised
stage keeps the first 200 aside to decide when to stop (`train[:200]`, see SFT_SPLITS). Every stage and every seed
therefore evaluates on the same 200 test problems, and none trains on them.

Each artefact is written under --out with a meta.json of what made it. A later run reuses it only when that matches
and otherwise says what differs and writes it again (they are cheap and fully determined by their settings).
"""

import json
import os
import shutil

import numpy as np
import torch

import checkpoints
import distributed
from distributed import say

TASK = {"task": "addition", "operands": [0, 30], "test_rows": 200, "data_seed": 0, "version": 1}
TINY = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4)  # 109k parameters
MAX_NEW_TOKENS = 6  # "58<eos>" is 3 tokens; 6 leaves room for a wrong answer to run on
SFT_SPLITS = ("train[200:]", "train[:200]")  # the supervised stage: trains on 500 problems, stops by the other 200
DATA_DIR, MODEL_DIR = "embedded_data", "embedded_model"  # under --out


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


def write_task(path: str) -> None:
    """train.jsonl (700 rows) and test.jsonl (200 rows) of 'a+b=' prompts, shuffled once by TASK's own seed."""
    lo, hi = TASK["operands"]
    pairs = [(a, b) for a in range(lo, hi) for b in range(lo, hi)]
    order = np.random.default_rng(TASK["data_seed"]).permutation(len(pairs))
    rows = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a, b in (pairs[i] for i in order)]
    n_test = TASK["test_rows"]
    for name, part in (("test.jsonl", rows[:n_test]), ("train.jsonl", rows[n_test:])):
        with open(os.path.join(path, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)


def write_initial_model(path: str, seed: int) -> None:
    """The tiny Llama with random weights (torch seed `seed`) and the character tokenizer, via save_pretrained.
    Its config carries `embedded_task`, so that every checkpoint trained from it is known as the tiny model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_char_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), **TINY, max_position_embeddings=64, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         embedded_task=TASK["task"])
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)


def is_embedded_model(path: str) -> bool:
    """True for the tiny model and every checkpoint trained from it (the policy, the SFT model, a reward model)."""
    config = os.path.join(os.path.expanduser(path), "config.json")
    return os.path.isfile(config) and "embedded_task" in json.load(open(config))


def built(path: str, settings: dict, build) -> str:
    """`path`, made by build(tmp) unless its meta.json already records exactly `settings`; a stale one is replaced
    after one line says what differed. Written into a temporary directory and renamed: never half there."""
    meta = os.path.join(path, "meta.json")
    old = json.load(open(meta)) if os.path.isfile(meta) else None
    if old == settings:
        return path
    if old is not None:
        changed = ", ".join(f"{k} {old.get(k)!r} → {v!r}" for k, v in settings.items() if old.get(k) != v)
        print(f"{path} was made with other settings ({changed}): building it again", flush=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    build(tmp)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(settings, f)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def prepare(out: str, seed: int, with_model: bool) -> str:
    """Collective: OUT/embedded_data (the task files) and, when a stage starts from nothing, OUT/embedded_model (the
    random tiny Llama of --seed), written by rank 0 while the other ranks wait. Returns the data's path."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        built(os.path.join(out, DATA_DIR), TASK, write_task)
        if with_model:
            built(os.path.join(out, MODEL_DIR), {"seed": seed} | TINY, lambda tmp: write_initial_model(tmp, seed))
    dist.barrier()
    return os.path.join(out, DATA_DIR)


def warm_start_args(args, world: int):
    """The options of the warm start, the sft stage of this task that an rl or rm stage without --model runs first into
    OUT/sft: those of `train.py --algo sft --out OUT/sft --seed S --steps SFT_STEPS --sft-target T`. A complete OUT/sft
    made with these settings is reused (and an interrupted one resumed: `resume` is set), one made with other settings
    is refused."""
    import options  # here: options reads this module's names at import

    sft_args = options.resolve_defaults(options.Args(algo="sft", out=os.path.join(args.out, "sft"), seed=args.seed,
                                                     steps=args.sft_steps, sft_target=args.sft_target,
                                                     dtype=args.dtype, plot=args.plot), world)
    sft_args.model = os.path.join(sft_args.out, MODEL_DIR)
    saved = checkpoints.latest_checkpoint(sft_args.out)
    if saved is not None:
        diff = checkpoints.experiment_changes(checkpoints.read_meta(saved)["args"], sft_args)
        if diff:
            raise distributed.UserError(f"{sft_args.out} holds a warm start made with other settings "
                                        f"({'; '.join(diff)}): choose another --out, or remove {sft_args.out}")
    sft_args.resume = saved is not None
    say(f"warm start: the sft stage, as `train.py --algo sft --out {sft_args.out} --seed {args.seed} --steps "
        f"{args.sft_steps} --sft-target {sft_args.sft_target}`" + (" (resumed)" if saved else ""))
    return sft_args
