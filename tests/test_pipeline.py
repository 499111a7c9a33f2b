"""The pipeline of document 004: `--algo sft` → `--algo rm` → PPO against the learned reward model, its critic started
from it. The preference-data conventions, the critic-from-reward-model identity, the metric names the README lists,
the loading checks, and the whole pipeline, tiny, on 2 ranks through torchrun.

Expected values come from computations written here: each text scored alone by the reward model (backbone, then its
head applied by hand at the last position), the critic's head output read at the same place, hand-tokenised pairs.
"""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import free_port, save_tiny_llama

import distributed
import embedded_task
import models
import reward_model
import rewards
import scoring

REPO = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} | {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
    "TRAIN_COLLECTIVE_TIMEOUT_S": "120"}


def torchrun(*args, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master-port", str(free_port())]
    return subprocess.run([sys.executable, *(launcher if nproc > 1 else []), "train.py", *map(str, args)], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl") if line.strip()]


# ---------------------------------------------------------------------------------------------------- preference data

def test_pair_texts_follow_trls_conventions():
    """With a prompt column the texts are prompt + response; without one the shared prefix is the prompt; a
    conversation's prompt goes through the chat template with the assistant's turn opened, its response is the last
    message's content (and the conversations must agree before it)."""
    tok = embedded_task.make_char_tokenizer()
    tok.chat_template = "{% for m in messages %}#{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
    assert reward_model.pair_texts(tok, "1+2=", "3", "4", "d", 0) == ("1+2=", "3", "4")
    assert reward_model.pair_texts(tok, None, "1+2=3", "1+2=45", "d", 0) == ("1+2=", "3", "45")
    user = [{"role": "user", "content": "1+2"}]
    chosen, rejected = user + [{"role": "assistant", "content": "3"}], user + [{"role": "assistant", "content": "4"}]
    assert reward_model.pair_texts(tok, None, chosen, rejected, "d", 0) == ("#1+2=", "3", "4")
    assert reward_model.pair_texts(tok, user, chosen[-1:], rejected[-1:], "d", 0) == ("#1+2=", "3", "4")
    other = [{"role": "user", "content": "9+9"}, {"role": "assistant", "content": "4"}]
    with pytest.raises(distributed.UserError, match="differ before their last message"):
        reward_model.pair_texts(tok, None, chosen, other, "d", 7)


def test_pairs_are_tokenised_as_scored_and_long_ones_dropped(capsys, one_process_group):
    """Each side is scoring.reward_model_ids(prompt, response): the tokens of prompt + response; the margin column is
    read; a pair over --max-length tokens is dropped and the run says how many."""
    import datasets

    tok = embedded_task.make_char_tokenizer()
    ds = datasets.Dataset.from_list([{"prompt": "1+2=", "chosen": "3", "rejected": "4", "margin": 0.5},
                                     {"prompt": "10+20=", "chosen": "30", "rejected": "31111111", "margin": 1.0}])
    pairs = reward_model.tokenize_pairs(ds, tok, SimpleNamespace(max_length=8), "d")
    assert len(pairs) == 1 and "dropped 1 of 2 pairs longer than --max-length 8 tokens" in capsys.readouterr().out
    assert pairs[0].chosen == tok("1+2=3")["input_ids"] and pairs[0].margin == 0.5


def test_bradley_terry_and_pair_accuracy_by_hand_on_a_few_pairs():
    """Three pairs with scores written out: L = mean log(1 + e^{−(r_c − r_r − m)}), accuracy = share with r_c > r_r."""
    c, r, m = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.5, -1.0]), torch.tensor([0.0, 0.0, 0.5])
    hand = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(0.5)) + math.log(1 + math.exp(0.5))) / 3
    assert rewards.bradley_terry_loss(c, r, m).item() == pytest.approx(hand, rel=1e-6)
    assert rewards.preference_accuracy(c, r).item() == pytest.approx(1 / 3)  # the tie (−1, −1) counts as wrong


