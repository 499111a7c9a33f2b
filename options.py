"""options.py — every option of train.py in one place: Args (one field per flag, its help the field's), the defaults
that depend on the stage and the model, the checks made before anything is loaded or written, and what a resumed run
may change. train.py reads the options; `python train.py --help` prints them.
"""

import dataclasses
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

import embedded_task
import models
from data import check_hub_reachable
from distributed import UserError
from scoring import load_reward_functions


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    """One field per flag (--group-size for group_size); `python train.py --help` prints them all. A default of None
    depends on the stage and on the model (the embedded tiny model, or --model): resolve_defaults, just below."""

    algo: Literal["sft", "rm", "grpo", "ppo"] = arg("grpo", "the stage: sft, rm (reward model), grpo or ppo")
    model: str = arg("", "hub name or local dir of a causal LM; empty: the embedded tiny model (grpo, ppo and rm "
                         "then run the sft stage into OUT/sft first and start from it)")
    dataset: str = arg("", "hub name, local dir, or .json/.jsonl/.parquet/.csv file; empty = embedded arithmetic")
    dataset_config: str = arg("", "dataset configuration name (e.g. 'main' for openai/gsm8k)")
    split: str | None = arg(None, "training split (datasets' syntax: 'train', 'train[:90%]'); unset: train "
                                  "(train[200:] for the embedded sft stage)")
    eval_split: str | None = arg(None, "evaluation split; unset: test (train[:200] for the embedded sft stage); a data "
                                       "set without it holds out its last training rows (at most 20%)")
    eval_size: int = arg(200, "evaluation prompts (greedy) or held-out pairs (rm); 0 = no evaluation")
    prompt_column: str = arg("question", "dataset column holding the prompt")
    answer_column: str = arg("answer", "dataset column holding the reference answer (sft: the response to learn)")
    prompt_template: str = arg("{prompt}", "format string applied to each prompt; \\n and \\t in it are a newline "
                                           "and a tab")
    chat_template: bool = arg(False, "wrap prompts with the tokenizer's chat template (Instruct models)")
    max_length: int | None = arg(None, "sft, rm: the most tokens of prompt + response; longer rows are dropped and "
                                       "counted; unset: the model's context")
    reward: str = arg("math", "weighted verifiable rewards: 'math=1.0,format=0.2', names from rewards.py or "
                              "module:function; 'none' = only --reward-model")
    reward_model: str = arg("", "a frozen reward model (a sequence classifier, e.g. OUT/hf of --algo rm)")
    reward_model_weight: float = arg(1.0, "weight of the reward model's score in the total reward")
    reward_model_normalize: bool = arg(True, "standardise the reward model's score with the mean and std stored in its "
                                             "config (written by --algo rm); a checkpoint without them scores raw")
    comparison_rounds: int = arg(64, "rm without a preference data set: rounds of two samples of each training prompt "
                                 "by --model, the verifier choosing (docs/pipeline.md)")
    critic_init: str = arg("policy", "PPO's critic: 'policy' (the policy's checkpoint, head zeroed: V = 0 at first) "
                                     "or a reward model (backbone and head carried over: V = the reward at first)")
    group_size: int = arg(8, "G: completions sampled per prompt")
    prompts_per_step: int = arg(64, "prompts per step across all ranks (sft: rows, rm: pairs); divisible by the ranks")
    max_new_tokens: int = arg(6, "the most completion tokens per sample (and per greedy evaluation)")
    temperature: float = arg(1.0, "sampling temperature (log-probs are taken under the same tempered policy)")
    mask_truncated: bool = arg(False, "drop completions that hit --max-new-tokens without EOS from the loss")
    lr: float | None = arg(None, "learning rate (AdamW); unset, tiny model: sft 3e-3, rm 1e-3, RL 1e-3; --model: "
                                 "sft 1e-5, rm 1e-5, RL 1e-6")
    critic_lr: float | None = arg(None, "critic learning rate (PPO); unset: 5x --lr (the critic lags: document 004, "
                                        "section 10)")
    weight_decay: float | None = arg(None, "AdamW weight decay; unset: 0.1 for rm on the tiny model, else 0")
    max_grad_norm: float = arg(1.0, "gradient clipping (global norm, each trained model apart)")
    lr_schedule: Literal["linear", "constant"] = arg("linear", "linear: decay to 0 at --steps")
    beta: float | None = arg(None, "β, the KL coefficient to the frozen reference at step 1 (0 = no reference is "
                                   "loaded); unset: 0.05 with --reward-model on the tiny model, 0.02 (InstructGPT's) "
                                   "with --reward-model and --model, else 0")
    kl_estimator: Literal["k3", "k2"] = arg("k3", "GRPO's KL term: k3 (document 001; gradient of KL(ref‖θ)) or k2 "
                                                  "(gradient of KL(θ‖ref))")
    adaptive_kl_target: float = arg(0.0, "move β each step to keep the logged kl near this (Ziegler et al. 2019); 0 = "
                                         "β stays --beta")
    kl_horizon: float = arg(10000.0, "H of the adaptive β, in samples: a step moves β up by at most 20% × samples per "
                                      "step / H, down by at most that and never below half (β stays positive)")
    early_stop_kl: float = arg(0.0, "end a step's epochs at the first minibatch whose approx_kl exceeds this; 0 = off")
    eps: float | None = arg(None, "clip range ε of the surrogate: ρ is kept within [1 − ε, 1 + ε_high]; unset: 0.2, "
                                  "3e-4 with --policy-loss gspo")
    eps_high: float | None = arg(None, "upper clip range ε_high (DAPO's clip-higher); unset: --eps (4e-4 with "
                                       "--policy-loss gspo and no --eps)")
    dual_clip: float = arg(0.0, "dual-clip bound c > 1 for tokens with A < 0 (Ye et al. 2020); 0 = off")
    vf_coef: float = arg(0.5, "c_v: weight of the critic loss (PPO; the critic has its own AdamW: docs/derivations.md)")
    ent_coef: float | None = arg(None, "c_h: entropy bonus; unset: 0.05 (GRPO) or 0.08 (PPO) on the tiny model, 0 with "
                                       "--model")
    value_clip: float = arg(0.0, "PPO value clipping range around V_old (0 = off)")
    epochs: int = arg(1, "inner epochs over one rollout batch")
    minibatch_size: int | None = arg(None, "sequences per optimizer step across all ranks; unset: the whole batch, at "
                                           "most 256")
    micro_batch_size: int | None = arg(None, "sequences per forward/backward on each rank (gradients accumulate); "
                                             "unset: the whole per-rank minibatch on the tiny model, at most 8 with "
                                             "--model")
    gradient_checkpointing: bool = arg(False, "recompute each transformer block in backward instead of keeping its "
                                              "activations")
    gamma: float = arg(1.0, "GAE discount γ (PPO)")
    lam: float = arg(1.0, "GAE λ (PPO); 1 (verl's default) = return minus V, unbiased for a sparse terminal reward")
    whiten_advantages: bool = arg(True, "whiten PPO advantages over the batch")
    loss_agg: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] | None = arg(
        None, "GRPO's aggregation: seq-mean-token-mean (GRPO, the default) | token-mean (DAPO) | "
              "seq-mean-token-sum-norm (Dr.GRPO); PPO takes token-mean only")
    scale_rewards: bool = arg(True, "GRPO: divide by the group std (false = Dr.GRPO)")
    advantage: Literal["grpo", "rloo", "reinforce-pp-baseline"] = arg(
        "grpo", "GRPO's advantage: grpo (group mean and std) | rloo (leave-one-out mean; Ahmadian et al. 2024) | "
                "reinforce-pp-baseline (group mean, then whitened over the batch's tokens; Hu et al. 2025)")
    policy_loss: Literal["ppo", "gspo"] = arg("ppo", "GRPO's surrogate: ppo (each token's ratio, clipped) | gspo (the "
                                                     "sequence's length-normalised ratio, clipped; Zheng et al. 2025)")
    dynamic_sampling: bool = arg(False, "GRPO: drop groups whose rewards are all equal and sample more prompts until "
                                        "the step holds --prompts-per-step groups with a spread (DAPO)")
    max_sample_batches: int = arg(4, "--dynamic-sampling: the most batches of --prompts-per-step prompts a step "
                                     "samples; then the step is topped up with equal-reward groups")
    overlong_buffer: int = arg(0, "DAPO's overlong shaping: a reward penalty growing linearly from 0 to −1 over the "
                                  "last this many tokens before --max-new-tokens; 0 = off")
    sampler_correction_cap: float = arg(0.0, "weight each token's surrogate by min(π_θold/p_sampler, C), C this "
                                             "(truncated importance sampling; Yao et al. 2025); 0 = off")
    sampler_correction_mask: bool = arg(False, "with --sampler-correction-cap: drop a sequence whose ratio "
                                               "π_θold/p_sampler leaves [1/C, C]")
    steps: int | None = arg(None, "optimizer steps; unset: RL 400; tiny model: sft 2000 (a cap: see --sft-target), rm "
                                  "2000; --model: sft and rm one pass over the data")
    eval_every: int | None = arg(None, "evaluate every this many steps, and at step 0; unset: sft 10, rm 100, RL 50")
    save_every: int = arg(100, "checkpoint (and export to OUT/hf) every this many steps; 0 = only at the end")
    keep_checkpoints: int = arg(2, "complete checkpoints kept")
    export: bool = arg(True, "write the trained model as a Hugging Face checkpoint to OUT/hf with each checkpoint")
    sft_target: float | None = arg(None, "sft: stop at the first evaluation whose eval_accuracy reaches this; unset: "
                                         "0.6 on the embedded task (its warm start), 0 (off) otherwise")
    sft_steps: int = arg(2000, "grpo, ppo, rm without --model: --steps of the sft stage they run first")
    seed: int = arg(0, "random seed")
    out: str = arg("", "output directory; unset: out/<algo>")
    resume: bool = arg(False, "resume from the newest complete checkpoint in --out")
    dtype: Literal["auto", "fp32", "bf16"] = arg("auto", "auto: bf16 mixed precision on GPU, fp32 on CPU")
    plot: bool = arg(True, "write curves.png (matplotlib)")


