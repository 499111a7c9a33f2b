"""One batch, two implementations: TRL's GRPOTrainer computes the loss and the gradient that train.py computes.

Runs only where TRL is installed; the project never requires it (benchmarks/trl_requirements.txt pins the versions
this was written against: `pip install -r requirements.txt -r benchmarks/trl_requirements.txt` in a virtualenv of
its own). Both sides run with the settings benchmarks/trl_compare.py times them with: TRL with the GRPOConfig of
benchmarks/trl_side.py's trl_config(), ours with the very flags of trl_compare.ours_command() (16 prompts × 8
completions, β 0.04 with k3, ε 0.2, token-mean loss, group-std-scaled advantages, on-policy), so this also checks that
that comparison times one and the same computation.

TRL samples one rollout batch (the policy first moved off the reference, so that β·k3 and its gradient are not zero);
its GRPOTrainer._compute_loss and the backward of it give the expected loss and gradient. Ours is train.py's own RL
step on that batch: train.score, train.token_logprobs (π_θold and π_ref), train.compute_advantages and
train.minibatch_gradients. They agree to ~1e-4 relative, not to float precision, and for one reason: the ε of the
advantages' std division, A_i = (R_i − mean)/(std + ε), is 1e-4 in TRL and 1e-6 in grpo.group_advantages, which
scales a group's advantages by (std + 1e-6)/(std + 1e-4) ≈ 1 − 1e-4/std. With the rewards here (every group's std
≥ 0.5) the gradients may differ by 2e-4 relative at most. The second test shows that this ε is the whole difference:
with TRL's ε in our advantages, the two agree to float precision.
"""
import json
import os
import sys

import pytest

trl = pytest.importorskip("trl", reason="TRL is optional (benchmarks/trl_requirements.txt); the project never needs it")
torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.trl_compare import SETTINGS, ours_command  # noqa: E402
from benchmarks.trl_side import trl_config  # noqa: E402
from helpers import save_tiny_llama  # noqa: E402

G = SETTINGS["group_size"]


def digits(text: str, answer: str) -> float:
    """The reward of both sides: how many digits the completion holds. Unlike the math reward, it varies between the
    samples of a random policy, so that the groups' advantages, and the surrogate's gradient, are not zero."""
    return float(sum(c.isdigit() for c in text))


def trl_digits(completions, answer, **kwargs):  # TRL passes the dataset's other columns as keyword arguments
    return [digits(c, a) for c, a in zip(completions, answer)]


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])  # (N,)


@pytest.fixture(scope="module")
def trl_side(tmp_path_factory):
    """TRL's rollout batch, loss and gradient (the expected values), its trainer, and the data it sampled from."""
    import datasets
    from transformers import AutoTokenizer

    work = tmp_path_factory.mktemp("trl")
    model_dir = save_tiny_llama(work / "model")
    rows = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(4) for b in range(4)]  # 16 prompts
    (work / "data").mkdir()
    (work / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    config = trl.GRPOConfig(**trl_config(str(work / "trainer"), seed=0, steps=1))
    dataset = datasets.Dataset.from_list([{"prompt": r["question"], "answer": r["answer"]} for r in rows])
    trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=[trl_digits], args=config, train_dataset=dataset,
                              processing_class=tok)
    policy = trainer.model.train()
    torch.manual_seed(1)
    with torch.no_grad():  # π_θ ≠ π_ref
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = [{"prompt": r["question"], "answer": r["answer"]} for r in rows for _ in range(G)]  # (B,) G per prompt
    inputs = trainer._generate_and_score_completions(batch)  # TRL's rollout: samples, rewards, A, ref log-probs
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is not running here
    policy.zero_grad()
    loss = trainer._compute_loss(policy, inputs)
    loss.backward()
    return {"trainer": trainer, "inputs": inputs, "batch": batch, "loss": loss.item(), "grad": flat_grad(policy),
            "model_dir": model_dir, "data_dir": str(work / "data"), "out": str(work / "ours")}


