"""The --model path, in one process on CPU: sampling is the policy that the loss scores (on a Qwen2-shaped model with
the real vocabulary and Qwen2.5-Instruct's generation config), the memory-lean log-prob function's gradients, and
activation checkpointing that really recomputes. Expected values come from independent computations written here.
"""
import math

import pytest
import torch
from real_models import QWEN25_INSTRUCT_GENERATION, save_qwen2

import data
import distributed
import logprobs
import models
import sampling
import train


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> str:
    return save_qwen2(tmp_path_factory.mktemp("qwen2"))  # with Qwen2.5-Instruct's sampling settings


def qwen_run(path: str, temperature: float, neutral: bool) -> tuple[train.Run, object]:
    """A train.Run around the plain (unsharded) Qwen2 policy, set up as train.build_run does it when `neutral`; with
    neutral=False the checkpoint's own generation config is left in place and handed to generate, as a user would."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = models.load_tokenizer(path, chat_template=True)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    original = policy.generation_config
    if neutral:
        sampler = sampling.make_sampler(policy, tok, 12, temperature, original)
    else:
        eos = sampling.eos_token_ids(tok, policy.config, original)
        config = GenerationConfig.from_dict(original.to_dict() | {"max_new_tokens": 12})
        sampler = sampling.Sampler(sample_config=config, greedy_config=None, eos_ids=eos)
    run = train.Run(args=train.Args(max_new_tokens=12, temperature=temperature, micro_batch_size=12), rank=0, world=1,
                    device=torch.device("cpu"), tok=tok, train_rows=[], eval_rows=[], optimizers={}, base_lr={},
                    policy=policy, sampler=sampler, hf_generation_config=original)
    return run, tok


def logprob_diff(run, tok) -> float:
    """rollout_logprob_diff as the trainer logs it: mean over completion tokens of |log p_sampler − log π_θold|."""
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}?"}], tokenize=False,
                                       add_generation_prompt=True) for a, b in ((3, 4), (10, 25), (7, 7))]
    rows = [data.PromptRow(text=p, answer="0", ids=tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    torch.manual_seed(0)
    batch = train.sample(run, rows, repeat=4)
    with torch.no_grad():
        old = train.token_logprobs(run, run.policy, batch)  # (B, T) what step 3 of the RL step computes
    assert batch.sampler_logprobs is not None and batch.completion_mask.sum() >= 12 * 6  # most rows run to 12 tokens
    m = batch.completion_mask
    return ((batch.sampler_logprobs - old).abs() * m).sum().item() / m.sum().item()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_is_the_scored_policy_despite_the_checkpoints_generation_config(qwen_dir, one_process_group, temperature):
    """A Qwen2-shaped model (151,936-token vocabulary) whose generation_config.json sets repetition penalty 1.05,
    top-k 20, top-p 0.8 and temperature 0.7: with the trainer's neutral config, the sampler's log-prob of every drawn
    token equals π_θold's at --temperature (< 1e-3; fp32). The control hands the checkpoint's own
    config to generate: the same metric is then far from 0, so the metric can see a mismatch. Catches: inheriting any
    sampling field of the checkpoint, or scoring at another temperature than the one sampled at."""
    run, tok = qwen_run(qwen_dir, temperature, neutral=True)
    assert run.sampler.eos_ids == [151643, 151645]  # <|endoftext|> and <|im_end|>: every EOS the checkpoint lists
    assert logprob_diff(run, tok) < 1e-3
    control, tok = qwen_run(qwen_dir, temperature, neutral=False)
    assert logprob_diff(control, tok) > 0.05


def test_a_sampler_setting_that_survives_is_refused_by_name(qwen_dir):
    """check_sampler_is_neutral builds generate()'s own logits processors and refuses any but the temperature, naming
    the field. Catches a check that looks only at the fields it knows."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(qwen_dir)  # its generation config still carries the Instruct settings
    tok = models.load_tokenizer(qwen_dir)
    config = sampling.neutral_generation_config(4, 1.0, [151645], tok.pad_token_id)
    config.repetition_penalty = QWEN25_INSTRUCT_GENERATION["repetition_penalty"]
    with pytest.raises(distributed.UserError, match="repetition_penalty"):
        sampling.check_sampler_is_neutral(policy, config)
    config = sampling.neutral_generation_config(4, 1.0, [151645], tok.pad_token_id)
    config.top_p = 0.8
    with pytest.raises(distributed.UserError, match="top_p"):
        sampling.check_sampler_is_neutral(policy, config)
    sampling.check_sampler_is_neutral(policy, sampling.neutral_generation_config(4, 0.7, [151645], tok.pad_token_id))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_token_logprobs_and_entropy_gradients_match_the_plain_version(temperature):
    """logprobs.TokenLogprobs (forward keeps only the logits; backward recomputes the softmax a chunk at a time)
    against logprobs.token_logprobs_reference (log_softmax + gather + entropy), values and gradients, with chunks
    smaller than the batch; and the plain version against the formulas typed out again here. Catches a missing 1/τ in
    backward, the entropy's gradient sign, or a chunk boundary that drops rows."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 5, 37, generator=g, dtype=torch.float64)).requires_grad_(True)
    targets = torch.randint(0, 37, (3, 5), generator=g)
    w_lp, w_ent = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(2))
    old_chunk, logprobs.TokenLogprobs.CHUNK = logprobs.TokenLogprobs.CHUNK, 37 * 4  # 4 rows per chunk: 15 rows → 4
    try:
        lp, ent = logprobs.TokenLogprobs.apply(logits, targets, temperature)
        grad = torch.autograd.grad((w_lp * lp + w_ent * ent).sum(), logits)[0]
    finally:
        logprobs.TokenLogprobs.CHUNK = old_chunk
    lp_plain, ent_plain = logprobs.token_logprobs_reference(logits, targets, temperature)
    grad_plain = torch.autograd.grad((w_lp * lp_plain + w_ent * ent_plain).sum(), logits)[0]
    torch.testing.assert_close(lp.double(), lp_plain.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(ent.double(), ent_plain.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, grad_plain.double(), atol=1e-6, rtol=0)
    # the plain version itself: p_a = e^{z_a/τ} / Σ_b e^{z_b/τ}, one position at a time
    for i, j in ((0, 0), (2, 4)):
        z = (logits[i, j] / temperature).detach()
        p = z.exp() / z.exp().sum()
        assert math.isclose(lp_plain[i, j].item(), math.log(p[targets[i, j]].item()), rel_tol=1e-9)
        assert math.isclose(ent_plain[i, j].item(), -sum(q * math.log(q) for q in p.tolist()), rel_tol=1e-9)


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(qwen_dir):
    """--gradient-checkpointing on a model in eval mode: each block's forward runs a second time during backward (the
    recomputation), and the gradients equal those without it. Catches transformers' own gradient_checkpointing_enable,
    which is a no-op in eval mode, and a KV cache that the recomputation would extend a second time."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[9707, 1879, 11, 1879, 9707, 0, 1, 2]])
    grads, calls = [], []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32).eval()
        if checkpointing:
            models.checkpoint_blocks(model)
        blocks = models.transformer_blocks(model)
        counter = [0]
        for block in blocks:
            block.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
            block.self_attn.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
        lp, ent = logprobs.sequence_logprobs(model, ids, torch.ones_like(ids), 3, 1.0)
        forward_calls = counter[0]
        (lp.sum() + ent.sum()).backward()
        calls.append((forward_calls, counter[0]))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    n_blocks = 2
    assert calls[0] == (2 * n_blocks, 2 * n_blocks)  # no recomputation: block + attention once each
    assert calls[1] == (2 * n_blocks, 2 * n_blocks + n_blocks)  # attention ran again inside each block's recompute
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


