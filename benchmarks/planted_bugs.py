"""Planted bugs: does the test meant to catch each wrong result fail when the code is wrong?

Each bug below is one textual change to one file (the change must match exactly once), planted in a copy of the
working tree; the tests named beside it run there (`python -m pytest -x`), and the bug *dies* when they fail, *survives*
when they pass. A bug that survives is a claim no test holds. The copy is thrown away; the tree is never touched.

    python benchmarks/planted_bugs.py                 # every bug: about 25 minutes on 2 cores
    python benchmarks/planted_bugs.py --only gold     # the bugs whose name starts with this; the rest keep their results

test_faults.py's runs fixture makes only the runs the chosen test reads when FAULT_JOBS names them (a comma-separated
list), so that one fault test does not pay for all of them. Results: benchmarks/results/planted_bugs.{json,md}.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
PIPE = "tests/test_pipeline.py::"
TRAIN = "tests/test_train.py::"
FAULTS = "tests/test_faults.py::"
# (name, the claim, file, old text, new text, tests, FAULT_JOBS or None); old and new may be tuples of texts
BUGS = [
    ("critic-affine-times-std", "PPO's critic from the reward model is V = R at step 0", "models.py",
     "return weight / std, -weight * mean / std", "return weight * std, -weight * mean / std",
     [PIPE + "test_critic_from_the_reward_model_is_the_reward_at_step_0_through_the_trainer"], None),
    ("critic-affine-sign-of-b", "the same", "models.py",
     "return weight / std, -weight * mean / std", "return weight / std, weight * mean / std",
     [PIPE + "test_critic_from_the_reward_model_is_the_reward_at_step_0_through_the_trainer"], None),
    ("critic-paths-as-strings", "the same, with the reward model named two ways", "models.py",
     "        return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))\n",
     "        return a == b\n",
     [PIPE + "test_critic_from_the_reward_model_is_the_reward_at_step_0_through_the_trainer"], None),
    ("gold-against-other-answers", "gold_reward_mean is the verifier's verdict", "scoring.py",
     "for t, a in zip(batch.texts, batch.answers)]", "for t, a in zip(batch.texts, batch.answers[::-1])]",
     [PIPE + "test_critic_from_the_reward_model_is_the_reward_at_step_0_through_the_trainer"], None),
    ("gold-in-the-training-reward", "gold is never trained on", "scoring.py",
     "    return total.to(run.device), gold\n",
     "    return (total + gold if gold is not None else total).to(run.device), gold\n",
     [PIPE + "test_critic_from_the_reward_model_is_the_reward_at_step_0_through_the_trainer"], None),
    ("workers-ignore-a-dead-torchrun", "no orphans when torchrun is killed", "run_dir.py",
     '    if "TORCHELASTIC_RUN_ID" not in os.environ:', "    if True:",
     [FAULTS + "test_workers_stop_when_torchrun_is_killed_and_resume_is_exact"],
     "agent_killed_then_resume,full_2ranks"),
    ("beta-not-resumed", "an adaptive β resumes after SIGKILL (PPO)", "train.py",
     'run.beta = float(meta["beta"]) if args.resume and args.adaptive_kl_target else args.beta',
     "run.beta = args.beta", [FAULTS + "test_exact_resume_after_sigkill[1]"], "ppo_adaptive,sigkill_then_resume"),
    ("resume-without-optimizer-state", "a resumed run's final weights and AdamW state equal the uninterrupted run's",
     "checkpoints.py", 'optim_state_dict=sd[name + "_optim"])', 'optim_state_dict=sd[name + "_optim"])\n        opt.state.clear()',
     [FAULTS + "test_exact_resume_after_sigkill[1]"], "ppo_adaptive,sigkill_then_resume"),
    ("nan-step-still-steps", "a non-finite step keeps the weights and AdamW's state", "optim.py",
     "for _, optimizer in trained.values() if finite else ():", "for _, optimizer in trained.values():",
     [FAULTS + "test_non_finite_loss_skips_the_step_and_keeps_the_weights"], "nan"),
    ("pad-is-unk", "a tokenizer without pad is padded with EOS", "models.py",
     "tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token",
     "tok.pad_token = tok.unk_token or tok.eos_token",
     [FAULTS + "test_tokenizer_without_pad_token_is_padded_with_eos"], "no_pad"),
    ("export-is-the-reference", "OUT/hf is the trained policy", "train.py",
     "checkpoints.export_hf(run.policy, run.tok, run.args.out, run.hf_generation_config)",
     "checkpoints.export_hf(run.ref or run.policy, run.tok, run.args.out, run.hf_generation_config)",
     [PIPE + "test_the_policy_export_is_the_trained_policy"], None),
    ("rm-std-from-one-side", "the reward model's stored std is its held-out scores' std", "reward_model.py",
     '"eval_reward_std": both.std().item()', '"eval_reward_std": chosen.std().item()',
     [PIPE + "test_the_reward_model_export_loads_as_it_is_and_stores_its_scale"], None),
    ("frozen-bytes-unsharded", "memory.json's frozen bytes are each rank's shard (prediction and measure wrong alike)",
     "metrics.py", ("fsdp2_local_numel(shapes=shapes[n], world_size=world, rank=rank)",
                    'measure_state_bytes(m)["params"] for n, m in frozen.items()}'),
     ("fsdp2_local_numel(shapes=shapes[n], world_size=1, rank=0)",
      'measure_state_bytes(m)["params"] * world for n, m in frozen.items()}'),
     [PIPE + "test_four_model_memory_reports_the_frozen_models"], None),
    ("plain-module-grad-norm", "one process (a plain module) logs what 2 FSDP2 ranks log", "optim.py",
     'float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)',
     'float(norm.full_tensor() if hasattr(norm, "full_tensor") else 2 * norm)',
     [TRAIN + "test_fsdp_one_rank_equals_two_ranks_and_a_plain_update"], None),
    ("rm-positions-from-padding", "a left-padded reward model scores at its last real token (GPT-2)", "scoring.py",
     "position_ids=position_ids,\n", "\n",
     ["tests/test_rewards.py::test_score_at_the_last_real_token_matches_one_row_at_a_time"], None),
    ("retry-every-launch", "the gloo-abort retry is only for the worker launches", "tests/test_train.py",
     "if p.returncode == 0 or not retry_abort or attempt == 2", "if p.returncode == 0 or attempt == 2",
     [TRAIN + "test_the_abort_retry_keeps_the_first_attempt_warns_and_is_asked_for"], None),
    ("rloo-keeps-itself", "RLOO leaves the sample out of its baseline", "grpo.py",
     "baseline = (d.sum(-1, keepdim=True) - d) / (n - 1).clamp(min=1)",
     "baseline = d.sum(-1, keepdim=True) / n.clamp(min=1)", ["tests/test_variants.py", "tests/test_grpo.py"], None),
    ("gspo-without-stop-gradient", "GSPO's gradient at θold is the token-level one", "ppo.py",
     "s = sequence_ratio(logprobs, old_logprobs, mask).detach()", "s = sequence_ratio(logprobs, old_logprobs, mask)",
     ["tests/test_variants.py", TRAIN + "test_variants_on_one_rank_equal_two_ranks_and_their_definitions"], None),
    ("correction-not-applied", "the sampler correction weighs the surrogate", "train.py",
     "            pg = pg * part.sampler_weights  # (b, T)", "            pg = pg  # (b, T)",
     [TRAIN + "test_variants_on_one_rank_equal_two_ranks_and_their_definitions"], None),
    ("dynamic-flat-first", "dynamic sampling keeps the groups with a spread", "train.py",
     "torch.cat([(~flat).nonzero(), flat.nonzero()])", "torch.cat([flat.nonzero(), (~flat).nonzero()])",
     [TRAIN + "test_dynamic_sampling_keeps_groups_with_a_spread_in_the_datas_order"], None),
    ("dynamic-draws-not-resumed", "dynamic sampling resumes exactly", "train.py",
     'run.draws = int(meta.get("draws", meta["step"]))', 'run.draws = int(meta["step"])',
     ["tests/test_variant_flags.py::test_dynamic_sampling_resumes_exactly"], None),
]


def copy_tree(dest: str) -> None:
    """The working tree as git sees it (tracked files and untracked ones not ignored), into dest."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split("\n")
    for name in filter(None, names):
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(dest, name))


