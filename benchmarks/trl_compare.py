"""TRL's GRPOTrainer beside this project's `train.py --algo grpo`: time per step and final greedy accuracy, at equal
settings, over several seeds.

Run from the repository root with the project's virtualenv; the TRL side runs in a virtualenv of its own (TRL is never
a requirement of the project):

    python3 -m venv .trl-venv && .trl-venv/bin/pip install -r benchmarks/trl_requirements.txt
    python benchmarks/trl_compare.py                        # seeds 0-4, 300 steps per side (~10 min on 2 idle cores)
    python benchmarks/trl_compare.py --seeds 0,1,2 --steps 300
    python benchmarks/trl_compare.py --quick                # smoke test: seed 0, 10 steps per side

What happens, in order:
 1. `train.py --algo sft` builds the embedded task once (embedded_data/{train,test}.jsonl, "a+b=" prompts) and the tiny
    SFT-warmed Llama (hf/): both sides start from this one saved checkpoint and read these files.
 2. The SFT model's greedy accuracy on the test prompts (the start accuracy, the same for both sides).
 3. A loss check (--check-loss, on by default, ~15 s): one TRL rollout batch, the policy moved off the reference;
    TRL's loss and gradient against ours on that very batch (run_check_side). They agree to ~2e-4 relative, the
    difference being the ε in the advantages' std division (TRL 1e-4, ours 1e-6).
 4. For each seed, each side as its own process, one after the other (never concurrently), the order alternating
    by seed so that a drift of the machine's load does not always favour the same side:
      ours  `train.py --algo grpo --model sft_model --dataset embedded_data ...`; time per step from metrics.jsonl
            (`step_time_s`: generate → score → reference log-probs → advantages → update; evaluation, logging and
            the final checkpoint/export are outside it);
      TRL   this file again with `--side trl` under the TRL virtualenv: GRPOTrainer with the config of trl_config();
            time per step from a TrainerCallback, on_step_begin → on_step_end (generation, scoring, reference
            log-probs, loss, backward, clipping, optimizer and scheduler step; the dataloader fetch before
            on_step_begin and the logging after on_step_end are outside it, as ours).
 5. The final greedy accuracy of both sides by one function, greedy_accuracy(), on the saved final models.
 6. A Markdown table (stdout and benchmarks/results/trl_compare.md) and every number in trl_compare.json.

Equal settings (SETTINGS below): 16 prompts × 8 completions = 128 sequences per step and per optimizer step
(on-policy: π_θold is the update's own first forward pass on both sides), β = 0.04 with the k3 estimator, lr 3e-4
constant without warmup, AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0), gradient clipping at norm 1.0, ε = 0.2
both sides, token-mean loss over the whole batch (TRL loss_type="dapo"), group-std-scaled advantages, at most 4 new
tokens, temperature 1 with no top-k/top-p, no entropy bonus, fp32 on the CPU (CUDA hidden), one process, the same
number of torch threads (--threads, default 1) for both sides and for the accuracy evaluation.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TRL_PYTHON = os.path.join(REPO, ".trl-venv", "bin", "python")  # a virtualenv in the checkout

# The settings both sides run with (the list); flag names of train.py and field names of GRPOConfig below.
SETTINGS = dict(prompts_per_step=16, group_size=8, beta=0.04, lr=3e-4, max_new_tokens=4, temperature=1.0, eps=0.2,
                max_grad_norm=1.0, weight_decay=0.0)


# ======================================================================================================================
# Shared: the final greedy accuracy of a saved model, the same function for both sides
# ======================================================================================================================
def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def greedy_accuracy(model_dir: str, test_path: str, tokenizer_dir: str, max_new_tokens: int) -> float:
    """Fraction of test prompts whose greedy completion (at most max_new_tokens, stopping at EOS) rewards.math_reward
    scores 1.0. One left-padded batch; generate() derives the position ids from the attention mask. The tokenizer is
    always the SFT model's (both sides save the same character tokenizer), so only the weights differ between calls."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    sys.path.insert(0, REPO)
    import rewards

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars
    rows = read_jsonl(test_path)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # Greedy and nothing else: every field that could add a logits processor is left unset or neutral
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    enc = tok([r["question"] for r in rows], return_tensors="pt", padding=True)  # (N, P)
    with torch.no_grad():
        out = model.generate(**enc, generation_config=config)  # (N, P + T)
    completions = out[:, enc["input_ids"].shape[1]:].tolist()  # (N, T)
    texts = [tok.decode(c[: c.index(tok.eos_token_id)] if tok.eos_token_id in c else c, skip_special_tokens=True)
             for c in completions]  # the text before the first EOS
    return sum(rewards.math_reward(t, r["answer"]) == 1.0 for t, r in zip(texts, rows)) / len(rows)


