"""Tests for memory_ledger.py: the documents' numbers, invariants, and bytes measured on real models (CPU, FSDP2 gloo).

Expected values are hand arithmetic written here (or the documents' own figures), never the module's printout.
Run alone as a torchrun script, this file is the 2-rank FSDP2 worker used by `test_fsdp2_per_rank_bytes_exact`.
"""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import memory_ledger as ml  # noqa: E402

GB = 10**9  # the documents' "GB" is decimal
N70 = 70 * 10**9
DOC_ROWS = dict(given={"activations": 120 * GB, "overhead": 80 * GB})  # 000 "At Massive Scale": ~120 GB, ~80 GB
# small Llama: odd vocab (127) so embedding and lm_head split 64/63 rows over 2 ranks; a (1, 32) value head leaves
# rank 1 with zero rows of it; fp32 throughout
LLAMA = dict(vocab_size=127, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


# ---------------------------------------------------------------- tier 1: the documents' worked numbers

def test_70b_table_of_doc_000():
    ppo, grpo = ml.ledger(N70, "ppo", **DOC_ROWS), ml.ledger(N70, "grpo", **DOC_ROWS)
    # each fp16 copy: 70e9 × 2 B = 140 GB (rows "Policy/Critic/Reference/Reward model fp16")
    for row in ("policy.weights", "critic.weights", "reference.weights", "reward_model.weights"):
        assert ppo[row] == 140 * GB
    # "AdamW state": fp32 master 4 + m 4 + v 4 + fp16 grad 2 = 14 B/param → 70e9 × 14 = 980 GB, per trained model
    for model in ("policy", "critic"):
        assert sum(ppo[f"{model}.{r}"] for r in ("grads", "master", "adam_m", "adam_v")) == 980 * GB
    # PPO: 4 × 140 + 2 × 980 + 120 + 80 = 2720 GB ("~2.7 TB");  GRPO: 3 × 140 + 980 + 120 + 80 = 1600 GB ("~1.6 TB")
    assert ppo["total"] == 2720 * GB and round(ppo["total"] / 10**12, 1) == 2.7
    assert grpo["total"] == 1600 * GB and round(grpo["total"] / 10**12, 1) == 1.6
    # "The critic row disappears (140 GB saved). The critic's AdamW state disappears (980 GB saved)."
    assert ppo["total"] - grpo["total"] == (140 + 980) * GB


def test_doc_claims_checked_against_arithmetic():
    ppo, grpo = ml.ledger(N70, "ppo", **DOC_ROWS), ml.ledger(N70, "grpo", **DOC_ROWS)
    critic = sum(v for k, v in ppo.items() if k.startswith("critic."))
    policy = sum(v for k, v in ppo.items() if k.startswith("policy."))
    # 000 says the critic with its optimizer state costs MORE than the policy; 16 B/param each: they are equal
    assert critic == policy == 16 * N70
    # 000 "~40 %": 1120 / 2720 = 0.4118
    assert (ppo["total"] - grpo["total"]) / ppo["total"] == pytest.approx(1120 / 2720)
    # 000 / 003 "≈50 %" holds for the trainable state only: (32 − 16) / 32
    trainable = ("policy.", "critic.")
    t_ppo = sum(v for k, v in ppo.items() if k.startswith(trainable))
    t_grpo = sum(v for k, v in grpo.items() if k.startswith(trainable))
    assert 1 - t_grpo / t_ppo == 0.5
    # 004 "~4x vs ~3x policy size" counts parameters (4:3); bytes per param are 16+16+2+2 = 36 vs 16+2+2 = 20 → 1.8
    assert ml.ledger(1, "ppo")["total"] == 36 and ml.ledger(1, "grpo")["total"] == 20
    # 001 "~2x vs ~1x the policy": exactly 2x on trainable state, 1.7x on 000's full 70B table (2720 / 1600)
    assert ppo["total"] / grpo["total"] == pytest.approx(1.7)


def test_7b_hand_values():
    n = 7 * 10**9
    # PPO: 7e9 × (16 + 16 + 2 + 2) = 252e9;  GRPO: 7e9 × (16 + 2 + 2) = 140e9
    assert ml.ledger(n, "ppo")["total"] == 252 * GB
    assert ml.ledger(n, "grpo")["total"] == 140 * GB
    # verifiable reward, no reward model: 7e9 × 34 = 238e9 and 7e9 × 18 = 126e9
    assert ml.ledger(n, "ppo", reward_model=False)["total"] == 238 * GB
    assert ml.ledger(n, "grpo", reward_model=False)["total"] == 126 * GB
    # row by row: 2 + 2 + 4 + 4 + 4 B/param → 14, 14, 28, 28, 28 GB
    rows = ml.ledger(n, "grpo")
    got = [rows[f"policy.{r}"] for r in ("weights", "grads", "master", "adam_m", "adam_v")]
    assert got == [14 * GB, 14 * GB, 28 * GB, 28 * GB, 28 * GB]


# ---------------------------------------------------------------- tier 2: invariants

@pytest.mark.parametrize("reward_model", [True, False])
def test_grpo_is_ppo_minus_critic_rows(reward_model):
    kw = dict(n_tensors=723, given={"activations": 12345, "overhead": 678})
    ppo, grpo = ml.ledger(1_234_567, "ppo", reward_model, **kw), ml.ledger(1_234_567, "grpo", reward_model, **kw)
    without_critic = {k: v for k, v in ppo.items() if not k.startswith("critic.") and k != "total"}
    assert {k: v for k, v in grpo.items() if k != "total"} == without_critic
    assert grpo["total"] == ppo["total"] - sum(v for k, v in ppo.items() if k.startswith("critic."))
    assert ("reward_model.weights" in ppo) == reward_model


def test_frozen_is_2_bytes_and_every_accounting_is_16():
    rows = ml.ledger(1000, "ppo")
    assert rows["reference.weights"] == rows["reward_model.weights"] == 2000
    for accounting in ("mixed_fp16", "fsdp2_mixed", "fp32"):
        assert ml.trainable_bytes_per_param(accounting) == 16
        one = ml.ledger(1000, "grpo", False, accounting=accounting, n_tensors=3)
        assert one["total"] == 1000 * 16 + 2 * 1000 + 3 * 4  # policy + reference + 3 step scalars of 4 B


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown algo 'dpo'"):
        ml.ledger(10, "dpo")
    with pytest.raises(ValueError, match="unknown accounting"):
        ml.trainable_bytes_per_param("int8")


def test_per_rank_divides_sharded_state_but_not_step_scalars():
    # 70e9 × 16 B / 8 ranks = 140 GB per rank, plus 723 step scalars × 4 B on every rank
    assert ml.per_rank_bytes(N70, 8, "mixed_fp16", n_tensors=723)["total"] == 140 * GB + 723 * 4
    # 10 params over 4 ranks: ⌈10/4⌉ = 3 elements × 16 B
    assert ml.per_rank_bytes(10, 4, "fp32")["total"] == 48


def test_fsdp2_local_numel_by_hand_and_against_torch_chunk():
    shapes = [(5, 3), (1,), (8, 2)]
    # (5,3): c = ⌈5/4⌉ = 2 → rows 2,2,1,0 → 6,6,3,0 | (1,): c = 1 → 1,0,0,0 | (8,2): c = 2 → 4 each
    expected = [6 + 1 + 4, 6 + 0 + 4, 3 + 0 + 4, 0 + 0 + 4]
    assert [ml.fsdp2_local_numel(shapes=shapes, world_size=4, rank=r) for r in range(4)] == expected
    shapes = [(127, 32), (1, 32), (1,), (7,), (3, 2, 2), (64,)]
    for world_size in (1, 2, 3, 4, 8):
        numels = [ml.fsdp2_local_numel(shapes=shapes, world_size=world_size, rank=r) for r in range(world_size)]
        naive = [sum(c[r].numel() if r < len(c) else 0 for c in (torch.empty(s).chunk(world_size) for s in shapes))
                 for r in range(world_size)]
        assert numels == naive and sum(numels) == sum(math.prod(s) for s in shapes)


def test_activation_estimate_by_hand():
    # s=4, b=2, h=8, a=2, L=3: s·b·h·(34 + 5·a·s/h) = 64·(34 + 5) = 2496 per layer → 7488; recompute 2·s·b·h·L = 384
    kw = dict(seq_len=4, batch=2, hidden=8, heads=2, n_layers=3)
    assert ml.activation_bytes_estimate(**kw) == 7488
    assert ml.activation_bytes_estimate(**kw, recompute=True) == 384
    # 70B (L=80, h=8192), b=8, s=4096, full recompute: 2 · 4096 · 8 · 8192 · 80 = 42_949_672_960 B ≈ 42.9 GB
    assert ml.activation_bytes_estimate(seq_len=4096, batch=8, hidden=8192, heads=64, n_layers=80,
                                        recompute=True) == 42_949_672_960


# ---------------------------------------------------------------- tier 3: measured on real models

def _small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).float()


