"""Tests for rewards.py. Expected values are worked out by hand here, never copied from the code's output.

Three tiers: document numbers (Bradley–Terry, 004 "4. The Reward Model"), invariants
(batched reward-model scores equal one-at-a-time scores, both padding sides), and a table of parsing cases.
"""

import math
import random

import pytest
import torch

from rewards import (
    bradley_terry_loss,
    combined_reward,
    extract_answer,
    format_reward,
    math_reward,
    pad_batch,
    parse_number,
    parse_reward_spec,
    preference_accuracy,
    rule_based_rewards,
)
from scoring import last_token_scores, reward_model_ids, score_with_reward_model

GSM8K_FIELD = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn all she sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
GARBAGE = "".join(random.Random(0).choice("abc{}<>\\/#$%&*()_ \n") for _ in range(200_000))  # no digits at all

# ── Verifiable math reward: the parsing table ──────────────────────────────────────────────────────────────

MATH_CASES = [
    # GSM8K "####" marker, in completions and in the ground-truth answer field
    ("So 10 + 32 = 42.\n#### 42", "42", 1.0),
    ("#### 72", GSM8K_FIELD, 1.0),
    ("She sold 72 clips in total.", GSM8K_FIELD, 1.0),
    ("She sold 24 clips in May.", GSM8K_FIELD, 0.0),
    ("#### 42\nCheck: 6 * 7 = 42, and 5 more", "42", 1.0),  # the marker's line wins over later numbers
    # \boxed, including nested braces
    ("The answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", 1.0),
    ("So \\boxed{12}. Check: 12 * 2 = 24", "12", 1.0),
    ("\\boxed{5 \\text{ cm}^2}", "5", 1.0),
    # last number fallback
    ("First 3, then 5, finally 8", "8", 1.0),
    ("First 3, then 5, finally 8", "5", 0.0),
    # commas, decimals, numeric (not string) equality
    ("The total is 1,234,567 dollars", "1234567", 1.0),
    ("1,000", "1000", 1.0),
    ("42.0", "42", 1.0),
    ("It costs $2.50.", "2.5", 1.0),
    ("It costs $2.50.", "2.49", 0.0),
    ("0.3333333", "1/3", 1.0),  # |Δ|/|y| ≈ 1e-7 ≤ rel_tol 1e-6
    ("0.333", "1/3", 0.0),  # |Δ|/|y| ≈ 1e-3
    # signs
    ("The temperature is -5 degrees", "-5", 1.0),
    ("The temperature is -5 degrees", "5", 0.0),
    ("The range is 3-5", "5", 1.0),  # a binary minus is not a sign
    ("-\\frac{3}{4}", "-0.75", 1.0),
    # fractions and percentages
    ("3/4", "0.75", 1.0),
    ("That is 50% of them", "50", 1.0),
    # <answer> tag is preferred over numbers elsewhere
    ("<think>maybe 7</think><answer>9</answer>", "9", 1.0),
    ("<think>maybe 7</think><answer>9</answer>", "7", 0.0),
    ("<think>x</think><answer>12</answer> and later 99", "12", 1.0),
    ("<think>x</think><answer>\\boxed{1,000}</answer>", "1000", 1.0),
    # malformed: always 0, never an exception
    (None, "42", 0.0),
    ("", "42", 0.0),
    ("   \n", "42", 0.0),
    ("42", None, 0.0),
    ("42", "", 0.0),
    ("<answer>42", "42", 0.0),  # unbalanced tag: no fallback to the stray number
    ("</answer>42<answer>", "42", 0.0),
    ("\\boxed{42", "42", 0.0),  # unclosed box
    ("nan", "nan", 0.0),
    ("inf", "inf", 0.0),
    ("-inf", "-inf", 0.0),
    ("1e999", "1e999", 0.0),  # overflows to inf
    ("9" * 400, "9" * 400, 0.0),  # a 400-digit integer overflows float as well
    ("1/0", "1/0", 0.0),
    (GARBAGE, "42", 0.0),
    ("\\boxed{" * 50_000, "42", 0.0),
]