def our_step(trl_side, eps: float | None = None) -> tuple[dict, torch.Tensor, object]:
    """train.py's steps 2-5 on TRL's batch, with the flags trl_compare.py runs train.py with; `eps` replaces our
    advantages by grpo.group_advantages with that ε. Returns the logged terms, the gradient and the train.Rollout."""
    import grpo
    import options
    import train

    trainer, inputs, s = trl_side["trainer"], trl_side["inputs"], trl_side
    flags = ours_command("python", s["model_dir"], s["data_dir"], s["out"], seed=0, steps=1)[2:]
    args = options.resolve_defaults(options.parse_args(train.Args, flags), 1)
    policy = trainer.model
    run = train.Run(args=args, rank=0, world=1, device=torch.device("cpu"), tok=trainer.processing_class,
                    train_rows=[], eval_rows=[], optimizers={}, base_lr={}, policy=policy, ref=trainer.ref_model,
                    reward_fns=[("digits", 1.0, digits)], beta=args.beta)
    P = inputs["prompt_ids"].shape[1]
    mask = inputs["completion_mask"].float()  # (B, T) through the first EOS
    texts = trainer.processing_class.batch_decode(inputs["completion_ids"], skip_special_tokens=True)
    batch = train.Rollout(input_ids=torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),  # (B, P + T)
                          attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
                          completion_mask=mask, loss_mask=mask, n_prompt=P, prompts=[b["prompt"] for b in s["batch"]],
                          answers=[b["answer"] for b in s["batch"]], texts=texts)
    batch.scores, _ = train.score(run, batch, step=1)  # (B,)
    with torch.no_grad():
        batch.old_logprobs = train.token_logprobs(run, policy, batch)  # (B, T)
        batch.ref_logprobs = train.token_logprobs(run, run.ref, batch)  # (B, T)
    batch.advantages, _ = train.compute_advantages(run, batch)  # (B,)
    if eps is not None:
        batch.advantages = grpo.group_advantages(batch.scores.view(-1, G), eps=eps).reshape(-1)  # (B,)
    policy.zero_grad()
    terms = train.minibatch_gradients(run, batch)
    return terms, flat_grad(policy), batch


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def loss_scale(batch) -> float:
    """The token mean of |A|, the surrogate's scale: the units the losses are compared in. The on-policy loss,
    −token-mean(A) + β·k3, is small beside it (A averages zero in every group), so not relative to itself."""
    return ((batch.advantages.abs()[:, None] * batch.loss_mask).sum() / batch.loss_mask.sum()).item()


def test_our_grpo_step_computes_trls_loss_and_gradient(trl_side, one_process_group):
    terms, grad, batch = our_step(trl_side)
    inputs = trl_side["inputs"]
    std = batch.scores.view(-1, G).std(-1)  # (B/G,)
    assert (std[std > 0] >= 0.5).all() and (std > 0).sum() >= 8, std  # most groups move the surrogate
    assert terms["kl_loss"] > 0.05  # the policy is off the reference: β·k3 has a gradient
    assert relative(batch.advantages, inputs["advantages"]) < 2e-4  # the ε, nothing else
    diff = relative(grad, trl_side["grad"])
    print(f"loss TRL {trl_side['loss']:.7g}, ours {terms['loss']:.7g}; gradient relative difference {diff:.2e}")
    assert abs(terms["loss"] - trl_side["loss"]) < 2e-4 * loss_scale(batch)
    assert 0 < diff < 2e-4


def test_with_trls_epsilon_the_two_agree_to_float_precision(trl_side, one_process_group):
    terms, grad, batch = our_step(trl_side, eps=1e-4)
    torch.testing.assert_close(batch.advantages, trl_side["inputs"]["advantages"], rtol=1e-5, atol=1e-6)
    diff = relative(grad, trl_side["grad"])
    print(f"with TRL's ε: loss TRL {trl_side['loss']:.7g}, ours {terms['loss']:.7g}; gradient difference {diff:.2e}")
    assert abs(terms["loss"] - trl_side["loss"]) < 1e-5 * loss_scale(batch)
    assert diff < 1e-5