def resolve_defaults(args: Args, world: int) -> Args:
    """Fill every option left unset (None) by stage and model, as --help lists them; printed at start-up."""
    tiny = not args.model or embedded_task.is_embedded_model(args.model)
    rl, embedded_sft = args.algo in ("grpo", "ppo"), args.algo == "sft" and not args.dataset
    per_stage = {"sft": (3e-3, 1e-5, 10), "rm": (1e-3, 1e-5, 100), "grpo": (1e-3, 1e-6, 50), "ppo": (1e-3, 1e-6, 50)}
    tiny_lr, model_lr, eval_every = per_stage[args.algo]
    unset = lambda value, default: default if value is None else value  # noqa: E731  (0 is a value, not unset)
    args.out = args.out or os.path.join("out", args.algo)
    args.split = unset(args.split, embedded_task.SFT_SPLITS[0] if embedded_sft else "train")
    args.eval_split = unset(args.eval_split, embedded_task.SFT_SPLITS[1] if embedded_sft else "test")
    args.lr = unset(args.lr, tiny_lr if tiny else model_lr)
    args.critic_lr = unset(args.critic_lr, 5 * args.lr)  # verl's defaults give the critic 10x; 5x beat 2x here
    args.eval_every = unset(args.eval_every, eval_every)
    args.weight_decay = unset(args.weight_decay, 0.1 if args.algo == "rm" and tiny else 0.0)
    # a learned reward is there to be exploited: the KL anchor is document 004's "main defense" against reward hacking
    args.beta = unset(args.beta, (0.05 if tiny else 0.02) if args.reward_model else 0.0)
    # the tiny policy's entropy collapses without a bonus (PPO stalled at 0.785 once with 0.05); LLMs: verl's 0
    args.ent_coef = unset(args.ent_coef, (0.08 if args.algo == "ppo" else 0.05) * tiny * rl)
    warm_start = embedded_sft or (not args.model and args.algo != "sft")  # the sft stage of the embedded task
    args.sft_target = unset(args.sft_target, 0.6 * warm_start)
    # PPO's loss is document 000's token mean E_t; GRPO's is document 001's per-sequence mean
    args.loss_agg = args.loss_agg or ("token-mean" if args.algo == "ppo" else "seq-mean-token-mean")
    gspo = args.policy_loss == "gspo"  # GSPO's ratio is a sequence's: its paper clips it at 1 − 3e-4 … 1 + 4e-4
    if gspo and args.eps_high is None:  # unset: the paper's 4e-4 beside its ε, or --eps on both sides
        args.eps_high = 4e-4 if args.eps is None else args.eps
    args.eps = unset(args.eps, 3e-4 if gspo else 0.2)
    batch = args.prompts_per_step * (args.group_size if rl else 1)
    if args.minibatch_size is None:  # the whole rollout batch, at most 256 sequences per optimizer step
        fits = [m for m in range(min(256, batch), 0, -1) if batch % m == 0 and m % world == 0] if rl else []
        args.minibatch_size = fits[0] if fits else batch
    if args.micro_batch_size is None:  # see docs/gpu.md: 8 sequences of 512 tokens keep a 0.5B-7B model in 80 GB
        per_rank = max(1, args.minibatch_size // world)
        divisors = [m for m in range(1, min(8, per_rank) + 1) if per_rank % m == 0]
        args.micro_batch_size = per_rank if tiny else divisors[-1]
    if args.steps is None and (rl or tiny):  # else (sft, rm with --model): one pass over the data, set by build_run
        args.steps = 400 if rl else 2000
    return args


# ======================================================================================================================
# Parsing and checks: before anything heavy is loaded or anything written
# ======================================================================================================================
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
RENAMED = {"--kl-target": "--adaptive-kl-target", "--target-kl": "--early-stop-kl"}  # old flag → its name now


def strict_bool(text: str) -> bool:
    if text.lower() in TRUE + FALSE:
        return text.lower() in TRUE
    raise ValueError(text)


strict_bool.__name__ = "boolean (true/false)"  # argparse's error: "invalid boolean (true/false) value"


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
        renamed = [f"{old} is now {new}" for old, new in RENAMED.items() if re.search(f"{old}(=| |$)", message)]
        raise UserError(f"{message} ({renamed[0] if renamed else 'see --help'})")

    p.error = error
    return args_class(**vars(p.parse_args(argv)))


def check_args(args, world_size: int) -> None:
    """Everything that can be checked before loading anything heavy or writing anything: shapes, values, names.
    Each message names the one value that is wrong."""
    check_batch_shapes(args, world_size)
    check_finite(args)
    check_values(args)
    if args.reward != "none" or args.algo not in ("sft", "rm"):
        load_reward_functions(args.reward)  # names and weights
    for flag, name in (("--model", args.model), ("--reward-model", args.reward_model), ("--dataset", args.dataset),
                       ("--critic-init", "" if args.critic_init == "policy" else args.critic_init)):
        # a hub id is 'name' or 'org/name'; anything else that does not exist cannot be loaded
        looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or \
            name.endswith((".json", ".jsonl", ".parquet", ".csv"))
        if name and looks_local and not os.path.exists(os.path.expanduser(name)):
            raise UserError(f"{flag} {name!r}: no such file or directory")
        if name.endswith(".gguf") and flag != "--dataset":
            raise UserError(f"{flag} {name!r} is a GGUF file: convert it to a model directory first with `python "
                            f"gguf_model.py --gguf {name} --out DIR`, then give {flag} DIR")
        if name and flag != "--dataset":
            check_hub_reachable(flag, name)  # a hub name not in the cache needs the Hub: say now if it is out of reach
    models.check_critic_source(args)


def check_batch_shapes(args, world_size: int) -> None:
    batch = args.prompts_per_step * (args.group_size if args.algo in ("grpo", "ppo") else 1)
    per_rank = args.minibatch_size // world_size
    rules = [
        (args.prompts_per_step >= 1, f"--prompts-per-step must be positive, not {args.prompts_per_step}"),
        (args.group_size >= 1, f"--group-size must be positive, not {args.group_size}"),
        (args.algo != "grpo" or args.group_size >= 2,
         "--group-size must be at least 2 for GRPO: the group std (and a group baseline) needs 2 samples"),
        (args.prompts_per_step % world_size == 0,
         f"--prompts-per-step {args.prompts_per_step} is not divisible by the {world_size} ranks"),
        (args.minibatch_size >= 1 and args.minibatch_size % world_size == 0 and batch % args.minibatch_size == 0,
         f"--minibatch-size {args.minibatch_size} must divide the batch ({args.prompts_per_step} prompts × "
         f"{args.group_size} = {batch}) and be divisible by the {world_size} ranks"),
        (args.micro_batch_size >= 1 and per_rank % args.micro_batch_size == 0,
         f"--micro-batch-size {args.micro_batch_size} must be positive and divide the per-rank minibatch "
         f"({args.minibatch_size} sequences / {world_size} ranks = {per_rank})"),
    ]
    for holds, message in rules:
        if not holds:
            raise UserError(message)


def check_finite(args) -> None:
    """inf and nan pass a comparison such as `lr > 0` only when they should not: every number must be finite."""
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name.replace('_', '-')} must be a finite number, not {value}")


