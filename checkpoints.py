"""checkpoints.py — a run's state on disk and what a resumed run may change.

torch.distributed.checkpoint writes models and optimizers into step_XXXXXX.partial, renamed only when every rank has
written (the rename is the commit: a kill leaves the previous checkpoint, never a torn one); meta.json records the
step, β, the ranks and the arguments. The Hugging Face export (OUT/hf) is replaced whole by a rename too. The resume
rules: options that define the experiment are refused when changed; hyperparameters are announced.
"""

import dataclasses
import json
import os
import shutil

import torch
import torch.distributed as dist

from distributed import UserError


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


# What a resumed run may change. REFUSED: options that define the experiment (a different run, not a continuation).
# ANNOUNCED: hyperparameters a user may retune mid-run; the change is printed as one line and recorded in the next
# checkpoint. Anything else (--out, --plot, --micro-batch-size, --gradient-checkpointing, ...) changes no number.
RESUME_REFUSED = ("algo", "model", "dataset", "dataset_config", "split", "eval_split", "eval_size", "prompt_column",
                  "answer_column", "prompt_template", "chat_template", "max_length", "reward", "reward_model",
                  "reward_model_weight", "reward_model_normalize", "critic_init", "group_size", "prompts_per_step",
                  "max_new_tokens", "seed", "sft_steps", "sft_target", "dtype", "loss_agg", "kl_estimator",
                  "scale_rewards", "whiten_advantages", "mask_truncated", "gamma", "lam", "temperature")


RESUME_ANNOUNCED = ("steps", "lr", "critic_lr", "lr_schedule", "weight_decay", "max_grad_norm", "beta", "eps",
                    "eps_high", "dual_clip", "vf_coef", "ent_coef", "value_clip", "epochs", "minibatch_size",
                    "early_stop_kl", "adaptive_kl_target", "kl_horizon", "eval_every")


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
    diff = experiment_changes(read_meta(path)["args"], args)
    if diff:
        raise UserError(f"--resume: checkpoint {path} was written with other arguments: {'; '.join(diff)} "
                        "(these define the experiment; start a new --out, e.g. from the export: --model OUT/hf)")


def experiment_changes(saved: dict, args) -> list[str]:
    """"--seed 0 → 1" for each option of RESUME_REFUSED that differs between a checkpoint's arguments and `args`. A
    path inside --out (the warm start's OUT/sft/hf) is compared relative to its --out: a moved --out still resumes."""
    def value(options: dict, k: str):
        v, out = options.get(k), options.get("out") or ""
        inside = isinstance(v, str) and out and os.path.abspath(v).startswith(os.path.abspath(out) + os.sep)
        return os.path.join("OUT", os.path.relpath(os.path.abspath(v), os.path.abspath(out))) if inside else v

    now = dataclasses.asdict(args)
    return [f"--{k.replace('_', '-')} {saved.get(k)!r} → {now[k]!r}" for k in RESUME_REFUSED
            if value(saved, k) != value(now, k)]


def resume_changes(args, meta: dict, world: int) -> list[str]:
    """One line per announced option that differs from the checkpoint's (its meta.json), e.g. "--lr 0.001 → 0.05 from
    step 4"; and one when the number of ranks differs from the run that wrote it."""
    saved, step = meta["args"], meta["step"]
    unused = ("critic_lr", "vf_coef", "value_clip") if args.algo != "ppo" else ()  # no critic: --lr moves critic_lr
    lines = [f"--{k.replace('_', '-')} {saved.get(k)!r} → {getattr(args, k)!r} from step {step + 1}"
             for k in RESUME_ANNOUNCED if k in saved and k not in unused and saved.get(k) != getattr(args, k)]
    if args.steps != saved.get("steps") and args.lr_schedule == "linear" and args.steps > step:  # else nothing runs
        was = max(0.0, 1 - (step - 1) / saved["steps"])
        lines.append(f"the linear learning-rate decay is re-planned to reach 0 after step {args.steps}: "
                     f"lr × {1 - step / args.steps:.4f} at step {step + 1} (it was × {was:.4f} at step {step})")
    if meta.get("world", world) != world:
        lines.append(f"resumed on {world} rank(s) from a checkpoint written by {meta['world']}: the same weights and "
                     "rows, but sampling noise is drawn per rank and sums reduce in another order, so the run will "
                     "not repeat the uninterrupted one bit for bit")
    return lines