# ---------------------------------------------------------------------------------------------------- models

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny causal LM, and a reward model made from it (its score head set by hand, mean and std in its config)."""
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("models")
    lm = save_tiny_llama(root / "lm")
    rm = AutoModelForSequenceClassification.from_pretrained(lm, num_labels=1)
    torch.manual_seed(1)
    torch.nn.init.normal_(rm.score.weight, std=0.5)
    rm.config.update({"reward_mean": 0.3, "reward_std": 2.0})
    rm.save_pretrained(root / "rm")
    embedded_task.make_char_tokenizer().save_pretrained(root / "rm")
    return root, lm, str(root / "rm")


def test_critic_from_the_reward_model_is_the_reward_at_step_0(tiny_models, one_process_group):
    """--critic-init RM: the critic (a token classifier) carries over the backbone and the score head, and with the
    reward model's stored mean and std its head computes w·(r − mean)/std: at the last real token, the critic's output
    equals the reward the run trains on, (r_φ(x, y) − 0.3)/2 × --reward-model-weight 1.5, r_φ computed here from the
    reward model alone (backbone, then its head by hand)."""
    from transformers import AutoModelForSequenceClassification

    _, _, rm_path = tiny_models
    spec = models.ModelSpec("critic", rm_path, "--critic-init", head_affine=(1.5 / 2.0, -1.5 * 0.3 / 2.0))
    critic = models.load_model(spec, torch.device("cpu"), False)[0]
    rm = AutoModelForSequenceClassification.from_pretrained(rm_path).eval()
    tok = models.load_tokenizer(rm_path)
    for prompt, completion in (("12+7=", "19"), ("3+4=", "8"), ("29+29=", "58")):
        ids = torch.tensor([scoring.reward_model_ids(tok, prompt, completion)])
        with torch.no_grad():
            r = rm.score(rm.model(input_ids=ids).last_hidden_state[0, -1]).item()
            v = critic(input_ids=ids).logits[0, -1, 0].item()
        assert abs(r) > 0.05 and math.isclose(v, 1.5 * (r - 0.3) / 2.0, rel_tol=1e-5, abs_tol=1e-6), (prompt, r, v)
    assert critic.score.weight.abs().sum() > 0  # carried over, not zeroed


def test_critic_from_the_reward_model_is_the_reward_at_step_0_through_the_trainer(tiny_models, tmp_path,
                                                                                 one_process_group):
    """The trainer's own loading (train.build_run → load_rl_models) of PPO with --reward-model RM/ (a trailing slash)
    and --critic-init RM spelled another way (a relative path), --reward-model-weight 1.5: the critic's value that
    train.critic_values reads at the state before the EOS (the last completion position the trainer reads) equals
    1.5·(r − 0.3)/2.0, with r the reward model's score of prompt + completion computed here by hand (its backbone,
    then its head, at the last token) and the standardisation by the stored mean 0.3 and std 2.0 written here; and
    it equals the reward train.score trains on for the same sample.

    Catches: a·std for a/std; a sign flip on b; the weight dropped; the two paths compared as strings (the head left
    on the raw scale); the value read one position off."""
    from transformers import AutoModelForSequenceClassification

    import options
    import train

    _, lm, rm_path = tiny_models
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(10)))
    argv = ["--algo", "ppo", "--model", lm, "--dataset", data, "--reward", "none", "--reward-model", rm_path + "/",
            "--critic-init", os.path.relpath(rm_path), "--reward-model-weight", "1.5", "--eval-size", "0",
            "--out", tmp_path / "out", "--prompts-per-step", "2", "--group-size", "2"]
    args = options.resolve_defaults(options.parse_args(options.Args, [str(a) for a in argv]), 1)
    options.check_args(args, 1)
    run = train.build_run(args, 0, 1, torch.device("cpu"))
    rm = AutoModelForSequenceClassification.from_pretrained(rm_path).eval()
    rm_tok = models.load_tokenizer(rm_path)
    for prompt, completion in (("12+7=", "19"), ("3+4=", "8"), ("29+29=", "58")):
        prompt_ids = run.tok(prompt)["input_ids"]
        completion_ids = run.tok(completion, add_special_tokens=False)["input_ids"] + [run.tok.eos_token_id]
        ids = torch.tensor([prompt_ids + completion_ids])  # (1, S)
        mask = torch.ones(1, len(completion_ids))  # (1, T)
        batch = train.Rollout(input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=mask,
                              loss_mask=mask, n_prompt=len(prompt_ids), prompts=[prompt], answers=["0"],
                              texts=[completion])
        with torch.no_grad():
            v = train.critic_values(run.critic, batch)[0, len(completion_ids) - 1].item()  # V(s) before the EOS
            r_ids = torch.tensor([scoring.reward_model_ids(rm_tok, prompt, completion)])
            r = rm.score(rm.model(input_ids=r_ids).last_hidden_state[0, -1]).item()
        trained_on = train.score(run, batch, 1)[0][0].item()
        assert abs(r) > 0.05 and math.isclose(v, 1.5 * (r - 0.3) / 2.0, rel_tol=1e-5, abs_tol=1e-6), (prompt, r, v)
        assert math.isclose(trained_on, v, rel_tol=1e-5, abs_tol=1e-6), (prompt, trained_on, v)
    # the gold reward of the same run: the verifier's verdict on each completion against its answer, logged beside the
    # learned reward and never part of it (the answers changed, R is the same; the verdicts follow the answers)
    texts, answers = ["19", "8", "58", "so it is 7."], ["19", "7", "58", "7"]
    prompts = ["12+7=", "3+4=", "29+29=", "3+4="]
    ids = [run.tok(p)["input_ids"] + run.tok(c, add_special_tokens=False)["input_ids"] for p, c in zip(prompts, texts)]
    width = max(map(len, ids))
    batch = train.Rollout(input_ids=torch.tensor([[run.tok.pad_token_id] * (width - len(x)) + x for x in ids]),
                          attention_mask=torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids]),
                          completion_mask=torch.ones(4, 1), loss_mask=torch.ones(4, 1), n_prompt=width - 1,
                          prompts=prompts, answers=answers, texts=texts)
    reward, gold = train.score(run, batch, 1)
    assert gold.tolist() == [1.0, 0.0, 1.0, 1.0]  # "8" is not 3+4; the last number of "so it is 7." is
    reward_other, gold_other = train.score(run, dataclasses.replace(batch, answers=["0", "8", "0", "0"]), 1)
    assert gold_other.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert torch.equal(reward, reward_other) and reward.unique().numel() > 1


def other_vocabulary_model(path) -> str:
    """A tiny Llama whose character tokenizer lists its characters in another order: the same texts, other ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForTokenClassification, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>"] + list("9876543210+-*=# "))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer, core.decoder = pre_tokenizers.Split(Regex("."), behavior="isolated"), decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_labels=1)
    LlamaForTokenClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("flags, says", [
    (["--algo", "grpo", "--reward-model", "{lm}"], "--reward-model '{lm}' is a LlamaForCausalLM checkpoint: loaded as "
     "LlamaForSequenceClassification (reward model) it would start with random weights (score.weight)"),
    (["--algo", "grpo", "--model", "{rm}"], "--model '{rm}' is a LlamaForSequenceClassification checkpoint: loaded as "
     "LlamaForCausalLM (policy) it would start with random weights (lm_head.weight)"),
    (["--algo", "ppo", "--critic-init", "{notamodel}"], "--critic-init '{notamodel}' is not a model directory (no "
     "config.json)"),
    (["--algo", "rm", "--model", "{notok}"], "--model '{notok}' has no tokenizer"),
    (["--algo", "grpo", "--reward-model", "{notamodel}"], "--reward-model '{notamodel}' is not a model directory (no "
     "config.json)"),
    (["--algo", "ppo", "--critic-init", "{othervocab}"], "--critic-init '{othervocab}' has another vocabulary than the "
     "policy"),
    (["--algo", "grpo", "--reward-model-weight", "0.5"], "--reward-model-weight has no effect without --reward-model"),
])
def test_a_model_of_the_wrong_kind_is_refused_by_name(tiny_models, flags, says, tmp_path, capsys):
    root, lm, rm = tiny_models
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "notes.txt").write_text("not a checkpoint")
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (notok / f).write_bytes((Path(lm) / f).read_bytes())
    paths = {"lm": lm, "rm": rm, "notamodel": tmp_path / "notamodel", "notok": notok,
             "othervocab": other_vocabulary_model(tmp_path / "othervocab")}
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(20)))
    argv = [f.format(**paths) for f in flags]
    base = ["--model", lm] if "--model" not in argv else []
    if "rm" in argv:
        line = run_error(capsys, "--out", tmp_path / "out", *argv, "--steps", 1)
    else:
        line = run_error(capsys, "--out", tmp_path / "out", "--dataset", data, "--steps", 1, "--prompts-per-step", 2,
                         "--group-size", 2, "--eval-size", 0, *base, *argv)
    assert says.format(**paths) in line, line
    assert not (tmp_path / "out").exists(), "nothing is left in --out by a run refused on its input"