def check_values(args) -> None:
    """One rule per value; the first broken one is the message."""
    for holds, message in objective_rules(args) + variant_rules(args) + run_rules(args):
        if not holds:
            raise UserError(message)
    check_prompt_template(args.prompt_template)


def objective_rules(args) -> list[tuple[bool, str]]:
    """(holds, message) for the values of sampling, the optimizer and the loss."""
    return [
        (args.max_new_tokens >= 1, f"--max-new-tokens must be at least 1, not {args.max_new_tokens}"),
        (args.temperature > 0, f"--temperature must be positive, not {args.temperature}"),
        (args.lr > 0, f"--lr must be positive (a learning rate), not {args.lr}"),
        (args.critic_lr > 0, f"--critic-lr must be positive (a learning rate), not {args.critic_lr}"),
        (args.weight_decay >= 0, f"--weight-decay must be non-negative, not {args.weight_decay}"),
        (args.max_grad_norm > 0, f"--max-grad-norm must be positive (a gradient-norm bound), not {args.max_grad_norm}"),
        (args.beta >= 0, f"--beta must be non-negative, not {args.beta}"),
        (args.eps > 0, f"--eps must be positive (the clip range), not {args.eps}"),
        (args.eps_high is None or args.eps_high >= args.eps,
         f"--eps-high {args.eps_high} must be at least --eps {args.eps} (clip-higher widens the upper side)"),
        (not args.dual_clip or args.dual_clip > 1,
         f"--dual-clip {args.dual_clip} must be greater than 1 (it caps −c·A for A < 0; 0 = off)"),
        (args.adaptive_kl_target >= 0, f"--adaptive-kl-target must be non-negative (0 = off), not "
                                       f"{args.adaptive_kl_target}"),
        (not args.adaptive_kl_target or args.beta > 0,
         "--adaptive-kl-target adapts β from its start --beta: give --beta > 0"),
        (args.kl_horizon > 0, f"--kl-horizon must be positive, not {args.kl_horizon}"),
        (args.early_stop_kl >= 0, f"--early-stop-kl must be non-negative (0 = off), not {args.early_stop_kl}"),
        (args.vf_coef >= 0, f"--vf-coef must be non-negative (the critic loss's weight), not {args.vf_coef}"),
        (args.ent_coef >= 0, f"--ent-coef must be non-negative (an entropy bonus), not {args.ent_coef}"),
        (args.value_clip >= 0, f"--value-clip must be non-negative (0 = off), not {args.value_clip}"),
        (args.epochs >= 1, f"--epochs must be at least 1, not {args.epochs}"),
        (0 <= args.gamma <= 1, f"--gamma must be a discount in [0, 1], not {args.gamma}"),
        (0 <= args.lam <= 1, f"--lam must be in [0, 1] (GAE's λ), not {args.lam}"),
        (args.algo != "ppo" or args.loss_agg == "token-mean",
         f"--loss-agg {args.loss_agg}: PPO's loss is the token mean of document 000 (E_t over every completion "
         "token); the other aggregations are GRPO's"),
    ]