def step_stats(times_s: list[float], skip: int) -> dict:
    """Median and mean step time in ms over the steps after the first `skip` (warm-up: allocator, caches)."""
    kept = times_s[skip:] if len(times_s) > skip else times_s
    return {"median_ms": 1e3 * statistics.median(kept), "mean_ms": 1e3 * statistics.fmean(kept),
            "min_ms": 1e3 * min(kept), "steps_timed": len(kept), "steps_skipped": len(times_s) - len(kept)}


# ======================================================================================================================
# Our side: train.py as a subprocess
# ======================================================================================================================
def ours_command(python: str, model_dir: str, data_dir: str, out: str, seed: int, steps: int) -> list[str]:
    s = SETTINGS
    flags = {
        "--algo": "grpo", "--model": model_dir, "--dataset": data_dir,  # the directory: train.jsonl and test.jsonl
        "--prompts-per-step": s["prompts_per_step"], "--group-size": s["group_size"],
        "--epochs": 1, "--minibatch-size": s["prompts_per_step"] * s["group_size"],  # one optimizer step per batch
        "--micro-batch-size": s["prompts_per_step"] * s["group_size"],  # one forward of 128 (TRL: one chunk of 128)
        "--beta": s["beta"], "--kl-estimator": "k3", "--lr": s["lr"], "--lr-schedule": "constant",
        "--weight-decay": s["weight_decay"], "--max-grad-norm": s["max_grad_norm"], "--eps": s["eps"],
        "--max-new-tokens": s["max_new_tokens"], "--temperature": s["temperature"], "--mask-truncated": "false",
        "--loss-agg": "token-mean", "--scale-rewards": "true", "--ent-coef": 0, "--reward": "math",
        "--steps": steps, "--eval-size": 200, "--eval-every": steps,  # train.py's own eval at step 0 and at the end
        "--save-every": 0, "--export": "true",  # one checkpoint + OUT/hf export, after the last timed step
        "--plot": "false", "--dtype": "fp32", "--seed": seed, "--out": out,
    }
    return [python, os.path.join(REPO, "train.py")] + [str(x) for kv in flags.items() for x in kv]


def read_ours(out: str) -> dict:
    """Step times, phase times and train.py's own eval accuracies from OUT/metrics.jsonl."""
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    steps = [r for r in rows if "step_time_s" in r]
    evals = [r for r in rows if "eval_accuracy" in r]
    phases = {k.removeprefix("time_").removesuffix("_s"): [r[k] for r in steps]
              for k in steps[0] if k.startswith("time_") and k.endswith("_s")} if steps else {}
    return {"step_times_s": [r["step_time_s"] for r in steps], "phases_s": phases,
            "reward_mean": [r["reward_mean"] for r in steps],
            "internal_eval": [(r["step"], r["eval_accuracy"]) for r in evals]}


# ======================================================================================================================
# TRL side: GRPOTrainer, run by this file under the TRL virtualenv (--side trl)
# ======================================================================================================================
def trl_config(out_dir: str, seed: int, steps: int) -> dict:
    """Every GRPOConfig field set, and why. Defaults that already match are set anyway, so the comparison does not
    depend on TRL's defaults staying as they are in 1.13."""
    s = SETTINGS
    batch = s["prompts_per_step"] * s["group_size"]
    return dict(
        output_dir=out_dir,
        # batch: 128 completions per device step = 16 prompts × 8; one generation per optimizer step (on-policy):
        # generation_batch_size = per_device_train_batch_size × processes × steps_per_generation = 128
        per_device_train_batch_size=batch, num_generations=s["group_size"], gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, max_steps=steps,
        # optimizer: torch AdamW (not the fused kernel TRL picks by default; ours is torch.optim.AdamW's default)
        optim="adamw_torch", learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=s["weight_decay"], adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        max_grad_norm=s["max_grad_norm"],
        # loss: clipped surrogate ε = 0.2 both sides, + β·k3 to the frozen reference, Σ over all tokens / #tokens
        beta=s["beta"], epsilon=s["eps"], epsilon_high=s["eps"], delta=None, loss_type="dapo",
        importance_sampling_level="token", scale_rewards="group", multi_objective_aggregation="sum_then_normalize",
        use_bias_correction_kl=False,  # 1.13 default True multiplies k3 by ρ: another KL gradient than ours
        mask_truncated_completions=False, top_entropy_quantile=1.0, entropy_coef=0.0, off_policy_mask_threshold=None,
        # sampling: softmax(logits/τ) only, at most 4 new tokens, transformers' generate (no vLLM, no paged batching)
        temperature=s["temperature"], top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0,
        max_completion_length=s["max_new_tokens"], use_vllm=False, use_transformers_continuous_batching=False,
        # device and precision: fp32 on the CPU, the whole graph kept (TRL defaults to gradient checkpointing on)
        use_cpu=True, bf16=False, fp16=False, model_init_kwargs={"dtype": "float32"},
        activation_checkpointing=False, gradient_checkpointing=False,  # the second: TRL's name, transformers' old one
        torch_compile=False,
        # data: TRL's RepeatSampler, shuffled by the seed (16 distinct prompts per step, an epoch without replacement)
        shuffle_dataset=True, seed=seed, data_seed=seed, dataloader_num_workers=0, remove_unused_columns=False,
        # no logging, saving, evaluation or progress bar inside the timed loop
        logging_strategy="no", report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        log_completions=False,
    )