def run_error(capsys, *argv) -> str:
    """train.main in this process (a one-process group), for a run refused after the process group is up: exit 2
    and exactly one `error:` line, no traceback."""
    import torch.distributed as dist

    import train

    try:
        code = train.main([str(a) for a in argv])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


def test_preference_file_without_chosen_or_with_identical_pairs(tmp_path, tiny_models, capsys):
    _, lm, _ = tiny_models
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1=", "good": "2", "bad": "3"}) + "\n")
    assert "has columns prompt, good, bad: --algo rm needs preference pairs" in run_error(
        capsys, "--algo", "rm", "--model", lm, "--dataset", bad, "--out", tmp_path / "o1")
    half = tmp_path / "half.jsonl"
    half.write_text(json.dumps({"prompt": "1+1=", "chosen": "2"}) + "\n")
    assert "has no column 'rejected'" in run_error(capsys, "--algo", "rm", "--model", lm, "--dataset", half, "--out",
                                                   tmp_path / "o3")
    same = tmp_path / "same.jsonl"
    same.write_text("".join(json.dumps({"prompt": f"{i}+1=", "chosen": "5", "rejected": "5" if i == 3 else "6"}) + "\n"
                            for i in range(10)))
    line = run_error(capsys, "--algo", "rm", "--model", lm, "--dataset", same, "--out", tmp_path / "o2")
    assert "1 pairs have the same chosen and rejected text (rows 3)" in line


