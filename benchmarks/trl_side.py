"""The TRL side of benchmarks/trl_compare.py: TRL's GRPOTrainer with the GRPOConfig of trl_config(), timed step by
step. trl_compare.py runs this file under the TRL virtualenv (TRL is never a requirement of the project):

    .trl-venv/bin/python benchmarks/trl_side.py --model DIR --dataset DIR --out OUT --seed S --steps N --threads 1

DIR/train.jsonl holds the prompts (question, answer); the reward is rewards.math_reward, as train.py's --reward math.
tests/test_trl_equivalence.py checks on one batch that GRPOTrainer under trl_config() computes train.py's loss and
gradient.
"""
import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks.trl_compare import PHASES, SETTINGS, read_jsonl  # noqa: E402


def trl_config(out_dir: str, seed: int, steps: int) -> dict:
    """Every GRPOConfig field set, and why. Defaults that already match are set anyway, so the comparison does not
    depend on TRL's defaults staying as they are in 1.13."""
    s = SETTINGS
    return dict(
        output_dir=out_dir,
        # batch: 128 completions per device step = 16 prompts × 8; one generation per optimizer step (on-policy):
        # generation_batch_size = per_device_train_batch_size × processes × steps_per_generation = 128
        per_device_train_batch_size=s["prompts_per_step"] * s["group_size"], num_generations=s["group_size"],
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, max_steps=steps,
        # optimizer: torch AdamW (not the fused kernel TRL picks by default; ours is torch.optim.AdamW's default)
        optim="adamw_torch", learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=s["weight_decay"], adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        max_grad_norm=s["max_grad_norm"],
        # loss: clipped surrogate ε = 0.2 both sides, + β·k3 to the frozen reference, Σ over all tokens / #tokens
        beta=s["beta"], epsilon=s["eps"], epsilon_high=s["eps"], delta=None, loss_type="dapo",
        importance_sampling_level="token", scale_rewards="group", multi_objective_aggregation="sum_then_normalize",
        use_bias_correction_kl=False,  # 1.13 default True multiplies k3 by ρ: another KL gradient than ours
        mask_truncated_completions=False, top_entropy_quantile=1.0, entropy_coef=0.0, off_policy_mask_threshold=None,
        # sampling: softmax(logits/τ) only, at most max_new_tokens, transformers' generate (no vLLM, no paged batching)
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


def run(a) -> None:
    """Train with GRPOTrainer, time each step, save the final model to OUT/final, write OUT/side.json. Phases like
    train.py's through TRL 1.13's private methods, wrapped on the instance (a release without them: the step only):
    generate (tokenize, sample, decode), score (the reward), forward (the rest of _generate_and_score_completions:
    reference log-probs, advantages, metrics), update (the rest of the step: loss, backward, clipping, optimizer)."""
    import datasets
    import torch
    import transformers
    import trl

    import rewards

    torch.set_num_threads(a.threads)
    rows = read_jsonl(os.path.join(a.dataset, "train.jsonl"))
    chat = lambda q: [{"role": "user", "content": q}] if SETTINGS["chat_template"] else q  # noqa: E731  (TRL applies the template)
    dataset = datasets.Dataset.from_list([{"prompt": chat(r["question"]), "answer": r["answer"]} for r in rows])
    config = trl.GRPOConfig(**trl_config(os.path.join(a.out, "trainer"), a.seed, a.steps))
    tok = transformers.AutoTokenizer.from_pretrained(a.model, padding_side="left")
    times, phases, batches, t0 = [], [], [], [0.0]

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            phases.append({})
            t0[0] = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - t0[0])
            if len(times) % 10 == 0 or len(times) == a.steps:
                print(f"trl step {len(times)}/{a.steps} {1e3 * times[-1]:.0f} ms", flush=True)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            result = fn(*args, **kwargs)
            phases[-1][name] = phases[-1].get(name, 0.0) + time.perf_counter() - t
            if name == "rollout":  # what one generation batch holds: sequences and distinct prompts
                batches.append((len(args[0]), len({str(x["prompt"]) for x in args[0]})))
            return result
        return wrapper

    def math_reward(completions, answer, **kwargs):  # TRL passes the dataset's other columns as keyword arguments
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]  # a conversation's last turn
        return [rewards.math_reward(t, x) for t, x in zip(texts, answer)]

    trainer = trl.GRPOTrainer(model=a.model, reward_funcs=[math_reward], args=config, train_dataset=dataset,
                              processing_class=tok, callbacks=[StepTimer()])
    hooks = {"generate": "_generate", "score": "_calculate_rewards", "rollout": "_generate_and_score_completions"}
    hooked = all(hasattr(trainer, m) for m in hooks.values())
    for name, method in hooks.items() if hooked else ():
        setattr(trainer, method, timed(name, getattr(trainer, method)))
    trainer.train()
    trainer.save_model(os.path.join(a.out, "final"))
    split = [{"generate": p["generate"], "score": p["score"], "forward": p["rollout"] - p["generate"] - p["score"],
              "update": s - p["rollout"]} for p, s in zip(phases, times)] if hooked else []
    plain = lambda v: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)  # noqa: E731  (JSON)
    effective = [k for k in trl_config("", 0, 0) if k != "output_dir"] + ["generation_batch_size"]
    versions = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    result = {"versions": versions,
              "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
              "config_effective": {k: plain(getattr(config, k)) for k in effective}, "step_times_s": times,
              "phases_s": {k: [p[k] for p in split] for k in PHASES} if split else {}, "batches": batches}
    with open(os.path.join(a.out, "side.json"), "w") as f:
        json.dump(result, f, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="the start model (a Hugging Face directory)")
    p.add_argument("--dataset", required=True, help="a directory with train.jsonl (question, answer)")
    p.add_argument("--out", required=True, help="OUT/final: the trained model; OUT/side.json: the times")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