@pytest.mark.parametrize(("completion", "answer", "expected"), MATH_CASES)
def test_math_reward_table(completion, answer, expected):
    assert math_reward(completion, answer) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#### 1,000 dollars\nthen 5", "1,000 dollars"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{a{b{c}}d} then 3", "a{b{c}}d"),
        ("<answer> 17 </answer>", "17"),
        ("<answer>1</answer> <answer>2</answer>", "2"),
        ("We get 3 and then -4.5.", "-4.5"),
        ("no numbers here", None),
        ("<answer>42", None),
        (None, None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,234", 1234.0), ("-3.5", -3.5), ("$12", 12.0), ("-$12", -12.0), ("50%", 50.0), ("3/4", 0.75),
        ("\\frac{3}{4}", 0.75), ("2e3", 2000.0), (".5", 0.5), ("1{,}000", 1000.0), ("x = 7 cm", 7.0),
        ("1/0", None), ("nan", None), ("inf", None), ("1e999", None), ("abc", None), ("", None), (None, None),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


# ── R1 format reward ───────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>reasoning</think><answer>42</answer>", 1.0),
        ("  <think>\nstep 1\nstep 2\n</think>\n\n<answer> 42 </answer>\n", 1.0),
        ("<think></think><answer></answer>", 1.0),  # empty blocks still follow the layout
        ("<think>" + "a" * 1_000_000 + "</think><answer>1</answer>", 1.0),
        ("<answer>42</answer>", 0.0),
        ("<think>r</think>", 0.0),
        ("<answer>42</answer><think>r</think>", 0.0),
        ("<think>r</think><answer>42</answer> trailing text", 0.0),
        ("preamble <think>r</think><answer>42</answer>", 0.0),
        ("<think>r</think> between <answer>42</answer>", 0.0),
        ("<think>r</think><answer>42", 0.0),
        ("<think>r<think>s</think><answer>42</answer>", 0.0),
        ("<think>r</think><answer>1</answer><answer>2</answer>", 0.0),
        ("<think>r</think><answer>1</answer></answer>", 0.0),
        ("", 0.0),
        (None, 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected


# ── Reward spec and weighting ──────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("math=1.0,format=0.2", [("math", 1.0), ("format", 0.2)]),
        ("math", [("math", 1.0)]),
        (" math = 2 , format ", [("math", 2.0), ("format", 1.0)]),
        ("format=-0.5", [("format", -0.5)]),
    ],
)
def test_parse_reward_spec(spec, expected):
    assert parse_reward_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        ("math=1,lenght=0.1", ["'lenght'", "format, math"]),
        ("", ["''", "format, math"]),
        ("math,", ["''"]),
        ("math=abc", ["'abc'", "'math'"]),
        ("math=", ["''", "'math'"]),
        ("math=nan", ["'nan'"]),
        ("format=inf", ["'inf'"]),
        ("math,math=2", ["twice"]),
    ],
)
def test_parse_reward_spec_errors(spec, needles):
    with pytest.raises(ValueError) as error:
        parse_reward_spec(spec)
    message = str(error.value)
    assert "\n" not in message
    assert all(needle in message for needle in needles), message


def test_combined_reward_weighting():
    good = "<think>6 * 7</think><answer>42</answer>"
    wrong = "<think>6 * 7</think><answer>41</answer>"
    unformatted = "6 * 7 = 42"
    spec = "math=1.0,format=0.2"
    assert combined_reward(good, "42", spec) == pytest.approx(1.2)  # 1.0·1 + 0.2·1
    assert combined_reward(wrong, "42", spec) == pytest.approx(0.2)  # 1.0·0 + 0.2·1
    assert combined_reward(unformatted, "42", spec) == pytest.approx(1.0)  # 1.0·1 + 0.2·0
    assert combined_reward(good, "42", "math=2,format=-0.5") == pytest.approx(1.5)
    assert combined_reward(good, "42", [("format", 3.0)]) == pytest.approx(3.0)
    assert combined_reward(None, None, spec) == 0.0
    rewards = rule_based_rewards([good, wrong, unformatted, ""], ["42", "42", GSM8K_FIELD, "1"], spec)
    assert rewards.dtype == torch.float32 and rewards.shape == (4,)
    assert torch.allclose(rewards, torch.tensor([1.2, 0.2, 0.0, 0.0]))


@pytest.mark.parametrize("spec", ["math=1.0,format=0.2", "math=2,format=-0.5", "format", "math=0.7"])
def test_rule_based_rewards_agree_with_the_trainers_apply_rewards(spec):
    """The reference rule_based_rewards / combined_reward against what the trainer runs, scoring.apply_rewards over
    scoring.load_reward_functions(--reward), on 60 random (completion, answer) pairs drawn from the parsing table,
    half of them wrapped in the R1 format: the same (B,) rewards, no problem reported.

    Catches: the trainer's sum and the documented R = Σ_k w_k R_k drifting apart (a weight dropped or applied twice,
    the spec parsed differently, a reward name bound to another function)."""
    import scoring

    rng = random.Random(5)
    pairs = [rng.choice(MATH_CASES)[:2] for _ in range(60)]
    texts = [f"<think>so</think><answer>{c}</answer>" if i % 2 and isinstance(c, str) and len(c) < 100 else c
             for i, (c, _) in enumerate(pairs)]
    answers = [a for _, a in pairs]
    theirs, problem = scoring.apply_rewards(scoring.load_reward_functions(spec), texts, answers, str)  # (B,)
    ours = rule_based_rewards(texts, answers, spec)  # (B,)
    assert problem is None
    assert ours.abs().sum() > 0 and len(set(ours.tolist())) > 1
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    assert all(math.isclose(float(t), combined_reward(c, a, spec), abs_tol=1e-6)
               for t, c, a in zip(theirs, texts, answers))