def test_preference_rows_with_a_null_response_are_dropped_and_other_kinds_refused(tmp_path, tiny_models, capsys):
    _, lm, _ = tiny_models
    rows = [{"chosen": f"{i}+1={i + 1}", "rejected": f"{i}+1={i + 2}"} for i in range(12)]
    rows[3]["rejected"], rows[7]["chosen"], rows[9]["rejected"] = None, None, ""  # "": an answer given as EOS at once
    data = tmp_path / "nulls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = SimpleNamespace(max_length=64)
    tok = models.load_tokenizer(lm)
    import datasets
    pairs = reward_model.tokenize_pairs(datasets.Dataset.from_list(rows), tok, args, "d")
    said = capsys.readouterr().out
    assert len(pairs) == 10 and "dropped 2 of 12 pairs whose chosen or rejected response is null (rows 3, 7)" in said, \
        said
    numbers = [{"chosen": "1+1=2", "rejected": 3}, {"chosen": "2+2=4", "rejected": 5}]  # an int column
    with pytest.raises(distributed.UserError, match="row 0: prompt, chosen and rejected must all be texts or all "
                                                 "conversations .* not NoneType, str and int"):
        reward_model.tokenize_pairs(datasets.Dataset.from_list(numbers), tok, args, "d")


@pytest.mark.parametrize("name, content, flags, says", [
    ("data.txt", "1+1=2\n", [], "--dataset '{path}': a local file must be .json, .jsonl, .parquet or .csv"),
    ("garbage.jsonl", "{not json\n", [], "cannot load dataset '{path}' (split 'train'): ArrowInvalid: JSON parse "
     "error"),
    ("d.jsonl", None, ["--split", "nosuch"], "--split 'nosuch': a single local file is the split 'train'"),
    ("d.jsonl", None, ["--dataset-config", "main"], "--dataset-config 'main' has no effect on a local file"),
])
def test_a_data_file_that_cannot_be_read_is_one_line(tiny_models, name, content, flags, says, tmp_path, capsys):
    _, lm, _ = tiny_models
    path = tmp_path / name
    path.write_text(content or "".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}) + "\n"
                                       for i in range(20)))
    line = run_error(capsys, "--model", lm, "--dataset", path, "--steps", 1, "--prompts-per-step", 2, "--group-size",
                     2, "--eval-size", 0, "--out", tmp_path / "out", *flags)
    assert says.format(path=path) in line, line
    assert not (tmp_path / "out").exists()


