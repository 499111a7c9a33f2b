"""The --model path, in one process on CPU: sampling is the policy that the loss scores (on a Qwen2-shaped model with
the real vocabulary and Qwen2.5-Instruct's generation config), the memory-lean log-prob function's gradients, and
activation checkpointing that really recomputes. Expected values come from independent computations written here.
"""
import math

import pytest
import torch

import plumbing
import train
from real_models import QWEN25_INSTRUCT_GENERATION, save_qwen2


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> str:
    return save_qwen2(tmp_path_factory.mktemp("qwen2"))  # with Qwen2.5-Instruct's sampling settings


def qwen_run(path: str, temperature: float, neutral: bool) -> tuple[train.Run, object]:
    """A train.Run around the plain (unsharded) Qwen2 policy, set up as plumbing.setup does it when `neutral`; with
    neutral=False the checkpoint's own generation config is left in place and handed to generate, as a user would."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = plumbing.load_tokenizer(path, chat_template=True)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    original = policy.generation_config
    eos = plumbing.eos_token_ids(tok, policy.config, original)
    if neutral:
        policy.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id)
        config = plumbing.neutral_generation_config(12, temperature, eos, tok.pad_token_id)
        plumbing.check_sampler_is_neutral(policy, config)
    else:
        config = GenerationConfig.from_dict(original.to_dict() | {"max_new_tokens": 12})
    run = train.Run(train.Args(max_new_tokens=12, temperature=temperature), 0, 1, torch.device("cpu"), tok, policy, None,
                    None, None, None, [], [], [], [], sample_config=config, greedy_config=None, eos_ids=eos,
                    hf_generation_config=original, beta=0.0)
    return run, tok


def logprob_diff(run, tok) -> float:
    """rollout_logprob_diff as the trainer logs it: mean over completion tokens of |log p_sampler − log π_θold|."""
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}?"}], tokenize=False,
                                       add_generation_prompt=True) for a, b in ((3, 4), (10, 25), (7, 7))]
    rows = [(p, "0", tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    torch.manual_seed(0)
    batch = train.sample(run, rows, repeat=4)
    with torch.no_grad():
        old = train.sequence_logprobs(run.policy, batch.input_ids, batch.attention_mask, batch.n_prompt, run.args.temperature)[0]
    assert batch.sampler_logprobs is not None and batch.completion_mask.sum() >= 12 * 6  # most rows run to 12 tokens
    m = batch.completion_mask
    return ((batch.sampler_logprobs - old).abs() * m).sum().item() / m.sum().item()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_is_the_scored_policy_despite_the_checkpoints_generation_config(qwen_dir, one_process_group, temperature):
    """A Qwen2-shaped model (151,936-token vocabulary) whose generation_config.json sets repetition penalty 1.05,
    top-k 20, top-p 0.8 and temperature 0.7: with the trainer's neutral config, the sampler's log-prob of every drawn
    token equals π_θold's at --temperature (< 1e-3, the issue's bound; fp32). The control hands the checkpoint's own
    config to generate: the same metric is then far from 0, so the metric can see a mismatch. Catches: inheriting any
    sampling field of the checkpoint, or scoring at another temperature than the one sampled at."""
    run, tok = qwen_run(qwen_dir, temperature, neutral=True)
    assert run.eos_ids == [151643, 151645]  # <|endoftext|> and <|im_end|>: every EOS the checkpoint lists
    assert logprob_diff(run, tok) < 1e-3
    control, tok = qwen_run(qwen_dir, temperature, neutral=False)
    assert logprob_diff(control, tok) > 0.05


def test_a_sampler_setting_that_survives_is_refused_by_name(qwen_dir):
    """check_sampler_is_neutral builds generate()'s own logits processors and refuses any but the temperature, naming
    the field. Catches a check that looks only at the fields it knows."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(qwen_dir)  # its generation config still carries the Instruct settings
    tok = plumbing.load_tokenizer(qwen_dir)
    config = plumbing.neutral_generation_config(4, 1.0, [151645], tok.pad_token_id)
    config.repetition_penalty = QWEN25_INSTRUCT_GENERATION["repetition_penalty"]
    with pytest.raises(plumbing.UserError, match="repetition_penalty"):
        plumbing.check_sampler_is_neutral(policy, config)
    config = plumbing.neutral_generation_config(4, 1.0, [151645], tok.pad_token_id)
    config.top_p = 0.8
    with pytest.raises(plumbing.UserError, match="top_p"):
        plumbing.check_sampler_is_neutral(policy, config)
    plumbing.check_sampler_is_neutral(policy, plumbing.neutral_generation_config(4, 0.7, [151645], tok.pad_token_id))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_token_logprobs_and_entropy_gradients_match_log_softmax(temperature):
    """train.TokenLogprobs (forward keeps only the logits; backward recomputes the softmax a chunk at a time) against
    torch's log_softmax and the entropy written out, values and gradients, with chunks smaller than the batch.
    Catches a missing 1/τ in backward, the entropy's gradient sign, or a chunk boundary that drops rows."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 5, 37, generator=g, dtype=torch.float64)).requires_grad_(True)
    targets = torch.randint(0, 37, (3, 5), generator=g)
    w_lp, w_ent = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    old_chunk, train.TokenLogprobs.CHUNK = train.TokenLogprobs.CHUNK, 37 * 4  # 4 rows per chunk: 15 rows → 4 chunks
    try:
        lp, ent = train.TokenLogprobs.apply(logits, targets, temperature)
        grad = torch.autograd.grad((w_lp * lp + w_ent * ent).sum(), logits)[0]
    finally:
        train.TokenLogprobs.CHUNK = old_chunk
    z = logits / temperature
    logp = torch.log_softmax(z, -1)
    lp_ref = logp.gather(-1, targets[..., None])[..., 0]
    ent_ref = -(logp.exp() * logp).sum(-1)
    grad_ref = torch.autograd.grad((w_lp * lp_ref + w_ent * ent_ref).sum(), logits)[0]
    torch.testing.assert_close(lp.double(), lp_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent.double(), ent_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=0)


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
            plumbing.checkpoint_blocks(model)
        blocks = plumbing.transformer_blocks(model)
        counter = [0]
        for block in blocks:
            block.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
            block.self_attn.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
        lp, ent = train.sequence_logprobs(model, ids, torch.ones_like(ids), 3, 1.0)
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
    with pytest.raises(plumbing.UserError, match="--gradient-checkpointing"):
        plumbing.checkpoint_blocks(model)


def test_on_policy_update_reuses_its_first_forward_with_the_same_loss_and_gradients(qwen_dir, one_process_group):
    """One epoch, one minibatch (GRPO): π_θold's log-probs are the update's own first forward pass, detached, instead of
    a separate no-grad pass. The loss, the logged row and the parameters after one SGD step are the same either way
    (micro-batches of 2 in both). Catches reusing log-probs that still carry gradient (ratio's gradient would change)
    or taking them after the optimizer step."""
    from transformers import AutoModelForCausalLM

    tok = plumbing.load_tokenizer(qwen_dir)
    prompts = [tok(p)["input_ids"] for p in ("What is 1 + 2?", "Hi there", "7 times 8", "Name a color")]
    out = {}
    for reuse in (False, True):
        torch.manual_seed(0)
        policy = AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32).eval()
        args = train.Args(algo="grpo", group_size=2, prompts_per_step=2, max_new_tokens=5, micro_batch_size=2,
                          minibatch_size=4, epochs=1, ent_coef=0.01, beta=0.0, max_grad_norm=1e9, loss_agg="token-mean")
        assert train.reuses_first_forward(args)
        run = train.Run(args, 0, 1, torch.device("cpu"), tok, policy, None, None, None, None, [], [torch.optim.SGD(policy.parameters(), lr=0.5)],
                        [], [], None, None, [151645], None, beta=0.0)
        g = torch.Generator().manual_seed(1)
        ids = torch.cat([torch.tensor([p[:2] for p in prompts]), torch.randint(0, 151643, (4, 5), generator=g)], 1)  # (4, 7)
        batch = train.Rollout(ids, torch.ones_like(ids), torch.ones(4, 5), torch.ones(4, 5), 2, [""] * 4, [""] * 4, [""] * 4,
                              scores=torch.tensor([1.0, 0.0, 0.5, 0.2]))
        if not reuse:
            with torch.no_grad():
                batch.old_logprobs = train.chunked_logprobs(run, policy, batch)
        batch.advantages, batch.returns = train.compute_advantages(run, batch)
        stats = train.update(run, batch, step=1)
        out[reuse] = (stats, batch.old_logprobs.clone(), {n: p.detach().clone() for n, p in policy.named_parameters()})
    (s0, lp0, p0), (s1, lp1, p1) = out[False], out[True]
    torch.testing.assert_close(lp1, lp0, atol=1e-6, rtol=0)  # the reused log-probs are π_θold's
    for k in ("loss", "policy_loss", "entropy", "clipfrac", "approx_kl", "grad_norm"):
        assert math.isclose(s0[k], s1[k], rel_tol=0, abs_tol=1e-6), (k, s0[k], s1[k])
    assert max((p1[n] - p0[n]).abs().max().item() for n in p0) < 1e-6
    assert max((p1[n] - AutoModelForCausalLM.from_pretrained(qwen_dir).state_dict()[n]).abs().max().item() for n in p0) > 1e-4


def test_one_fp32_process_loads_a_plain_module_with_the_checkpoints_weights(qwen_dir, one_process_group):
    """One process in fp32 has nothing to shard: load_sharded returns a plain module (no FSDP2 flat-buffer copies
    around every forward and backward), holding exactly the checkpoint's parameters and buffers. Two ranks shard
    (test_train.test_generate_gathers_parameters_once_per_rollout counts the FSDP modules there), and the 1-rank
    and 2-rank updates give the same parameters (test_train's fsdp_runs compare them)."""
    from torch.distributed.fsdp import FSDPModule
    from transformers import AutoModelForCausalLM

    model, shapes, _ = plumbing.load_sharded("causal", qwen_dir, torch.float32, torch.device("cpu"), False)
    reference = AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32)
    assert not any(isinstance(m, FSDPModule) for m in model.modules())
    assert reference.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight  # one tensor
    assert shapes == [tuple(p.shape) for p in reference.parameters()]
    assert len(list(model.named_parameters())) == len(list(reference.named_parameters()))
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert type(p) is torch.nn.Parameter and torch.equal(p, q), name
    for (name, b), (_, c) in zip(model.named_buffers(), reference.named_buffers()):
        assert torch.equal(b, c), name
