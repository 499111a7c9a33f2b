"""run_dir.py — one live run per --out, and no worker left behind by its launcher.

An OS lock on OUT/.lock (released by the kernel however the process ends), the check that every node sees one --out,
and the watch that ends a torchrun worker whose agent is gone.
"""

import os
import socket
import threading
import time

import torch.distributed as dist

from checkpoints import atomic_write
from distributed import UserError, stop_if_any_rank


def claim_out(out: str, rank: int, check) -> tuple[object, bool]:
    """Collective: rank 0 takes an exclusive OS lock on OUT/.lock for the life of the process, or stops every rank
    with one line naming the holder's pid; then, with the lock held, it runs check() (the resume rules), whose
    UserError stops every rank too. The kernel releases the lock when the process ends, however it ends (kill -9
    included), so a lock is never stale. Returns the open lock file (the lock lasts while it is open) and whether
    this run created --out."""
    import fcntl  # POSIX: Linux and macOS

    created, error, handle = not os.path.exists(out), None, None
    if rank == 0:
        try:
            os.makedirs(out, exist_ok=True)
            handle = open(os.path.join(out, ".lock"), "a+")
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()} {socket.gethostname()}\n")
            handle.flush()
            check()
        except BlockingIOError:
            handle.seek(0)
            holder = (handle.read().split() + ["?", "?"])[:2]
            error = UserError(f"--out {out!r} is in use by another run (pid {holder[0]} on {holder[1]}): wait for it "
                              "to end, or choose another --out")
        except OSError as e:
            error = UserError(f"--out {out!r} cannot be written: {e.strerror or e}")
        except UserError as e:
            error = e
        if error is not None and handle is not None:
            release_out(out, handle, created)
    stop_if_any_rank(error)
    return handle, created


def release_out(out: str, handle, created: bool) -> None:
    """Rank 0, when a run ends: the lock is released; and when the run created --out and stopped on bad input, the
    lock file goes and --out too if nothing else is in it (nothing is written before the inputs pass their checks)."""
    if handle is None or handle.closed:
        return
    handle.close()
    if created:
        os.remove(os.path.join(out, ".lock"))
        try:
            os.rmdir(out)
        except OSError:  # not empty: something else was written (a warm start, embedded data)
            pass


def watch_launcher() -> None:
    """Under torchrun, end this worker within a second or two once the torchrun agent that started it is gone.

    torch starts each worker in a session of its own, so `kill -9` of torchrun's process group leaves the workers
    training, writing checkpoints into an --out that a --resume started meanwhile would also write. A daemon thread
    polls the parent's pid; when the agent dies, the worker is re-parented and the thread ends the process at once
    (os._exit). A checkpoint it was writing stays a .partial directory, which is never loaded (save_checkpoint)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # plain `python train.py`: a dead shell must not stop a nohup run
        return
    agent = os.getppid()

    def watch():
        while os.getppid() == agent:
            time.sleep(0.5)
        rank = os.environ.get("RANK", "?")
        os.write(2, f"rank {rank}: the torchrun agent (pid {agent}) is gone; stopping\n".encode())
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def check_shared_filesystem(out: str, rank: int) -> None:
    """Collective: checkpoints are one directory written by every rank and committed by rank 0, so all nodes must
    see one --out."""
    token = os.path.join(out, ".shared-check")
    if rank == 0:
        atomic_write(token, str(os.getpid()))
    dist.barrier()
    seen = os.path.exists(token)
    dist.barrier()
    if rank == 0:
        os.remove(token)
    stop_if_any_rank(None if seen else UserError(f"--out {out!r} is not on a file system shared by every node (rank "
                                                 f"{dist.get_rank()} cannot see rank 0's files): checkpoints need one"))