def test_explained_variance_is_null_when_every_reward_is_zero_after_the_critic_moved(tiny_models, tmp_path, capsys):
    """PPO whose every reward is 0 (`--reward math=0`), with a critic that has moved (started from the reward model:
    V ≠ 0): the returns R = A + V are 0 up to float32 rounding, and explained_variance is logged as null, not a huge
    negative number (the README's glossary)."""
    import torch.distributed as dist

    import train

    _, lm, rm = tiny_models
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(40)))
    try:
        code = train.main([str(a) for a in ("--algo", "ppo", "--model", lm, "--dataset", data, "--reward", "math=0",
                                            "--critic-init", rm, "--steps", 2, "--prompts-per-step", 4,
                                            "--group-size", 4, "--eval-size", 0, "--plot", "false", "--out",
                                            tmp_path / "out")])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert code == 0, capsys.readouterr().err[-3000:]
    rows = [r for r in metrics(tmp_path / "out") if "reward_mean" in r]
    assert [r["reward_std"] for r in rows] == [0.0, 0.0] and all(r["value_loss"] > 1e-4 for r in rows)
    assert [r["explained_variance"] for r in rows] == [None, None]


# ---------------------------------------------------------------------------------------------------- the pipeline

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The README's three commands, tiny (a few steps each), on 2 ranks."""
    root = tmp_path_factory.mktemp("pipeline")
    sft, rm, ppo = root / "sft", root / "rm", root / "ppo-rm"
    runs = {"sft": torchrun("--algo", "sft", "--out", sft, "--steps", 20, "--sft-target", 0, "--eval-size", 16)}
    runs["rm"] = torchrun("--algo", "rm", "--model", sft / "hf", "--out", rm, "--steps", 10, "--eval-every", 5,
                          "--eval-size", 40, "--prompts-per-step", 16)
    runs["ppo"] = torchrun("--algo", "ppo", "--model", sft / "hf", "--reward", "none", "--reward-model", rm / "hf",
                           "--critic-init", rm / "hf", "--out", ppo, "--steps", 2, "--prompts-per-step", 4,
                           "--group-size", 4, "--eval-size", 16, "--eval-every", 1, "--beta", 0.02)
    for name, p in runs.items():
        assert p.returncode == 0, f"{name}: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return SimpleNamespace(sft=sft, rm=rm, ppo=ppo, runs=runs)