def run_trl_side(args) -> None:
    """Train with GRPOTrainer, time each step and its phases, save the final model to OUT/final, write OUT/trl_side.json."""
    import torch

    torch.set_num_threads(args.threads)
    import datasets
    import transformers
    import trl
    from transformers import AutoTokenizer, TrainerCallback

    sys.path.insert(0, REPO)
    import rewards

    def math_reward(completions, answer, **kwargs):  # TRL passes the dataset's other columns as keyword arguments
        return [rewards.math_reward(c, a) for c, a in zip(completions, answer)]

    rows = read_jsonl(os.path.join(args.data, "train.jsonl"))
    dataset = datasets.Dataset.from_list([{"prompt": r["question"], "answer": r["answer"]} for r in rows])  # plain text
    wanted = trl_config(os.path.join(args.out, "trainer"), args.seed, args.steps)
    config = trl.GRPOConfig(**wanted)
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step, and of its phases through the wrapped trainer methods below."""

        def __init__(self):
            self.steps, self.phases, self.intervals, self.batches = [], [], [], []
            self.current, self.t0, self.last_end = {}, 0.0, None

        def on_step_begin(self, *a, **kw):
            self.current = {}
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **kw):
            now = time.perf_counter()
            self.steps.append(now - self.t0)
            self.phases.append(self.current)
            if self.last_end is not None:
                self.intervals.append(now - self.last_end)  # end → end: everything, logging and data fetch included
            self.last_end = now
            if len(self.steps) % 10 == 0 or len(self.steps) == args.steps:
                print(f"trl step {len(self.steps)}/{args.steps} {1e3 * self.steps[-1]:.0f} ms", flush=True)

    timer = StepTimer()
    trainer = trl.GRPOTrainer(model=args.model, reward_funcs=[math_reward], args=config, train_dataset=dataset,
                              processing_class=tok, callbacks=[timer])

    # Phases comparable with train.py's: generate (tokenize, sample, decode), score (the reward function), forward
    # (the rest of _generate_and_score_completions: reference log-probs, advantages, metrics) and update (the rest of
    # the step: loss forward and backward, clipping, optimizer). Private methods of TRL 1.13, wrapped on the instance;
    # a release without them gives the whole step only.
    rewards_per_step = []

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            result = fn(*a, **kw)
            timer.current[name] = timer.current.get(name, 0.0) + time.perf_counter() - t
            if name == "rollout":  # what one generation batch holds: sequences and distinct prompts
                timer.batches.append((len(a[0]), len({x["prompt"] for x in a[0]})))
            if name == "score":  # (B, number of reward functions): one function of weight 1 here
                rewards_per_step.append(float(result.float().nanmean()))
            return result
        return wrapper

    phase_hooks = all(hasattr(trainer, m) for m in ("_generate", "_calculate_rewards", "_generate_and_score_completions"))
    if phase_hooks:
        trainer._generate = timed("generate", trainer._generate)
        trainer._calculate_rewards = timed("score", trainer._calculate_rewards)
        trainer._generate_and_score_completions = timed("rollout", trainer._generate_and_score_completions)

    t_train = time.perf_counter()
    trainer.train()
    train_wall = time.perf_counter() - t_train
    trainer.save_model(os.path.join(args.out, "final"))

    phases = {}
    if phase_hooks:
        for name in ("generate", "score"):
            phases[name] = [p.get(name, 0.0) for p in timer.phases]
        phases["forward"] = [p.get("rollout", 0.0) - p.get("generate", 0.0) - p.get("score", 0.0) for p in timer.phases]
        phases["update"] = [s - p.get("rollout", 0.0) for s, p in zip(timer.steps, timer.phases)]
    effective = {k: getattr(config, k) for k in ("generation_batch_size", "steps_per_generation", "num_generations",
                 "per_device_train_batch_size", "gradient_accumulation_steps", "num_iterations", "scale_rewards",
                 "loss_type", "epsilon", "epsilon_high", "beta", "use_bias_correction_kl", "optim", "learning_rate",
                 "lr_scheduler_type", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                 "max_grad_norm", "activation_checkpointing", "bf16", "temperature", "top_k", "top_p",
                 "max_completion_length", "shuffle_dataset", "seed")}
    result = {
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "threads": torch.get_num_threads(), "device": str(trainer.accelerator.device),
        "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer).__name__,
        "step_times_s": timer.steps, "step_intervals_s": timer.intervals, "phases_s": phases,
        "batches": timer.batches, "reward_mean": rewards_per_step, "train_wall_s": train_wall,
        "model_activation_checkpointing": bool(getattr(trainer.model, "is_activation_checkpointing", False)),
        "config_set": {k: v for k, v in wanted.items() if k != "output_dir"},
        "config_effective": {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v) for k, v in effective.items()},
    }
    with open(os.path.join(args.out, "trl_side.json"), "w") as f:
        json.dump(result, f, indent=1)


def run_check_side(args) -> None:
    """Same batch, same weights, both losses: TRL's GRPOTrainer._compute_loss against this project's loss pieces
    (logprobs.sequence_logprobs, grpo.group_advantages, ppo.clipped_surrogate_loss, grpo.grpo_loss), gradient against
    gradient. The policy is first moved off the reference (fixed noise), so that the β·KL term and its gradient are
    not zero. Run once with trl_config() and once with TRL's default use_bias_correction_kl=True, to show what
    equalising that field changes. Writes OUT/loss_check.json."""
    import torch

    torch.set_num_threads(args.threads)
    import datasets
    import trl
    from transformers import AutoTokenizer

    sys.path.insert(0, REPO)
    import grpo
    import logprobs as logprobs_lib
    import ppo
    import rewards

    s, G = SETTINGS, SETTINGS["group_size"]
    rows = read_jsonl(os.path.join(args.data, "train.jsonl"))
    dataset = datasets.Dataset.from_list([{"prompt": r["question"], "answer": r["answer"]} for r in rows])
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"

    def math_reward(completions, answer, **kwargs):
        return [rewards.math_reward(c, a) for c, a in zip(completions, answer)]

    def flat_grad(model):
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    result = {}
    for bias_correction in (False, True):
        config = trl_config(os.path.join(args.out, "trainer"), 0, 1) | {"use_bias_correction_kl": bias_correction}
        trainer = trl.GRPOTrainer(model=args.model, reward_funcs=[math_reward], args=trl.GRPOConfig(**config),
                                  train_dataset=dataset, processing_class=tok)
        policy = trainer.model.train()
        torch.manual_seed(1)
        with torch.no_grad():  # π_θ ≠ π_ref: a KL of about 0.5-1 nat per token
            for p in policy.parameters():
                p.add_(0.02 * torch.randn_like(p))
        batch = [{"prompt": r["question"], "answer": r["answer"]} for r in rows[: s["prompts_per_step"]] for _ in range(G)]
        inputs = trainer._generate_and_score_completions(batch)  # TRL's rollout: samples, rewards, A, ref log-probs
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is not running here
        policy.zero_grad()
        loss_trl = trainer._compute_loss(policy, inputs)
        loss_trl.backward()
        grad_trl = flat_grad(policy).clone()

        # ours on TRL's very batch
        policy.zero_grad()
        P = inputs["prompt_ids"].shape[1]
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)  # (B, S)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)  # (B, S)
        mask = inputs["completion_mask"].float()  # (B, T)
        texts = tok.batch_decode(inputs["completion_ids"], skip_special_tokens=True)
        scores = torch.tensor([rewards.math_reward(t, b["answer"]) for t, b in zip(texts, batch)])  # (B,)
        adv = grpo.group_advantages(scores.view(-1, G), scale=True).reshape(-1)  # (B,)
        logprobs, _ = logprobs_lib.sequence_logprobs(policy, ids, attention, P, s["temperature"])  # (B, T)
        with torch.no_grad():
            ref_logprobs, _ = logprobs_lib.sequence_logprobs(trainer.ref_model, ids, attention, P, s["temperature"])
        pg = ppo.clipped_surrogate_loss(logprobs, logprobs.detach(), adv[:, None], eps=s["eps"])  # on-policy: ρ = 1
        ours = grpo.grpo_loss(pg, grpo.kl_k3(logprobs, ref_logprobs), mask, beta=s["beta"], loss_agg="token-mean",
                              max_len=s["max_new_tokens"])
        ours["loss"].backward()
        grad_ours = flat_grad(policy).clone()
        result[f"use_bias_correction_kl={bias_correction}"] = {
            "loss_trl": loss_trl.item(), "loss_ours": ours["loss"].item(),
            "grad_rel_diff": ((grad_trl - grad_ours).norm() / grad_ours.norm()).item(),
            "grad_cosine": torch.nn.functional.cosine_similarity(grad_trl, grad_ours, 0).item(),
            "advantage_max_abs_diff": (adv - inputs["advantages"]).abs().max().item(),
            "ref_logprob_max_abs_diff": ((ref_logprobs - inputs["ref_per_token_logps"]).abs() * mask).max().item(),
            "kl_k3_per_token": ((grpo.kl_k3(logprobs.detach(), ref_logprobs) * mask).sum() / mask.sum()).item(),
            "reward_mean": scores.mean().item(), "sequences": len(batch), "T": mask.shape[1]}
    with open(os.path.join(args.out, "loss_check.json"), "w") as f:
        json.dump(result, f, indent=1)


# ======================================================================================================================
# The comparison: build the SFT model once, run each (seed, side), evaluate, report
# ======================================================================================================================
def check_pythons(args) -> None:
    """One clear line and exit 2 when the TRL virtualenv is missing or has no trl; before anything heavy."""
    req = os.path.relpath(os.path.join(REPO, "benchmarks", "trl_requirements.txt"))
    how = (f"create it with `python3 -m venv .trl-venv && .trl-venv/bin/pip install -r {req}` "
           "or pass --trl-python PATH")
    if not (os.path.isfile(args.trl_python) and os.access(args.trl_python, os.X_OK)):
        sys.exit(print(f"error: no TRL virtualenv Python at {args.trl_python}: {how}", file=sys.stderr) or 2)
    probe = subprocess.run([args.trl_python, "-c", "import trl, accelerate, datasets; print(trl.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode:
        sys.exit(print(f"error: {args.trl_python} cannot import trl/accelerate/datasets: {how}", file=sys.stderr) or 2)
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("torch", "transformers")):  # the accuracy evaluation runs here
        sys.exit(print(f"error: {sys.executable} has no torch/transformers: run this with the project's virtualenv "
                       "(e.g. .venv/bin/python benchmarks/trl_compare.py)", file=sys.stderr) or 2)


def child_env(threads: int) -> dict:
    """Both sides: the same thread count, CPU only, nothing fetched from a hub, no advisory noise."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
               PYTHONUNBUFFERED="1", WANDB_DISABLED="true")
    return env