# ── Bradley–Terry reward-model loss (004 "4. The Reward Model") ────────────────────────────────────────────


def test_bradley_terry_hand_values():
    # Δ = 0: σ(0) = 1/2, so −log σ = log 2.
    zero = bradley_terry_loss(chosen_rewards=torch.tensor([1.5]), rejected_rewards=torch.tensor([1.5]))
    assert zero.item() == pytest.approx(math.log(2.0))
    # Δ = ln 3: σ = 3/(3 + 1) = 3/4, so −log σ = log(4/3).
    ln3 = bradley_terry_loss(chosen_rewards=torch.tensor([math.log(3.0)]), rejected_rewards=torch.tensor([0.0]))
    assert ln3.item() == pytest.approx(math.log(4.0 / 3.0), rel=1e-6)
    # A batch averages: (log 2 + log 4/3) / 2.
    both = bradley_terry_loss(chosen_rewards=torch.tensor([0.0, math.log(3.0)]), rejected_rewards=torch.zeros(2))
    assert both.dim() == 0
    assert both.item() == pytest.approx((math.log(2.0) + math.log(4.0 / 3.0)) / 2, rel=1e-6)


def test_bradley_terry_margin_and_global_normaliser_by_hand():
    """A margin m: −log σ(r_c − r_r − m). With r_c − r_r = ln 3 and m = ln 3, Δ = 0 and the loss is log 2; with
    m = 0 it is log(4/3). num_pairs N divides the sum instead of the batch's own count (two ranks' halves, each
    over the global count / 2, average to the whole batch's loss)."""
    ln3 = math.log(3.0)
    both = bradley_terry_loss(torch.tensor([ln3, ln3]), torch.zeros(2), margin=torch.tensor([ln3, 0.0]))
    assert both.item() == pytest.approx((math.log(2.0) + math.log(4.0 / 3.0)) / 2, rel=1e-6)
    c, r = torch.tensor([0.3, -1.0, 2.0, 0.5]), torch.tensor([0.1, 0.4, -0.2, 0.5])
    whole = bradley_terry_loss(c, r)
    halves = [bradley_terry_loss(c[s], r[s], num_pairs=2.0) for s in (slice(0, 2), slice(2, 4))]
    assert (halves[0] + halves[1]).item() / 2 == pytest.approx(whole.item(), rel=1e-6)
    hand = sum(math.log(1 + math.exp(-(a - b))) for a, b in zip(c.tolist(), r.tolist())) / 4
    assert whole.item() == pytest.approx(hand, rel=1e-6)


def test_bradley_terry_large_margins_are_finite():
    chosen, rejected = torch.tensor([-500.0, 500.0]), torch.tensor([500.0, -500.0])  # Δ = −1000, +1000
    # −log σ(−1000) = log(1 + e^{1000}) ≈ 1000;  −log σ(1000) ≈ e^{−1000} ≈ 0. Mean ≈ 500.
    assert bradley_terry_loss(chosen_rewards=chosen, rejected_rewards=rejected).item() == pytest.approx(500.0)
    naive = -torch.log(torch.sigmoid(chosen - rejected)).mean()
    assert torch.isinf(naive)  # what the stable form avoids


def test_bradley_terry_gradient_sign():
    chosen = torch.tensor([0.0, 2.0], requires_grad=True)
    rejected = torch.tensor([0.0, 1.0], requires_grad=True)
    bradley_terry_loss(chosen_rewards=chosen, rejected_rewards=rejected).backward()
    # ∂L/∂r_c = −(1 − σ(Δ)) / B: descent raises the chosen score and lowers the rejected one.
    expected = torch.tensor([-(1 - 0.5) / 2, -(1 - 1 / (1 + math.exp(-1.0))) / 2])
    assert torch.allclose(chosen.grad, expected, atol=1e-7)
    assert torch.allclose(rejected.grad, -expected, atol=1e-7)
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_bradley_terry_rejects_broadcasting():
    with pytest.raises(ValueError, match="shape"):
        bradley_terry_loss(chosen_rewards=torch.zeros(3, 1), rejected_rewards=torch.zeros(3))