def test_each_stage_logs_the_metric_names_the_readme_lists(pipeline):
    train_rows = lambda out, key: [r for r in metrics(out) if key in r]  # noqa: E731
    sft_rows = train_rows(pipeline.sft, "loss")
    assert [r["step"] for r in sft_rows] == list(range(1, 21))
    assert all({"loss", "token_accuracy"} <= set(r) and 0 <= r["token_accuracy"] <= 1 for r in sft_rows)
    assert [r["step"] for r in train_rows(pipeline.sft, "eval_accuracy")] == [0, 10, 20]
    rm_rows = train_rows(pipeline.rm, "pair_accuracy")
    assert [r["step"] for r in rm_rows] == list(range(1, 11))
    assert all({"loss", "pair_accuracy", "margin", "chosen_reward_mean", "rejected_reward_mean"} <= set(r)
               for r in rm_rows)
    assert all(math.isclose(r["margin"], r["chosen_reward_mean"] - r["rejected_reward_mean"], abs_tol=1e-5)
               for r in rm_rows)
    evals = train_rows(pipeline.rm, "eval_pair_accuracy")
    held_out = sum(1 for _ in open(pipeline.rm / "comparisons" / "test.jsonl"))
    assert [r["step"] for r in evals] == [0, 5, 10] and all(r["eval_n"] == min(40, held_out) > 0 for r in evals)
    ppo_rows = train_rows(pipeline.ppo, "reward_mean")
    assert [r["step"] for r in ppo_rows] == [1, 2]
    for r in ppo_rows:  # the proxy reward (standardised learned score) and the gold (the checker), side by side
        assert 0 <= r["gold_reward_mean"] <= 1 and r["reward_mean"] is not None and r["kl"] >= 0
    assert [r["step"] for r in train_rows(pipeline.ppo, "eval_accuracy")] == [0, 1, 2]
    for out in (pipeline.sft, pipeline.rm, pipeline.ppo):
        assert (out / "hf" / "config.json").exists() and (out / "metrics.jsonl").exists()


def test_the_reward_model_export_loads_as_it_is_and_stores_its_scale(pipeline):
    """OUT/hf of --algo rm is a sequence classifier that from_pretrained loads with nothing missing; its config holds
    the mean and std of its scores on the held-out pairs, equal to the last evaluation's."""
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(pipeline.rm / "hf", output_loading_info=True)
    assert not info["missing_keys"] and model.config.architectures == ["LlamaForSequenceClassification"]
    last = [r for r in metrics(pipeline.rm) if "eval_pair_accuracy" in r][-1]
    assert math.isclose(model.config.reward_mean, last["eval_reward_mean"], rel_tol=1e-9)
    assert math.isclose(model.config.reward_std, last["eval_reward_std"], rel_tol=1e-9)
    comparisons = pipeline.rm / "comparisons"
    assert_export_is_the_checkpoint(model, pipeline.rm / "checkpoints" / "step_000010", "reward_model")
    # and recomputed from the export: its score of each held-out prompt + response (the first --eval-size 40 pairs),
    # one sequence at a time, the head applied by hand to the backbone's last hidden state; mean and (Bessel) std of
    # the 2N scores
    tok, scores = models.load_tokenizer(pipeline.rm / "hf"), []
    held_out = [json.loads(line) for line in open(comparisons / "test.jsonl")][:40]
    with torch.no_grad():
        for p in held_out:
            for response in (p["chosen"], p["rejected"]):
                ids = torch.tensor([scoring.reward_model_ids(tok, p["prompt"], response)])
                scores.append(model.score(model.model(input_ids=ids).last_hidden_state[0, -1]).item())
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1))
    assert model.config.reward_pairs == len(held_out) == 40
    assert math.isclose(model.config.reward_mean, mean, rel_tol=1e-4, abs_tol=1e-5), (model.config.reward_mean, mean)
    assert math.isclose(model.config.reward_std, std, rel_tol=1e-4), (model.config.reward_std, std)
    train_pairs = [json.loads(line) for line in open(comparisons / "train.jsonl")]
    test_pairs = [json.loads(line) for line in open(comparisons / "test.jsonl")]
    assert not {p["prompt"] for p in train_pairs} & {p["prompt"] for p in test_pairs}, "held out by prompt"
    for p in train_pairs[:50]:  # the checker prefers the right answer: chosen is a+b, rejected is not
        a, b = map(int, p["prompt"].rstrip("=").split("+"))
        assert rewards.math_reward(p["chosen"], str(a + b)) == 1.0 and rewards.math_reward(p["rejected"], str(a + b)) == 0.0


