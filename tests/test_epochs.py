"""Which rows a step reads: epochs of permutations sliced by step (data.rows_for_step), so that "one pass over the
data" reads every row once, on 1 rank or 2, and a resumed run reads what the uninterrupted one would.

Expected values are counts made here over the indices the function returns; nothing is compared with a stored draw.
The resume side (a SIGKILL mid-epoch, then --resume, bit for bit) is tests/test_faults.py::test_exact_resume_after_sigkill:
its 4 steps of 4 prompts sit inside the first epoch of 700 training rows.
"""
import json
import math
from collections import Counter

import pytest

import data


def drawn(n_rows: int, per_step: int, steps: int, seed: int = 0, world: int = 1) -> list:
    """Every row index read by steps 1 … steps, every rank's share in rank order."""
    return [int(i) for step in range(1, steps + 1) for rank in range(world)
            for i in data.rows_for_step(n_rows, per_step, seed, step, rank, world)[1]]


@pytest.mark.parametrize("n_rows, per_step, world", [(40, 8, 1), (40, 8, 2), (37, 8, 1), (37, 8, 2), (5, 8, 2)])
def test_one_pass_reads_every_row_once(n_rows, per_step, world):
    """ceil(N / B) steps: the first N rows read are each row exactly once; the last step fills up with rows of the
    next epoch, each at most once. With N a multiple of B, every row exactly once and nothing else.
    Catches: rows drawn independently per step (about 1/e of the rows never read in one pass), a permutation
    redrawn every step, ranks reading overlapping shares."""
    steps = math.ceil(n_rows / per_step)
    rows = drawn(n_rows, per_step, steps, world=world)
    assert len(rows) == steps * per_step
    assert Counter(rows[:n_rows]) == Counter(range(n_rows))
    assert max(Counter(rows[n_rows:]).values(), default=0) <= 1


def test_the_draw_is_a_function_of_seed_and_step_alone():
    """Step 7 read alone equals step 7 read after steps 1 … 6 (a resumed run), the shares of 1 and 2 ranks are the
    same rows, epochs are shuffled differently, and another seed reads another order."""
    picks = [data.rows_for_step(30, 6, 0, step, 0, 1)[0].tolist() for step in range(1, 11)]
    assert data.rows_for_step(30, 6, 0, 7, 0, 1)[0].tolist() == picks[6]
    two = [data.rows_for_step(30, 6, 0, 7, r, 2)[1].tolist() for r in (0, 1)]
    assert two[0] + two[1] == picks[6]
    first, second = sum(picks[:5], []), sum(picks[5:], [])  # epochs 0 and 1
    assert sorted(first) == sorted(second) == list(range(30)) and first != second
    assert data.rows_for_step(30, 6, 1, 1, 0, 1)[0].tolist() != picks[0]


def test_sft_with_a_model_and_no_steps_is_one_pass_and_logs_its_epoch(tmp_path, monkeypatch):
    """--algo sft --model M --dataset D (23 rows, none held out: --eval-size 0), no --steps: ceil(23 / 4) = 6 steps,
    the logged epoch of step s is s·4/23, and the last step's 1.04 says the pass is complete."""
    import torch.distributed as dist
    from helpers import save_tiny_llama

    import train

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    rows_file = tmp_path / "d.jsonl"
    rows_file.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(23)))
    model = save_tiny_llama(tmp_path / "lm")
    try:
        code = train.main([str(a) for a in ("--algo", "sft", "--model", model, "--dataset", rows_file, "--eval-size", 0,
                                            "--prompts-per-step", 4, "--plot", "false", "--out", tmp_path / "out")])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert code == 0
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(math.isclose(r["epoch"], r["step"] * 4 / 23, rel_tol=1e-12) for r in rows)