def test_measured_fp32_adamw_equals_ledger():
    model = _small_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    # independent sums over parameters, gradients and every optimizer-state tensor
    params = list(model.parameters())
    p_bytes = sum(p.numel() * p.element_size() for p in params)
    g_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params)
    states = list(optimizer.state.values())
    moment_bytes = sum(s[k].numel() * s[k].element_size() for s in states for k in ("exp_avg", "exp_avg_sq"))
    step_bytes = sum(s["step"].numel() * s["step"].element_size() for s in states)
    assert step_bytes == 4 * len(params)  # one 0-dim float32 step per parameter tensor
    n_params = sum(p.numel() for p in params)
    rows = ml.trainable_rows(numel=n_params, n_tensors=len(params), accounting="fp32", name="policy")
    assert rows["policy.weights"] == p_bytes and rows["policy.grads"] == g_bytes
    assert rows["policy.adam_m"] + rows["policy.adam_v"] == moment_bytes and rows["policy.adam_step"] == step_bytes
    total = p_bytes + g_bytes + moment_bytes + step_bytes
    assert ml.per_rank_bytes(n_params, 1, "fp32", n_tensors=len(params))["total"] == total
    measured = ml.measure_state_bytes(model, optimizer)
    assert measured["params"] == p_bytes and measured["grads"] == g_bytes
    assert measured["optimizer.exp_avg"] + measured["optimizer.exp_avg_sq"] == moment_bytes
    assert measured["optimizer.step"] == step_bytes
    assert measured["total"] == total


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_per_rank_bytes_exact(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), __file__, str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    shapes = [tuple(s) for s in results[0]["shapes"]]
    for rank, res in enumerate(results):
        predicted = ml.per_rank_bytes_exact(shapes=shapes, world_size=2, rank=rank, accounting="fp32")
        assert res["params"] == predicted["model.weights"] and res["grads"] == predicted["model.grads"]
        assert res["moments"] == predicted["model.adam_m"] + predicted["model.adam_v"]
        assert res["steps"] == predicted["model.adam_step"] == 4 * len(shapes)  # step scalars are not sharded
        assert res["measured_total"] == res["params"] + res["grads"] + res["moments"] + res["steps"]
        assert res["measured_total"] == predicted["total"]
    # uneven split (embedding and lm_head 64/63 rows, value head 1/0 rows): the ranks differ, and they sum to the model
    assert results[0]["params"] > results[1]["params"]
    assert results[0]["params"] + results[1]["params"] == 4 * sum(math.prod(s) for s in shapes)