def variant_rules(args) -> list[tuple[bool, str]]:
    """(holds, message) for the options of the 2024-25 variants (RLOO, REINFORCE++, GSPO, DAPO, the correction)."""
    return [
        (args.algo == "grpo" or (args.advantage, args.policy_loss, args.dynamic_sampling) == ("grpo", "ppo", False),
         "--advantage, --policy-loss and --dynamic-sampling are GRPO's options (PPO's advantage is GAE's, per token)"),
        (args.policy_loss != "gspo" or args.loss_agg == "seq-mean-token-mean",
         f"--policy-loss gspo is an objective per sequence: it needs --loss-agg seq-mean-token-mean, not "
         f"{args.loss_agg}"),
        (args.max_sample_batches >= 1, f"--max-sample-batches must be at least 1, not {args.max_sample_batches}"),
        (0 <= args.overlong_buffer <= args.max_new_tokens,
         f"--overlong-buffer {args.overlong_buffer} must be in [0, --max-new-tokens {args.max_new_tokens}]"),
        (not args.sampler_correction_cap or args.sampler_correction_cap > 1,
         f"--sampler-correction-cap must be greater than 1 (0 = off), not {args.sampler_correction_cap}"),
        (not args.sampler_correction_mask or args.sampler_correction_cap,
         "--sampler-correction-mask needs --sampler-correction-cap C (the band [1/C, C] it masks outside)"),
    ]