def assert_export_is_the_checkpoint(exported, checkpoint, name: str) -> None:
    """Every tensor of the export OUT/hf equals the trained model `name` of the DCP checkpoint, bit for bit."""
    import torch.distributed.checkpoint as dcp

    state = exported.state_dict()
    trained = {k: torch.empty_like(v) for k, v in state.items() if k != "lm_head.weight" or
               not exported.config.tie_word_embeddings}
    dcp.load({name: trained}, checkpoint_id=str(checkpoint))
    for k, v in trained.items():
        assert torch.equal(v, state[k]), k


def test_the_policy_export_is_the_trained_policy(pipeline):
    """OUT/hf of the PPO stage is the policy of its last checkpoint, and it moved from the sft model it started at."""
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(pipeline.ppo / "hf")
    assert_export_is_the_checkpoint(exported, pipeline.ppo / "checkpoints" / "step_000002", "policy")
    start = AutoModelForCausalLM.from_pretrained(pipeline.sft / "hf").state_dict()
    assert max((v - start[k]).abs().max().item() for k, v in exported.state_dict().items()) > 1e-4


def test_four_model_memory_reports_the_frozen_models(pipeline):
    """PPO with a reference and a reward model: memory.json has the frozen models' measured bytes beside the
    ledger's prediction (fp32 on CPU: 4 bytes per parameter of each rank's shard), and they agree."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    memory = json.loads((pipeline.ppo / "memory.json").read_text())
    assert set(memory["frozen_measured_bytes"]) == {"ref", "reward_model"}
    assert memory["frozen_measured_bytes"] == memory["frozen_predicted_bytes"] and memory["frozen_bytes_per_param"] == 4
    # counted here from the checkpoints: FSDP2 gives rank 0 the first ⌈d_0/2⌉ rows of every parameter, 4 bytes each
    rank0 = lambda model: 4 * sum(math.ceil(p.shape[0] / 2) * p[0].numel() for p in model.parameters())  # noqa: E731
    assert memory["frozen_measured_bytes"] == {
        "ref": rank0(AutoModelForCausalLM.from_pretrained(pipeline.sft / "hf")),
        "reward_model": rank0(AutoModelForSequenceClassification.from_pretrained(pipeline.rm / "hf"))}
    assert memory["predicted_bytes"] == memory["measured_bytes"]


def test_start_up_line_shows_the_resolved_settings(pipeline):
    out = pipeline.runs["ppo"].stdout
    assert "ppo | 2 rank(s) on cpu | policy 109,376 params, critic" in out
    assert "lr 0.001, micro-batch 8, dtype auto, c_h 0.08, β 0.02, minibatch 16, critic lr 0.005" in out
    assert "reward-model scale (" in out  # the stored (mean, std) the score is standardised with


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_one_rank_gives_the_two_rank_run(pipeline, stage, tmp_path):
    """The sft and rm stages of the pipeline fixture (2 ranks, FSDP2) run again in one process (a plain module) on the
    same rows: every logged row, timings aside, agrees to fp32 rounding. Catches a loss whose graph bypasses the
    sharded model's output, so that FSDP2 never reduces its gradients (the model would not learn on 2 ranks)."""
    if stage == "sft":
        argv = ["--algo", "sft", "--steps", 20, "--sft-target", 0, "--eval-size", 16]
    else:  # the comparisons the 2-rank run sampled, read as a data set
        argv = ["--algo", "rm", "--model", pipeline.sft / "hf", "--dataset",
                pipeline.rm / "comparisons", "--steps", 10, "--eval-every", 5, "--eval-size", 40,
                "--prompts-per-step", 16]
    p = torchrun(*argv, "--out", tmp_path / "one", "--plot", "false", nproc=1)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    timing = ("step_time_s", "tokens_per_s", "time_update_s")
    one, two = metrics(tmp_path / "one"), metrics(getattr(pipeline, stage))
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for k in set(a) - set(timing):
            assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-5), (stage, a["step"], k, a[k], b[k])
    key = "loss" if stage == "sft" else "eval_loss"  # rm: the same 40 held-out pairs each time, not a new minibatch
    moved = [r[key] for r in two if key in r]
    assert moved[-1] < moved[0], ("the stage learned (the comparison is not between two idle runs)", moved)


