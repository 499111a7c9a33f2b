"""Run train.py with one injected fault: `python tests/_fault_launcher.py ARGS...`, or the same script under
`python -m torch.distributed.run ...`, takes train.py's arguments. The fault comes from the environment variable FAULT
and is installed by monkeypatching train / checkpoints / torch.distributed.checkpoint in this process, so that the product
code carries no test hooks:

  nan:STEP              the clipped surrogate of every minibatch of step STEP is multiplied by NaN (so is the loss)
  raise:RANK:STEP       rank RANK raises RuntimeError at the start of step STEP (train.rl_step)
  kill_in_save:STEP     every rank SIGKILLs itself inside step STEP's checkpoint save, once its DCP shards are written
                        and before the commit (torch.distributed.checkpoint.save)
  kill_after_save:STEP  every rank SIGKILLs itself as soon as step STEP's checkpoint is committed
                        (checkpoints.save_checkpoint has returned), before anything of step STEP+1

Without FAULT it runs train.py unchanged.
"""

import functools
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoints  # noqa: E402
import train  # noqa: E402


def die() -> None:
    """SIGKILL this process: no handler, no atexit, no flush beyond what is already written (as a real kill)."""
    os.kill(os.getpid(), signal.SIGKILL)


def install(fault: str) -> None:
    kind, _, rest = fault.partition(":")
    if kind == "nan":
        at = int(rest)
        current = {"step": None}
        rl_step, surrogate = train.rl_step, train.ppo.clipped_surrogate_loss

        @functools.wraps(rl_step)
        def remembering_rl_step(run, step):
            current["step"] = step
            try:
                return rl_step(run, step)
            finally:
                current["step"] = None

        @functools.wraps(surrogate)
        def nan_surrogate(*args, **kwargs):
            out = surrogate(*args, **kwargs)
            return out * float("nan") if current["step"] == at else out

        train.rl_step, train.ppo.clipped_surrogate_loss = remembering_rl_step, nan_surrogate
    elif kind == "raise":
        rank, at = map(int, rest.split(":"))
        rl_step = train.rl_step

        @functools.wraps(rl_step)
        def raising_rl_step(run, step):
            if run.rank == rank and step == at:
                raise RuntimeError(f"injected fault on rank {rank} at step {at}")
            return rl_step(run, step)

        train.rl_step = raising_rl_step
    elif kind == "kill_in_save":
        import torch.distributed.checkpoint as dcp

        suffix, save = f"step_{int(rest):06d}.partial", dcp.save

        @functools.wraps(save)
        def killing_save(*args, **kwargs):
            result = save(*args, **kwargs)
            if str(kwargs.get("checkpoint_id", "")).rstrip(os.sep).endswith(suffix):
                die()
            return result

        dcp.save = killing_save  # checkpoints.save_checkpoint imports the module and looks up dcp.save at call time
    elif kind == "kill_after_save":
        at, save_checkpoint = int(rest), checkpoints.save_checkpoint

        @functools.wraps(save_checkpoint)
        def killing_save_checkpoint(args, step, *rest_args, **kwargs):
            save_checkpoint(args, step, *rest_args, **kwargs)
            if step == at:
                die()

        checkpoints.save_checkpoint = killing_save_checkpoint  # train.save calls checkpoints.save_checkpoint(...)
    else:
        raise SystemExit(f"_fault_launcher: unknown FAULT {fault!r}")


if __name__ == "__main__":
    if os.environ.get("FAULT"):
        install(os.environ["FAULT"])
    sys.exit(train.main(sys.argv[1:]))