def plant(bug: tuple) -> dict:
    name, claim, path, old, new, tests, jobs = bug
    with tempfile.TemporaryDirectory(prefix=f"planted_{name}_") as tree:
        copy_tree(tree)
        text = open(os.path.join(tree, path)).read()
        for a, b in zip(*((old, new) if isinstance(old, tuple) else ((old,), (new,)))):
            if text.count(a) != 1:
                return {"bug": name, "claim": claim, "result": f"not planted: a text occurs {text.count(a)} times"}
            text = text.replace(a, b)
        with open(os.path.join(tree, path), "w") as f:
            f.write(text)
        env = dict(os.environ, **({"FAULT_JOBS": jobs} if jobs else {}))
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=tree,
                           env=env, capture_output=True, text=True)
        tail = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-300:]
        died = p.returncode == 1 and "failed" in tail  # a test failed; not a collection error (2) or nothing run (5)
        return {"bug": name, "claim": claim, "file": path, "tests": tests, "result": "dies" if died else
                "survives" if p.returncode == 0 else f"error (exit {p.returncode})", "pytest": tail,
                "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", default=None, help="bugs whose name starts with one of these")
    args = p.parse_args()
    chosen = [b for b in BUGS if args.only is None or any(b[0].startswith(o) for o in args.only)]
    path = os.path.join(RESULTS, "planted_bugs.json")
    earlier = {r["bug"]: r for r in json.load(open(path))["bugs"]} if args.only and os.path.exists(path) else {}
    for bug in chosen:  # with --only, the other bugs keep their earlier results
        earlier[bug[0]] = plant(bug)
        print(json.dumps(earlier[bug[0]]), flush=True)
    results = [earlier[b[0]] for b in BUGS if b[0] in earlier]
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "planted_bugs.json"), "w") as f:
        json.dump({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                   "bugs": results}, f, indent=1)
    lines = ["| bug | the claim it breaks | file | result | tests |", "|---|---|---|---|---|"]
    lines += [f"| {r['bug']} | {r['claim']} | `{r.get('file', '')}` | {r['result']} | "
              f"{', '.join('`' + t.split('::')[-1] + '`' for t in r.get('tests', []))} |" for r in results]
    with open(os.path.join(RESULTS, "planted_bugs.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0 if all(r["result"] == "dies" for r in results) else 1)


if __name__ == "__main__":
    main()