def test_gradient_checkpointing_refused_for_a_model_without_blocks():
    """A model that names no transformer block class: one clear error instead of silently keeping activations."""
    model = torch.nn.Linear(3, 3)
    with pytest.raises(distributed.UserError, match="--gradient-checkpointing"):
        models.checkpoint_blocks(model)


def test_one_fp32_process_loads_a_plain_module_with_the_checkpoints_weights(qwen_dir, one_process_group):
    """One process in fp32 has nothing to shard: load_model returns a plain module (no FSDP2 flat-buffer copies
    around every forward and backward), holding exactly the checkpoint's parameters and buffers. Two ranks shard
    (test_train.test_generate_gathers_parameters_once_per_rollout counts the FSDP modules there), and the 1-rank
    and 2-rank updates give the same parameters (test_train's fsdp_runs compare them)."""
    from torch.distributed.fsdp import FSDPModule
    from transformers import AutoModelForCausalLM

    model, shapes, _ = models.load_model(models.ModelSpec("policy", qwen_dir, "--model"), torch.device("cpu"), False)
    reference = AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32)
    assert not any(isinstance(m, FSDPModule) for m in model.modules())
    assert reference.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight  # one tensor
    assert shapes == [tuple(p.shape) for p in reference.parameters()]
    assert len(list(model.named_parameters())) == len(list(reference.named_parameters()))
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert type(p) is torch.nn.Parameter and torch.equal(p, q), name
    for (name, b), (_, c) in zip(model.named_buffers(), reference.named_buffers()):
        assert torch.equal(b, c), name