def test_rm_on_a_data_set_of_prompts_and_answers_samples_its_own_comparisons(pipeline, tmp_path):
    """--algo rm with a --dataset of questions and answers (no `chosen` column): --comparison-rounds rounds of two
    samples of --model for each prompt, the verifier choosing, written to OUT/comparisons with a fifth of the prompts
    held out, then the reward model trains on them. Checked here against the data set's own answers."""
    problems = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(3, 28, 2) for b in (4, 9, 17)]
    with open(tmp_path / "problems.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in problems)
    out = tmp_path / "rm"
    p = torchrun("--algo", "rm", "--model", pipeline.sft / "hf", "--dataset", tmp_path / "problems.jsonl",
                 "--comparison-rounds", 3, "--steps", 2, "--eval-size", 8, "--prompts-per-step", 8, "--out", out,
                 "--plot", "false", nproc=1)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    answers = {r["question"]: r["answer"] for r in problems}
    train = [json.loads(line) for line in open(out / "comparisons" / "train.jsonl")]
    test = [json.loads(line) for line in open(out / "comparisons" / "test.jsonl")]
    assert train and test and not {c["prompt"] for c in train} & {c["prompt"] for c in test}
    assert len({c["prompt"] for c in train + test}) <= len(problems)
    for c in train + test:  # the right one chosen, by the data set's answer; ties never kept
        assert rewards.math_reward(c["chosen"], answers[c["prompt"]]) == 1.0
        assert rewards.math_reward(c["rejected"], answers[c["prompt"]]) == 0.0
    meta = json.loads((out / "comparisons" / "meta.json").read_text())
    assert meta["rounds"] == 3 and meta["dataset"] == str(tmp_path / "problems.jsonl") and meta["prompts"] == 39
    assert "from 3 rounds of two samples of each of the 39 training prompts" in p.stdout
    evals = [r for r in metrics(out) if "eval_pair_accuracy" in r]
    assert evals and evals[-1]["eval_n"] == min(8, len(test))


def test_rm_reads_pairs_or_prompts_and_answers_and_names_the_columns_of_anything_else(tmp_path):
    """A `chosen`/`rejected` data set is preference pairs; one of prompts and answers is sampled from; a data set with
    neither is refused in one line that names its columns and both kinds."""
    args = SimpleNamespace(split="train", dataset_config="", prompt_column="question", answer_column="answer")
    for name, row, pairs in (("pairs", {"prompt": "1+2=", "chosen": "3", "rejected": "4"}, True),
                             ("problems", {"question": "1+2=", "answer": "3"}, False)):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
        assert reward_model.has_pairs(args, str(tmp_path / f"{name}.jsonl")) is pairs
    (tmp_path / "other.jsonl").write_text(json.dumps({"text": "1+2=3", "label": 1}) + "\n")
    with pytest.raises(distributed.UserError, match=r"has columns text, label: --algo rm needs preference pairs "
                       r"\(chosen, rejected.*prompts and answers.*--prompt-column 'question'"):
        reward_model.has_pairs(args, str(tmp_path / "other.jsonl"))
