"""Memory ledger for PPO vs GRPO: bytes per row, predicted and measured, written like nanoGPT's `estimate_mfu`.

Implements document 000 ("The Critic Bottleneck in PPO"), sections "Visualizing the Critic Bottleneck" (a trained
model costs 16 B/param with mixed-precision AdamW: 2 fp16 weights + 2 fp16 grads + 4 fp32 master + 4 Adam m + 4 Adam
v; a frozen one 2 B/param) and "At Massive Scale: The 70B PPO Memory Bill" (140 GB per fp16 copy, 980 GB of AdamW
state per trained model, activations ~120 GB, NCCL + framework ~80 GB); document 004 ("PPO & GRPO for LLM
Alignment"), "Why this is expensive" and "Memory comparison" (four models in PPO: policy, reference, reward model,
critic; three in GRPO); document 001 ("GRPO — drop the critic"), "What's wrong with PPO at scale". Activations:
Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", Sec. 4.

Accounting (bytes; GB here means decimal 1e9 bytes, as in the documents):
  M_train(N)  = N·(b_w + b_g + b_master + b_m + b_v) + 4·n_T      b's from TRAINABLE_BYTES_PER_PARAM; sum = 16 always
  M_frozen(N) = 2·N
  M_PPO  = M_train(policy) + M_train(critic) + M_frozen(reference) + M_frozen(reward model) + M_act + M_overhead
  M_GRPO = M_PPO − M_train(critic)
  FSDP2 rank r, per parameter: c = ⌈d_0/W⌉, rows_r = max(0, min(d_0, (r+1)·c) − r·c)          (torch.chunk on dim 0)
  activations per layer (estimate): s·b·h·(34 + 5·a·s/h) without recomputation, 2·s·b·h with full recomputation

| Symbol     | variable                 | meaning                                                          |
|------------|--------------------------|------------------------------------------------------------------|
| N          | n_params                 | parameters of one model (policy = critic = reference = RM here) |
| b_x        | TRAINABLE_BYTES_PER_PARAM | bytes per parameter of row x (weights, grads, master, m, v)     |
| n_T        | n_tensors                | parameter tensors; AdamW keeps one fp32 `step` scalar per tensor |
| W, r       | world_size, rank         | FSDP ranks, this rank                                            |
| d_0        | shape[0]                 | first dimension of a parameter (FSDP2 shards along it)           |
| s, b, h    | seq_len, batch, hidden   | tokens per sequence, sequences, hidden size                      |
| a, L       | heads, n_layers          | attention heads, transformer layers                              |

Where the documents' prose and their own arithmetic disagree (the critic "costs more" than the policy; the ~40%,
≈50%, ~4x-vs-~3x and ~2x-vs-~1x savings): docs/errata.md; tests/test_memory_ledger.py pins them.
"""
import math

import torch

GB = 10**9  # decimal gigabyte, as the documents write "140 GB" for 70e9 params × 2 bytes

