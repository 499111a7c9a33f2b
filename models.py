"""models.py — the models of a run and how each starts: the tokenizer; loading on rank 0 and broadcasting into FSDP2
shards (or a plain module in one fp32 process); transformers' loading report checked, so that no weight starts random
unless the role makes it new; the scalar heads of the critic and the reward model and their initialisation; FSDP2
units and activation checkpointing; a reward model's stored statistics.

    role          class                                  a checkpoint without the scalar head
    policy        AutoModelForCausalLM                   refused
    reference     AutoModelForCausalLM                   refused
    reward_model  AutoModelForSequenceClassification     refused (train one with --algo rm)
    critic        AutoModelForTokenClassification        head zeroed: V = 0 at first (from the policy)
    rm init       AutoModelForSequenceClassification     head N(0, 1/(H+1)) (--algo rm from a causal LM)

A critic started from the reward model that scores the run keeps its head, scaled so that V = R at step 0
(critic_head_affine). Every function that holds a collective says so in its first line.
"""

import contextlib
import dataclasses
import math
import os

import torch
import torch.distributed as dist
import transformers

from distributed import UserError, all_gather_objects, broadcast_from_rank0, say, stop_if_any_rank


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
    1/√H. The unit spread is this project's choice: every reward-model figure in docs/pipeline.md was made with it."""
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


@contextlib.contextmanager
def unsharded(model: torch.nn.Module):
    """Gather the policy's parameters once for a whole rollout, instead of once per generated token: without this,
    every decoding step's forward would all-gather every block and reshard it afterwards."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):  # a plain module (one fp32 process): nothing to gather
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


MIN_STAT_PAIRS = 50  # held-out pairs below which a reward model's stored mean and std are announced as unreliable


def load_rl_models(run, mixed: bool) -> dict:
    """Into `run`: the frozen reference (β > 0), PPO's critic and the frozen reward model (--reward-model), in the
    compute dtype when frozen. Returns the parameter shapes of each, for the memory ledger."""
    args, compute = run.args, torch.bfloat16 if mixed else torch.float32
    shapes = {}
    if args.beta > 0 or args.adaptive_kl_target:
        spec = ModelSpec("reference", args.model, "--model", dtype=compute)
        run.ref, shapes["ref"], _ = load_model(spec, run.device, mixed)
        run.ref.requires_grad_(False)
    if args.reward_model:
        run.rm_tok = load_tokenizer(args.reward_model, "--reward-model")
        run.rm_norm = reward_model_stats(args.reward_model) if args.reward_model_normalize else None
        pairs = getattr(transformers.AutoConfig.from_pretrained(args.reward_model), "reward_pairs", None)
        if run.rm_norm is not None and pairs is not None and pairs < MIN_STAT_PAIRS:
            say(f"warning: --reward-model {args.reward_model}'s stored mean and std come from {pairs} held-out pairs "
                f"(fewer than {MIN_STAT_PAIRS}): standardised with them, its rewards may sit far from 0 and 1; give "
                "--algo rm a larger --eval-size, or use raw scores with --reward-model-normalize false")
        spec = ModelSpec("reward_model", args.reward_model, "--reward-model", dtype=compute)
        run.reward_model, shapes["reward_model"], _ = load_model(spec, run.device, mixed)
        run.reward_model.requires_grad_(False)
    if args.algo == "ppo":
        from_rm = args.critic_init != "policy"
        # from the reward model that scores the run, the head computes r_φ as score() adds it: V = R at step 0
        scores_run = from_rm and args.reward_model and same_checkpoint(args.critic_init, args.reward_model)
        affine = critic_head_affine(args.reward_model_weight, run.rm_norm) if scores_run else None
        source, flag = (args.critic_init, "--critic-init") if from_rm else (args.model, "--model")
        spec = ModelSpec("critic", source, flag, checkpointing=args.gradient_checkpointing, head_affine=affine)
        run.critic, shapes["critic"], _ = load_model(spec, run.device, mixed)
    return shapes


def check_critic_source(args) -> None:
    """The critic reads the policy's token ids: a --critic-init checkpoint must share the policy's vocabulary (the
    same tokenizer, or, without one, the same embedding rows), else its embeddings are the wrong rows."""
    if args.algo != "ppo" or args.critic_init == "policy":
        return
    import embedded_task  # here, not at the top: embedded_task's own imports need none of this module

    policy = load_tokenizer(args.model) if args.model else embedded_task.make_char_tokenizer()
    source = args.critic_init
    bare = all(not os.path.exists(os.path.join(source, f)) for f in ("tokenizer.json", "tokenizer_config.json")) \
        and os.path.exists(os.path.join(source, "config.json"))  # a local checkpoint saved without its tokenizer
    if not bare:  # load_tokenizer names a directory that is not a model
        same = load_tokenizer(source, "--critic-init").get_vocab() == policy.get_vocab()
    else:  # the embedding must at least have the policy's rows
        same = getattr(transformers.AutoConfig.from_pretrained(source), "vocab_size", None) == (
            transformers.AutoConfig.from_pretrained(args.model).vocab_size if args.model else len(policy))
    if not same:
        raise UserError(f"--critic-init {source!r} has another vocabulary than the policy "
                        f"({args.model or 'the embedded tiny model'}): the critic reads the policy's token ids, so it "
                        "must come from a model of the same tokenizer (or use --critic-init policy)")