def run_rules(args) -> list[tuple[bool, str]]:
    """(holds, message) for the values of the run: its length, evaluations, checkpoints and data."""
    return [
        (args.steps is None or args.steps >= 0, f"--steps must be non-negative, not {args.steps}"),
        (args.eval_every >= 1, f"--eval-every must be positive, not {args.eval_every}"),
        (args.save_every >= 0, f"--save-every must be non-negative (0 = only at the end), not {args.save_every}"),
        (args.keep_checkpoints >= 1, f"--keep-checkpoints must be positive, not {args.keep_checkpoints}"),
        (args.eval_size >= 0, f"--eval-size must be non-negative (0 = no evaluation), not {args.eval_size}"),
        (0 <= args.sft_target <= 1, f"--sft-target {args.sft_target} must be an accuracy in [0, 1]"),
        (args.sft_steps >= 0, f"--sft-steps must be non-negative, not {args.sft_steps}"),
        (args.max_length is None or args.max_length >= 2, f"--max-length must be at least 2, not {args.max_length}"),
        (not args.chat_template or args.model,
         "--chat-template: the embedded tiny model's character tokenizer has no chat template"),
        (args.reward != "none" or args.reward_model or args.algo in ("sft", "rm"),
         "--reward none leaves no reward: give --reward-model, or verifiable rewards with --reward"),
        (not args.dataset_config or not os.path.isfile(os.path.expanduser(args.dataset)),
         f"--dataset-config {args.dataset_config!r} has no effect on a local file ({args.dataset!r})"),
    ]


