"""The same GRPO configuration through TRL's GRPOTrainer, when trl is installed (optional; never a requirement).

Same saved model and tokenizer, same prompts, G, T, β, learning rate, one optimizer step per generation batch, fp32
on CPU. TRL's step is timed as a whole (TrainerCallback on_step_begin → on_step_end, fastest step after the first):
its generation, reference and update are not separable from outside. Keyword arguments GRPOConfig does not know in
the installed version are dropped (and listed in the result), since TRL renames its options between releases.
"""
import dataclasses
import os
import time

import torch

from benchmarks import common, rl_part


def available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def bench(size: str, cfg: dict, work_dir: str) -> dict:
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    model_dir = common.save_model(size, os.path.join(work_dir, f"model_{size}"))
    rows = rl_part.make_prompts(cfg["prompts"], cfg["P"], seed=0)
    B = cfg["prompts"] * cfg["group_size"]
    repeat = cfg["steps"] + 2
    dataset = datasets.Dataset.from_dict({"prompt": [p for p, _ in rows] * repeat,
                                          "answer": [a for _, a in rows] * repeat})

    def math_reward(completions, answer, **kwargs):
        import rewards

        return [rewards.math_reward(c, a) for c, a in zip(completions, answer)]

    wanted = dict(output_dir=os.path.join(work_dir, "trl"), learning_rate=1e-5, beta=0.04,
                  num_generations=cfg["group_size"], max_completion_length=cfg["T"], per_device_train_batch_size=B,
                  gradient_accumulation_steps=1, num_iterations=cfg["epochs"], max_steps=cfg["steps"] + 1,
                  temperature=1.0, top_k=0, top_p=1.0, logging_steps=1, save_strategy="no", report_to="none",
                  use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0, shuffle_dataset=False)
    known = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    args = trl.GRPOConfig(**{k: v for k, v in wanted.items() if k in known})
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **kw):
            times.append(time.perf_counter() - self.t0)

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[math_reward], args=args, train_dataset=dataset,
                              processing_class=tok, callbacks=[StepTimer()])
    trainer.train()
    timed = times[1:]  # the first step warms up
    return {"size": size, "trl_version": trl.__version__, "B": B, "G": cfg["group_size"], "T": cfg["T"],
            "steps_timed": len(timed), "t_step": min(timed) if timed else None,
            "dropped_options": sorted(set(wanted) - known)}


COLUMNS = [("size", "size"), ("trl_version", "trl"), ("B", "B"), ("G", "G"), ("T", "T"), ("t_step", "TRL step s"),
           ("ours_grpo_t_step", "train.py GRPO step s"),
           ("ours_grpo_t_step_without_reward", "… without its reward phase s")]