def run_logged(cmd: list[str], log_path: str, threads: int, fatal: bool = True) -> float | None:
    """Run cmd with its output in log_path; its wall time in seconds. On failure: the log's tail, and exit 1 (None
    when not fatal)."""
    t = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(threads), cwd=REPO).returncode
    if code:
        tail = open(log_path).read().splitlines()[-25:]
        print("\n".join(tail), file=sys.stderr)
        message = f"exit code {code} from `{' '.join(cmd[:3])} ...` (log: {log_path})"
        if not fatal:
            print(f"warning: {message}", file=sys.stderr)
            return None
        sys.exit(print(f"error: {message}", file=sys.stderr) or 1)
    return time.perf_counter() - t


def build_sft(args, work: str) -> tuple[str, str]:
    """train.py --algo sft: the embedded data set and the SFT-warmed tiny model, as the warm start builds them."""
    out = os.path.join(work, "sft")
    model_dir, data_dir = os.path.join(out, "hf"), os.path.join(out, "embedded_data")
    if not (args.reuse_sft and os.path.isdir(model_dir) and os.path.isfile(os.path.join(data_dir, "test.jsonl"))):
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        print(f"building the SFT model and data with train.py --algo sft (seed {args.sft_seed}) in {out}", flush=True)
        run_logged([args.ours_python, os.path.join(REPO, "train.py"), "--algo", "sft", "--out", out,
                    "--plot", "false", "--seed", str(args.sft_seed)], os.path.join(work, "sft.log"), args.threads)
    else:
        print(f"reusing the SFT model and data in {out} (--reuse-sft)", flush=True)
    return model_dir, data_dir