def check_prompt_template(template: str) -> None:
    if "{prompt}" not in template:
        raise UserError(f"--prompt-template {template!r} has no {{prompt}}: every prompt would be the same text")
    try:
        template.format(prompt="")
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"--prompt-template {template!r} is not a format string with only {{prompt}}: {e!r}") from None


# Options that only the RL stages read: with --algo sft or rm they would change nothing, so setting one is refused.
RL_ONLY = ("group_size", "temperature", "mask_truncated", "reward_model", "reward_model_weight", "critic_init",
           "critic_lr", "beta", "kl_estimator", "adaptive_kl_target", "early_stop_kl", "eps", "eps_high", "dual_clip",
           "vf_coef", "ent_coef", "value_clip", "epochs", "minibatch_size", "gamma", "lam", "loss_agg", "scale_rewards",
           "advantage", "policy_loss", "dynamic_sampling", "max_sample_batches", "overlong_buffer",
           "sampler_correction_cap", "sampler_correction_mask")


def check_stage_options(args) -> None:
    """Before the defaults are filled: refuse an option the stage never reads (e.g. --beta with --algo sft), and a
    critic option without PPO."""
    given = {f.name for f in dataclasses.fields(args) if getattr(args, f.name) != f.default}
    if args.algo in ("sft", "rm"):
        ignored = [n for n in RL_ONLY if n in given]
        if ignored:
            raise UserError(f"--{ignored[0].replace('_', '-')} has no effect with --algo {args.algo} (an RL option)")
    if args.algo != "ppo" and args.critic_init != "policy":
        raise UserError(f"--critic-init: only PPO has a critic (--algo {args.algo})")
    unread = [n for n in ("reward_model_weight", "reward_model_normalize") if n in given and not args.reward_model]
    if unread:
        raise UserError(f"--{unread[0].replace('_', '-')} has no effect without --reward-model (it acts on the reward "
                        "model's score)")