# Bytes per parameter of one *trained* model; every accounting sums to 16.
TRAINABLE_BYTES_PER_PARAM: dict[str, dict[str, int]] = {
    # 000 "Visualizing the Critic Bottleneck": mixed-precision AdamW (the ZeRO paper's 16 B/param, Rajbhandari 2020)
    "mixed_fp16": {
        "weights": 2,  # fp16/bf16 copy used by forward and backward
        "grads": 2,  # fp16/bf16 gradient
        "master": 4,  # fp32 master copy the optimizer updates
        "adam_m": 4,  # fp32 first moment  m_t = β1 m_{t-1} + (1-β1) g_t
        "adam_v": 4,  # fp32 second moment v_t = β2 v_{t-1} + (1-β2) g_t²
    },
    # FSDP2 fully_shard + MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the sharded parameter stays fp32
    # and *is* the master; the sharded gradient is kept in the parameter's dtype (fp32). The bf16 unsharded parameters
    # and gradients exist only transiently, one FSDP unit at a time (count them under activations/overhead, not here).
    "fsdp2_mixed": {
        "weights": 4,  # fp32 sharded parameter (= master)
        "grads": 4,  # fp32 sharded gradient after reduce-scatter
        "adam_m": 4,  # fp32 first moment
        "adam_v": 4,  # fp32 second moment
    },
    # plain fp32 torch.optim.AdamW, no autocast: what the CPU tests measure
    "fp32": {
        "weights": 4,  # fp32 parameter
        "grads": 4,  # fp32 gradient
        "adam_m": 4,  # exp_avg
        "adam_v": 4,  # exp_avg_sq
    },
}
FROZEN_BYTES_PER_PARAM = 2  # 000 "Visualizing the Critic Bottleneck": reference and reward model hold fp16 weights only
# torch/optim/adam.py `_init_group`: state["step"] is a 0-dim float32 tensor (on CPU unless capturable/fused, then on
# the parameter's device; float64 only if the default dtype is float64). One per parameter tensor, never sharded.
ADAM_STEP_BYTES = 4
ALGOS = ("ppo", "grpo")


def trainable_bytes_per_param(accounting: str = "mixed_fp16") -> int:
    """Bytes per parameter of one trained model under `accounting` (16 for every entry in TRAINABLE_BYTES_PER_PARAM)."""
    if accounting not in TRAINABLE_BYTES_PER_PARAM:
        raise ValueError(f"unknown accounting {accounting!r}; expected one of {sorted(TRAINABLE_BYTES_PER_PARAM)}")
    return sum(TRAINABLE_BYTES_PER_PARAM[accounting].values())


def trainable_rows(
    *, numel: int, n_tensors: int = 0, accounting: str = "mixed_fp16", name: str = "policy"
) -> dict[str, int]:
    """Rows `{name}.weights`, `{name}.grads`, ... for `numel` trained parameters held in `n_tensors` tensors."""
    trainable_bytes_per_param(accounting)  # validates `accounting`
    rows = {f"{name}.{row}": numel * nbytes for row, nbytes in TRAINABLE_BYTES_PER_PARAM[accounting].items()}
    # AdamW step counters: 4 bytes × n_T, replicated on every rank
    rows[f"{name}.adam_step"] = ADAM_STEP_BYTES * n_tensors
    return rows


def ledger(
    n_params: int,
    algo: str,
    reward_model: bool = True,
    *,
    accounting: str = "mixed_fp16",
    n_tensors: int = 0,
    given: dict[str, int] | None = None,
) -> dict[str, int]:
    """Bytes per row for one RL step of `algo` ("ppo" or "grpo") with every model of `n_params` parameters.

    PPO = policy + critic (trained) + reference + reward model (frozen); GRPO drops the critic rows (004 "Memory
    comparison"). `reward_model=False` models a verifiable reward (no RM). `given` holds the rows taken as they are,
    "activations" and "overhead" (000's 70B table: 120e9 and 80e9; 0 when absent). Returns {row: bytes} with a final
    "total".
    """
    if algo not in ALGOS:
        raise ValueError(f"unknown algo {algo!r}; expected one of {ALGOS} (PPO trains a critic, GRPO does not)")
    rows = trainable_rows(numel=n_params, n_tensors=n_tensors, accounting=accounting, name="policy")  # 16 B/param
    if algo == "ppo":
        rows |= trainable_rows(numel=n_params, n_tensors=n_tensors, accounting=accounting, name="critic")  # 16 B/param
    rows["reference.weights"] = FROZEN_BYTES_PER_PARAM * n_params  # frozen π_ref for the KL anchor, 2 B/param
    if reward_model:
        rows["reward_model.weights"] = FROZEN_BYTES_PER_PARAM * n_params  # frozen r_φ, 2 B/param
    given = given or {}
    rows["activations"] = given.get("activations", 0)  # 000: ~120 GB at 70B, or activation_bytes_estimate()
    rows["overhead"] = given.get("overhead", 0)  # 000: NCCL buffers + framework ~80 GB at 70B
    rows["total"] = sum(rows.values())
    return rows