def run_side(side: str, seed: int, args, model_dir: str, data_dir: str, work: str) -> dict:
    out = os.path.join(work, f"{side}_seed{seed}")
    import shutil

    shutil.rmtree(out, ignore_errors=True)  # a fresh run every time (train.py refuses a stale --out without --resume)
    os.makedirs(out)
    if side == "ours":
        wall = run_logged(ours_command(args.ours_python, model_dir, data_dir, out, seed, args.steps),
                          os.path.join(work, f"{side}_seed{seed}.log"), args.threads)
        raw, final_dir = read_ours(out), os.path.join(out, "hf")
    else:
        cmd = [args.trl_python, os.path.abspath(__file__), "--side", "trl", "--model", model_dir, "--data", data_dir,
               "--out", out, "--seed", str(seed), "--steps", str(args.steps), "--threads", str(args.threads)]
        wall = run_logged(cmd, os.path.join(work, f"{side}_seed{seed}.log"), args.threads)
        raw, final_dir = json.load(open(os.path.join(out, "trl_side.json"))), os.path.join(out, "final")
    if len(raw["step_times_s"]) != args.steps:
        sys.exit(print(f"error: {side} seed {seed} timed {len(raw['step_times_s'])} steps, not {args.steps}",
                       file=sys.stderr) or 1)
    acc = greedy_accuracy(final_dir, os.path.join(data_dir, "test.jsonl"), model_dir, SETTINGS["max_new_tokens"])
    tail = max(1, args.steps // 10)
    row = {"seed": seed, "side": side, **step_stats(raw["step_times_s"], args.skip_steps), "final_accuracy": acc,
           "phases_median_ms": {k: 1e3 * statistics.median(v[args.skip_steps:] or v) for k, v in raw["phases_s"].items()},
           "train_reward_last_10pct": statistics.fmean(raw["reward_mean"][-tail:]) if raw["reward_mean"] else None,
           "process_wall_s": wall, "out": os.path.relpath(out, REPO), "raw": raw}
    print(f"{side:>4} seed {seed}: median step {row['median_ms']:.1f} ms, mean {row['mean_ms']:.1f} ms, "
          f"final greedy accuracy {acc:.3f}", flush=True)
    return row


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict]) -> dict:
    out = {}
    for side in ("ours", "trl"):
        mine = [r for r in runs if r["side"] == side]
        out[side] = {"seeds": len(mine), "median_ms": spread([r["median_ms"] for r in mine]),
                     "mean_ms": spread([r["mean_ms"] for r in mine]),
                     "final_accuracy": spread([r["final_accuracy"] for r in mine]),
                     "final_accuracy_range": (min(r["final_accuracy"] for r in mine), max(r["final_accuracy"] for r in mine))}
    by_seed = {(r["seed"], r["side"]): r["median_ms"] for r in runs}
    ratios = [by_seed[s, "ours"] / by_seed[s, "trl"] for s in sorted({r["seed"] for r in runs})]
    out["ratio_ours_over_trl_median_step"] = {"of_means": out["ours"]["median_ms"][0] / out["trl"]["median_ms"][0],
                                               "per_seed_min": min(ratios), "per_seed_max": max(ratios)}
    return out


