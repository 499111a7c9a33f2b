"""Ledger vs measured: memory_ledger.py's per-rank prediction of parameters + gradients + AdamW state against the bytes
this rank holds after one real optimizer step of a model sharded by models.shard (FSDP2), on 1 or more ranks.

Three predictions, three measurements (benchmarks/README.md explains each gap):
  ledger_approx   memory_ledger.per_rank_bytes: ⌈N/W⌉ × 16 B + 4 B × n_T      (document 000's 16 B/param, split W ways)
  ledger_exact    memory_ledger.per_rank_bytes_exact: FSDP2's dim-0 chunks, unpadded, × 16 B + 4 B × n_T
  padded          this file's padded_bytes: what FSDP2 allocates — params and grads padded to ⌈d_0/W⌉ rows
  tensors         Σ numel·element_size of local params, grads and optimizer tensors (memory_ledger.measure_state_bytes)
  storage         Σ nbytes of the distinct storages behind them (common.storage_bytes): padding included
  cuda_*          torch.cuda.memory_allocated growth and max_memory_allocated (GPU only)
"""
import math

import torch

import memory_ledger
import models
from benchmarks import common


def padded_bytes(*, shapes: list[tuple[int, ...]], world_size: int, rank: int,
                 bytes_per_elem: int = 4) -> dict[str, int]:
    """Bytes FSDP2 allocates for one model on `rank`: each parameter's shard padded to c = ⌈d_0/W⌉ rows (also its
    gradient, inside the unit's flat reduce-scatter buffer); AdamW's m and v only for the unpadded rows."""
    padded = sum(math.ceil(s[0] / world_size) * math.prod(s[1:]) for s in shapes)  # c·row elements per parameter
    exact = memory_ledger.fsdp2_local_numel(shapes=shapes, world_size=world_size, rank=rank)
    rows = {"params": padded * bytes_per_elem, "grads": padded * bytes_per_elem,
            "optimizer": 2 * exact * bytes_per_elem + memory_ledger.ADAM_STEP_BYTES * len(shapes)}
    rows["total"] = sum(rows.values())
    return rows


def measure(size: str, rank: int, world: int, device: torch.device, mixed: bool) -> dict:
    """Build `size` from its config, shard it, take one AdamW step on a random batch, and count bytes on this rank."""
    from transformers import LlamaForCausalLM

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    torch.manual_seed(0)
    model = LlamaForCausalLM(common.llama_config(size))  # fp32 weights on CPU; fully_shard moves them to `device`
    shapes = [tuple(p.shape) for p in model.parameters()]
    n_params = sum(math.prod(s) for s in shapes)
    model = models.shard(model, mixed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, common.SIZES[size]["vocab_size"], (2, 16), generator=g).to(device)
    model(input_ids=ids, labels=ids).loss.backward()  # (2, 16) tokens
    opt.step()
    accounting = "fsdp2_mixed" if mixed else "fp32"
    exact = memory_ledger.per_rank_bytes_exact(shapes=shapes, world_size=world, rank=rank, accounting=accounting)
    approx = memory_ledger.per_rank_bytes(n_params, world, accounting, n_tensors=len(shapes))
    t = common.state_tensors([model], [opt])
    seen: set = set()
    storage = {k: common.storage_bytes(t[k], seen) for k in ("params", "grads", "optimizer")}
    row = {
        "size": size, "world": world, "rank": rank, "device": device.type, "accounting": accounting,
        "n_params": n_params, "n_tensors": len(shapes), "shapes": [list(s) for s in shapes],
        "ledger_approx": approx["total"], "ledger_exact": exact["total"],
        "padded": padded_bytes(shapes=shapes, world_size=world, rank=rank)["total"],
        "tensors": common.tensor_bytes(t["params"] + t["grads"] + t["optimizer"]),
        "tensors_by_kind": {k: common.tensor_bytes(t[k]) for k in ("params", "grads", "optimizer")},
        "measure_state_bytes": memory_ledger.measure_state_bytes(model, opt)["total"],
        "storage": sum(storage.values()), "storage_by_kind": storage,
        "buffers": common.tensor_bytes(t["buffers"]),
    }
    if cuda:
        torch.cuda.synchronize()
        row["cuda_allocated"] = torch.cuda.memory_allocated(device) - before  # state + buffers + cached workspaces
        row["cuda_peak"] = torch.cuda.max_memory_allocated(device) - before  # + activations, unsharded params
    for key in ("ledger_approx", "padded", "tensors", "storage", "cuda_allocated"):
        if key in row:
            row[f"{key}_vs_exact_pct"] = 100 * (row[key] - row["ledger_exact"]) / row["ledger_exact"]
    del model, opt
    return row


def run(sizes: list[str], rank: int, world: int, device: torch.device, mixed: bool, log=print) -> list[dict]:
    rows = []
    for size in sizes:
        rows.append(measure(size, rank, world, device, mixed))
        log(f"  ledger: {size} on {world} rank(s) measured", flush=True)
    return rows


COLUMNS = [("size", "size"), ("n_params", "params N"), ("world", "W"), ("rank", "rank"),
           ("ledger_approx", "ledger ⌈N/W⌉·16 B"), ("ledger_exact", "ledger exact"), ("tensors", "measured tensors"),
           ("storage", "measured storage"), ("padded", "padded (predicted)"), ("storage_vs_exact_pct", "storage Δ%"),
           ("ledger_approx_vs_exact_pct", "⌈N/W⌉ Δ%"), ("buffers", "buffers"),
           ("cuda_allocated", "cuda alloc"), ("cuda_peak", "cuda peak")]