def per_rank_bytes(
    n_params: int, world_size: int, accounting: str = "mixed_fp16", *, n_tensors: int = 0
) -> dict[str, int]:
    """Approximate bytes of one trained model's state on each of `world_size` FSDP / ZeRO-3 ranks: ⌈N/W⌉ per row.

    Ignores FSDP2's per-tensor dim-0 rounding; use `per_rank_bytes_exact` with the parameter shapes for that.
    """
    # sharded state: weights, grads, master, m, v all divide by W; step scalars do not
    # ⌈N / W⌉ elements per rank
    numel = math.ceil(n_params / world_size)
    rows = trainable_rows(numel=numel, n_tensors=n_tensors, accounting=accounting, name="model")
    rows["total"] = sum(rows.values())
    return rows


def fsdp2_local_numel(*, shapes: list[tuple[int, ...]], world_size: int, rank: int) -> int:
    """Elements rank `rank` holds under FSDP2 dim-0 sharding (what `p.to_local().numel()` sums to over parameters).

    torch.chunk semantics: c = ⌈d_0/W⌉ rows per chunk, so the last ranks may get fewer rows or none at all.
    FSDP2 *allocates* c rows for params and grads on every rank (padding); `to_local()` and the AdamW states see the
    unpadded rows counted here.
    """
    numel = 0
    for shape in shapes:
        if len(shape) == 0:
            raise ValueError("FSDP2 shards along dim 0; 0-dim parameters are not covered")
        dim0, row_numel = shape[0], math.prod(shape[1:])
        # c = ⌈d_0 / W⌉
        chunk_rows = math.ceil(dim0 / world_size)
        # rows_r = max(0, min(d_0, (r+1)·c) − r·c)
        rows = max(0, min(dim0, (rank + 1) * chunk_rows) - rank * chunk_rows)
        numel += rows * row_numel
    return numel


def per_rank_bytes_exact(
    *, shapes: list[tuple[int, ...]], world_size: int, rank: int, accounting: str = "fp32"
) -> dict[str, int]:
    """Exact bytes of one FSDP2-trained model's state on `rank`: local (unpadded) elements × B/param + 4 B per step."""
    numel = fsdp2_local_numel(shapes=shapes, world_size=world_size, rank=rank)
    # every rank keeps a step tensor for every parameter, even one whose local shard is empty
    rows = trainable_rows(numel=numel, n_tensors=len(shapes), accounting=accounting, name="model")
    rows["total"] = sum(rows.values())
    return rows