def markdown(report: dict) -> str:
    s, runs, summ = report["settings"], report["runs"], report["summary"]
    phase_names = ("generate", "score", "forward", "update")
    lines = [
        "# TRL GRPOTrainer vs train.py --algo grpo",
        "",
        f"{s['prompts_per_step']} prompts × {s['group_size']} completions per step, β {s['beta']} (k3), lr {s['lr']} "
        f"constant, ε {s['eps']}, ≤ {s['max_new_tokens']} new tokens, T = {s['temperature']}, token-mean loss, "
        f"{report['steps']} steps, fp32 CPU, {report['threads']} torch thread(s) per side, one process, sides run "
        f"one after the other. Step times: median and mean over steps {report['skip_steps'] + 1}…{report['steps']}. "
        f"Accuracy: greedy, {report['n_test']} test prompts, the same function for both sides. "
        f"TRL {report['versions']['trl']}, transformers {report['versions']['transformers']}, torch "
        f"{report['versions']['torch']}. Load average {report['loadavg_start']} at start, {report['loadavg_end']} at end.",
        "",
        "| seed | side | median step ms | mean step ms | final accuracy | start accuracy | "
        + " | ".join(f"{p} ms" for p in phase_names) + " |",
        "|---:|---|---:|---:|---:|---:|" + "---:|" * len(phase_names),
    ]
    for r in runs:
        ph = " | ".join(f"{r['phases_median_ms'][p]:.1f}" if p in r["phases_median_ms"] else "-" for p in phase_names)
        lines.append(f"| {r['seed']} | {r['side']} | {r['median_ms']:.1f} | {r['mean_ms']:.1f} | "
                     f"{r['final_accuracy']:.3f} | {report['start_accuracy']:.3f} | {ph} |")
    lines += ["", "| side | seeds | median step ms (mean ± sd over seeds) | mean step ms | final accuracy (mean ± sd) "
                  "| final accuracy range |", "|---|---:|---:|---:|---:|---|"]
    for side in ("ours", "trl"):
        x = summ[side]
        lines.append(f"| {side} | {x['seeds']} | {x['median_ms'][0]:.1f} ± {x['median_ms'][1]:.1f} | "
                     f"{x['mean_ms'][0]:.1f} ± {x['mean_ms'][1]:.1f} | {x['final_accuracy'][0]:.3f} ± "
                     f"{x['final_accuracy'][1]:.3f} | {x['final_accuracy_range'][0]:.3f}–{x['final_accuracy_range'][1]:.3f} |")
    r = summ["ratio_ours_over_trl_median_step"]
    lines += ["", f"Median step time, ours / TRL: {r['of_means']:.2f} (per seed {r['per_seed_min']:.2f}–"
                  f"{r['per_seed_max']:.2f}; below 1 = ours faster).", ""]
    lines += ["Phases (median ms): generate = sampling and decoding; score = the reward; forward = reference "
              "log-probs and advantages (TRL: also its batch padding and metrics); update = loss forward, backward, "
              "clipping and the optimizer step. Per-step times, the TRL config and every number: trl_compare.json."]
    if report.get("loss_check"):
        c, d = report["loss_check"]["use_bias_correction_kl=False"], report["loss_check"]["use_bias_correction_kl=True"]
        lines += ["", f"Loss check (one TRL batch of {c['sequences']}, policy moved off the reference, k3 "
                      f"{c['kl_k3_per_token']:.2f}/token): loss TRL {c['loss_trl']:.6g}, ours {c['loss_ours']:.6g}; "
                      f"gradients differ by {c['grad_rel_diff']:.1e} relative (the advantages' ε: TRL 1e-4, ours "
                      f"1e-6; max |ΔA| {c['advantage_max_abs_diff']:.1e}). With TRL's default "
                      f"use_bias_correction_kl=True they would differ by {d['grad_rel_diff']:.1e}."]
    if report.get("warnings"):
        lines += [""] + [f"Warning: {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def orchestrate(args) -> int:
    check_pythons(args)
    import torch

    torch.set_num_threads(args.threads)  # the accuracy evaluation, with the sides' thread count
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    work = os.path.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    start_load, t0 = loadavg(), time.time()
    model_dir, data_dir = build_sft(args, work)
    test_path = os.path.join(data_dir, "test.jsonl")
    start_acc = greedy_accuracy(model_dir, test_path, model_dir, SETTINGS["max_new_tokens"])
    print(f"start (SFT) greedy accuracy {start_acc:.3f} on {len(read_jsonl(test_path))} test prompts", flush=True)

    runs, warnings, loss_check = [], [], None
    if args.check_loss:
        out = os.path.join(work, "loss_check")
        os.makedirs(out, exist_ok=True)
        # not fatal: it uses logprobs.sequence_logprobs and TRL internals, either of which may change under it
        ok = run_logged([args.trl_python, os.path.abspath(__file__), "--side", "check", "--model", model_dir, "--data",
                         data_dir, "--out", out, "--threads", str(args.threads)], os.path.join(work, "loss_check.log"),
                        args.threads, fatal=False)
        if ok is None:
            warnings.append(f"the loss check failed (log: {os.path.join(work, 'loss_check.log')}); the runs went on")
        else:
            loss_check = json.load(open(os.path.join(out, "loss_check.json")))
    if loss_check:
        c = loss_check["use_bias_correction_kl=False"]
        print(f"loss check, one batch: TRL loss {c['loss_trl']:.6g}, ours {c['loss_ours']:.6g}, gradient relative "
              f"difference {c['grad_rel_diff']:.2e} (with TRL's default use_bias_correction_kl=True: "
              f"{loss_check['use_bias_correction_kl=True']['grad_rel_diff']:.2e})", flush=True)
        if c["grad_rel_diff"] > 1e-2:
            warnings.append(f"the loss check's gradients differ by {c['grad_rel_diff']:.2e} (relative): the two sides "
                            "do not optimise the same loss")
    for i, seed in enumerate(seeds):
        for side in (("ours", "trl") if i % 2 == 0 else ("trl", "ours")):
            runs.append(run_side(side, seed, args, model_dir, data_dir, work))
    runs.sort(key=lambda r: (r["seed"], r["side"]))

    # Cross-checks: train.py's own greedy evaluations against the shared function; TRL's batch shape per step
    for r in runs:
        if r["side"] == "ours" and r["raw"]["internal_eval"]:
            (s0, a0), (s1, a1) = r["raw"]["internal_eval"][0], r["raw"]["internal_eval"][-1]
            r["internal_eval_start_end"] = (a0, a1)
            if s0 == 0 and abs(a0 - start_acc) > 1e-9 or s1 == args.steps and abs(a1 - r["final_accuracy"]) > 1e-9:
                warnings.append(f"seed {r['seed']}: train.py's own eval ({a0:.3f} → {a1:.3f}) differs from the shared "
                                f"function ({start_acc:.3f} → {r['final_accuracy']:.3f})")
        if r["side"] == "trl":
            shapes = set(map(tuple, r["raw"]["batches"]))
            want = (SETTINGS["prompts_per_step"] * SETTINGS["group_size"], SETTINGS["prompts_per_step"])
            if shapes and shapes != {want}:
                warnings.append(f"seed {r['seed']}: TRL generation batches (sequences, distinct prompts) {sorted(shapes)}, "
                                f"expected {want}")
    trl_raw = next(r["raw"] for r in runs if r["side"] == "trl")
    report = {
        "command": " ".join([os.path.relpath(sys.executable)] + sys.argv), "settings": SETTINGS, "steps": args.steps,
        "seeds": seeds, "skip_steps": args.skip_steps, "threads": args.threads, "start_accuracy": start_acc,
        "n_test": len(read_jsonl(test_path)), "versions": trl_raw["versions"], "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "loadavg_start": start_load, "loadavg_end": loadavg(),
        "runtime_s": time.time() - t0, "work_dir": os.path.relpath(work, REPO),
        "sft_model": os.path.relpath(model_dir, REPO), "data": os.path.relpath(data_dir, REPO),
        "ours_flags": ours_command("python", "SFT_MODEL", "DATA", "OUT", 0, args.steps)[2:],
        "trl_config": trl_raw["config_set"], "trl_config_effective": trl_raw["config_effective"],
        "trl_optimizer": trl_raw["optimizer"], "loss_check": loss_check, "summary": summarize(runs),
        "warnings": warnings, "runs": runs,
    }
    text = markdown(report)
    print("\n" + text)
    os.makedirs(args.results_dir, exist_ok=True)
    stem = os.path.join(args.results_dir, "trl_compare" + ("_quick" if args.quick else ""))
    with open(stem + ".md", "w") as f:
        f.write(text)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {stem}.md and {stem}.json")
    return 0


def strict_bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
    return text.lower() == "true"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--seeds", default=None, help="comma-separated seeds, each run on both sides (default 0,1,2,3,4)")
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (default 300)")
    p.add_argument("--quick", action="store_true", help="smoke test: seed 0, 10 steps (unless given), results *_quick.*")
    p.add_argument("--skip-steps", type=int, default=None, help="first steps left out of the step-time statistics "
                   "(default 10: train.py's steps still settle over the first ~10; 2 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per side and for the evaluation")
    p.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON, help="Python of the TRL virtualenv")
    p.add_argument("--ours-python", default=sys.executable, help="Python that runs train.py (default: this one)")
    p.add_argument("--work-dir", default=os.path.join(REPO, "out", "trl_compare"), help="runs, logs and models")
    p.add_argument("--results-dir", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--reuse-sft", action="store_true", help="reuse WORK/sft from an earlier run instead of building "
                   "it again (train.py's warm start may have changed since)")
    p.add_argument("--sft-seed", type=int, default=0, help="seed of train.py --algo sft (the SFT model)")
    p.add_argument("--check-loss", type=strict_bool, default=True,
                   help="first compare both losses and gradients on one batch (default true; false to skip)")
    # internal: the TRL side, run by the comparison under --trl-python
    p.add_argument("--side", choices=["trl", "check"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = "0" if args.quick else "0,1,2,3,4"
    if args.steps is None:
        args.steps = 10 if args.quick else 300
    if args.skip_steps is None:
        args.skip_steps = 2 if args.quick else 10
    if args.steps < 1 or args.threads < 1 or args.skip_steps < 0:
        p.error("--steps and --threads must be at least 1, --skip-steps at least 0")
    if args.side:
        (run_trl_side if args.side == "trl" else run_check_side)(args)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