def _fsdp2_worker(out_dir: str) -> None:
    """One rank: Llama + value head, fully_shard per decoder layer and root, one AdamW step, bytes to rank{r}.json."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()

    class PolicyWithValueHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = _small_llama()
            self.value_head = torch.nn.Linear(LLAMA["hidden_size"], 1)  # (1, 32) weight, (1,) bias

        def forward(self, ids):
            out = self.lm(input_ids=ids, labels=ids, output_hidden_states=True)
            return out.loss + self.value_head(out.hidden_states[-1]).pow(2).mean()

    model = PolicyWithValueHead()
    for layer in model.lm.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(1)
    model(torch.randint(0, LLAMA["vocab_size"], (2, 8))).backward()
    optimizer.step()
    params = list(model.parameters())
    states = [optimizer.state[p] for p in params]
    res = {
        "shapes": [list(p.shape) for p in params],  # DTensor .shape is the global shape
        "params": sum(p.to_local().numel() * p.element_size() for p in params),
        "grads": sum(p.grad.to_local().numel() * p.grad.element_size() for p in params),
        "moments": sum(s[k].to_local().numel() * s[k].element_size() for s in states
                       for k in ("exp_avg", "exp_avg_sq")),
        "steps": sum(s["step"].numel() * s["step"].element_size() for s in states),
        "measured_total": ml.measure_state_bytes(model, optimizer)["total"],
    }
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    _fsdp2_worker(sys.argv[1])