def test_preference_accuracy():
    chosen, rejected = torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([0.0, 2.0, 4.0, -1.0])
    assert preference_accuracy(chosen, rejected).item() == pytest.approx(2 / 4)  # the tie counts as wrong


# ── Scoring with a tiny real reward model ──────────────────────────────────────────────────────────────────

TEXTS = [("Q: 2+2? ", "A: 4"), ("Q: hi ", "A: hello there, friend"), ("", "x"), ("Q: long? ", "A: " + "ab " * 12),
         ("Q: ", "A: ok")]


def _tiny_tokenizer(*, with_pad: bool):
    """A character-level tokenizer built offline: 4 specials + 95 printable ASCII characters, BOS prepended."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *map(chr, range(32, 127))])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per character
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if with_pad:
        specials["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def saved_reward_model(tmp_path_factory, request):
    """A 2-layer sequence classifier (num_labels=1) and its tokenizer, saved and reloaded from disk: Llama (rotary
    positions) and GPT-2, whose learned absolute positions make a left-padded row score wrongly unless the positions
    count real tokens only."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    ids = {"num_labels": 1, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if request.param == "llama":
        model = LlamaForSequenceClassification(LlamaConfig(
            vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128, **ids))
    else:
        model = GPT2ForSequenceClassification(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4,
                                                         n_positions=128, initializer_range=0.2, **ids))
    torch.nn.init.normal_(model.score.weight, std=1.0)  # spread the scores so a wrong token position shows
    path = tmp_path_factory.mktemp(f"tiny_rm_{request.param}")
    model.save_pretrained(path)
    _tiny_tokenizer(with_pad=True).save_pretrained(path)
    return path


def _score_alone(model, tokenizer, prompt, completion):
    """Independent reference: one unpadded row (prompt + completion) through the backbone, then the head applied by
    hand to the hidden state of its last position: no padding, no pooling, no hook."""
    ids = tokenizer(prompt + completion)["input_ids"]
    with torch.no_grad():
        hidden = model.base_model(input_ids=torch.tensor([ids])).last_hidden_state  # (1, L, H)
        return model.score(hidden[0, -1]).item()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_score_at_the_last_real_token_matches_one_row_at_a_time(saved_reward_model, padding_side):
    """last_token_scores on a padded batch, left or right, equals each row scored alone: the position comes from the
    attention mask, whatever the padding side."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(saved_reward_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(saved_reward_model)
    ids = [reward_model_ids(tokenizer, p, c) for p, c in TEXTS]
    assert len({len(x) for x in ids}) > 1  # the batch really gets padded
    input_ids, mask = pad_batch(ids, pad_id=tokenizer.pad_token_id, padding_side=padding_side)
    with torch.no_grad():
        scores = last_token_scores(model, input_ids, mask)
    expected = torch.tensor([_score_alone(model, tokenizer, p, c) for p, c in TEXTS])
    assert expected.std() > 0.1  # distinct texts score differently, so a mix-up would be caught
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_score_with_reward_model_matches_unbatched(saved_reward_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(saved_reward_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(saved_reward_model)
    prompts, completions = zip(*TEXTS)
    expected = torch.tensor([_score_alone(model, tokenizer, p, c) for p, c in TEXTS])
    scores = score_with_reward_model(model, tokenizer, list(prompts), list(completions), batch_size=3)
    assert scores.shape == (len(TEXTS),) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_eos_as_pad_is_still_scored_at_the_last_real_token(saved_reward_model):
    """The tokenizer has no pad token, so EOS pads (the usual fallback), and a text that ends with the EOS string is
    scored there: transformers' own pooling takes the rightmost token that is not pad, so it would skip that EOS and
    score the token before it (transformers #35352); the score here is read at the last real token, as when the row
    is scored alone."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(saved_reward_model, pad_token_id=None).eval()
    tokenizer = _tiny_tokenizer(with_pad=False)
    assert tokenizer.pad_token_id is None and model.config.pad_token_id is None
    texts = [(p, c + tokenizer.eos_token) for p, c in TEXTS]  # responses that end with the EOS token
    expected = torch.tensor([_score_alone(model, tokenizer, p, c) for p, c in texts])
    scores = score_with_reward_model(model, tokenizer, [p for p, _ in texts], [c for _, c in texts], batch_size=2)
    assert model.config.pad_token_id == tokenizer.eos_token_id  # eos stands in as pad
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # what the pad-id pooling reads: the token before the EOS, another number
        ids = torch.tensor([reward_model_ids(tokenizer, *texts[0])])
        pooled = model(input_ids=ids).logits[0, 0].item()
    assert ids[0, -1] == tokenizer.eos_token_id and abs(pooled - expected[0].item()) > 1e-3
    assert score_with_reward_model(model, tokenizer, [], []).shape == (0,)