def activation_bytes_estimate(
    *, seq_len: int, batch: int, hidden: int, heads: int, n_layers: int, recompute: bool = False
) -> int:
    """ESTIMATE of activation bytes kept for backward by one trained transformer (Korthikanti et al. 2022, Sec. 4).

    16-bit activations, 1-byte dropout masks, no tensor/sequence parallelism, no flash attention (the 5·a·s/h term is
    the stored attention scores, softmax and its dropout mask). Ignores embeddings, final norm and logits. With full
    recomputation only each layer's 16-bit input is kept.
    """
    s, b, h, a, L = seq_len, batch, hidden, heads, n_layers
    if recompute:
        # 2·s·b·h bytes per layer (the layer input, 2 bytes per element)
        per_layer = 2 * s * b * h
    else:
        # s·b·h·(34 + 5·a·s/h) = 34·s·b·h + 5·a·s²·b   (integer form)
        per_layer = 34 * s * b * h + 5 * a * s * s * b
    return L * per_layer


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 parameter, gradient or optimizer state); the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def measure_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Measured bytes this rank holds: Σ numel·element_size of parameters, gradients and optimizer-state tensors.

    Keys: "params", "grads", "optimizer.<state key>" (e.g. optimizer.exp_avg, optimizer.exp_avg_sq, optimizer.step),
    "total". FSDP2 DTensors count their local (unpadded) shard.
    """
    out = {"params": 0, "grads": 0}
    for p in model.parameters():  # model.parameters() already skips tied duplicates
        out["params"] += _local(p).numel() * p.element_size()
        if p.grad is not None:
            out["grads"] += _local(p.grad).numel() * p.grad.element_size()
    if optimizer is not None:
        for state in optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value):  # exp_avg, exp_avg_sq, step (AdamW); skips plain Python numbers
                    nbytes = _local(value).numel() * value.element_size()
                    out[f"optimizer.{key}"] = out.get(f"optimizer.{key}", 0) + nbytes
    out["total"] = sum(out.values())
    return out


def format_table(columns: dict[str, dict[str, int]]) -> str:
    """Rows × columns in decimal GB, aligned; a row absent from a column prints as '-'."""
    names = list(dict.fromkeys(row for col in columns.values() for row in col))
    width = max(len(n) for n in names) + 2
    lines = [f"{'row':<{width}}" + "".join(f"{c:>14}" for c in columns)]
    for n in names:
        cells = "".join(f"{col[n] / GB:>11.1f} GB" if n in col else f"{'-':>14}" for col in columns.values())
        lines.append(f"{n:<{width}}" + cells)
    return "\n".join(lines)


def _summary(ppo: dict[str, int], grpo: dict[str, int]) -> str:
    """Saving and PPO/GRPO ratio, with and without the activation and overhead rows."""
    state_ppo = ppo["total"] - ppo["activations"] - ppo["overhead"]
    state_grpo = grpo["total"] - grpo["activations"] - grpo["overhead"]
    saving = ppo["total"] - grpo["total"]
    return (
        f"saving {saving / GB:.1f} GB = {saving / ppo['total']:.1%} of PPO;"
        f" PPO/GRPO = {ppo['total'] / grpo['total']:.3f}"
        f" | model state only: {1 - state_grpo / state_ppo:.1%} saved, PPO/GRPO = {state_ppo / state_grpo:.3f}"
    )


if __name__ == "__main__":
    # 000 "At Massive Scale: The 70B PPO Memory Bill": its activation (~120 GB) and overhead (~80 GB) rows, both algos
    doc_rows = dict(given={"activations": 120 * GB, "overhead": 80 * GB})
    ppo70, grpo70 = ledger(70 * 10**9, "ppo", **doc_rows), ledger(70 * 10**9, "grpo", **doc_rows)
    print("70B, mixed-precision AdamW, document 000's activation and overhead rows")
    print(format_table({"PPO": ppo70, "GRPO": grpo70}))
    print(_summary(ppo70, grpo70))
    # Llama-2-70B shape (L=80, h=8192, a=64), b=8, s=4096 as in 000's activation row, full recomputation
    act70 = activation_bytes_estimate(seq_len=4096, batch=8, hidden=8192, heads=64, n_layers=80, recompute=True)
    print(f"Korthikanti estimate, full recompute, per trained 70B model: {act70 / GB:.1f} GB "
          f"(policy + critic {2 * act70 / GB:.1f} GB vs the document's ~120 GB)\n")
    # 7B (Llama-2-7B shape: L=32, h=4096, a=32), b=8, s=4096, full recomputation; one activation set per trained model
    act7 = activation_bytes_estimate(seq_len=4096, batch=8, hidden=4096, heads=32, n_layers=32, recompute=True)
    ppo7 = ledger(7 * 10**9, "ppo", given={"activations": 2 * act7})
    grpo7 = ledger(7 * 10**9, "grpo", given={"activations": act7})
    print("7B, mixed-precision AdamW, activations estimated (full recompute, b=8, s=4096), no overhead row")
    print(format_table({"PPO": ppo7, "GRPO": grpo7}))
    print(_summary(ppo7, grpo7))
