"""Many processes: the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), a launcher, and gathers.

``tokcomp eval --processes N`` starts N copies of itself with that environment on this machine; each
runs lmms-eval on its shard of the documents (lmms-eval shards by rank and gathers the samples to
rank 0), and rank 0 alone writes the outputs. `accelerate launch` and `torchrun` set the same
variables, so `accelerate launch -m lmms_eval --model tokcomp ...` runs the same code.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

from tokcomp.errors import TokcompError

WORKER_ENV = "TOKCOMP_WORKER"  # set in the processes the launcher starts


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_world() -> World:
    """The world the environment describes (one process when nothing is set)."""
    try:
        return World(
            rank=int(os.environ.get("RANK", "0")),
            size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    except ValueError as exc:
        raise TokcompError(f"RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers ({exc})") from None


def process_device(device: str, world: World) -> str:
    """``auto`` in a multi-process run on a GPU machine is this process's own GPU (one per process)."""
    import torch

    if device == "auto" and world.size > 1 and torch.cuda.is_available():
        return f"cuda:{world.local_rank % torch.cuda.device_count()}"
    return device


def init_process_group(world: World, device: str) -> None:
    """The torch.distributed group for this run: NCCL between GPUs, gloo on the CPU (once per process)."""
    import torch
    import torch.distributed as dist

    if world.size <= 1 or dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise TokcompError("a multi-process run needs MASTER_ADDR and MASTER_PORT (use --processes, or a launcher)")
    on_gpu = device.startswith("cuda") and torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend="nccl" if on_gpu else "gloo", rank=world.rank, world_size=world.size)
    atexit.register(_close_group)  # also on the way out of a failed run
    if not on_gpu:  # share the cores instead of every process taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.size))


def join_world(device: str) -> tuple[World, str]:
    """This process's world, its device (``auto`` resolved per process) and its process group, started."""
    world = current_world()
    device = process_device(device, world)
    init_process_group(world, device)
    return world, device


def leave_world(world: World) -> None:
    """This process's part of the run is done: wait for the others, then close the group (a process
    that exits with the group's threads still running aborts instead of exiting with its code)."""
    import torch.distributed as dist

    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _close_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def launch_if_sharded(argv: list[str], processes: int) -> int | None:
    """In the command a user typed with ``--processes N > 1``: run it in N workers and return their exit
    code; in a worker, or with one process, None (the command goes on in this process)."""
    if processes < 1:
        raise TokcompError("--processes must be at least 1")
    if processes > 1 and not os.environ.get(WORKER_ENV):
        return launch(argv, processes)
    return None


def gather_dicts(mine: dict, world: World) -> dict:
    """Every process's dict merged, on every process (keys are disjoint: each process has its documents)."""
    if world.size <= 1:
        return dict(mine)
    import torch.distributed as dist

    parts: list[dict | None] = [None] * world.size
    dist.all_gather_object(parts, mine)
    merged: dict = {}
    for part in parts:
        merged.update(part or {})
    return merged


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch(argv: list[str], processes: int) -> int:
    """Run ``tokcomp ARGV`` in ``processes`` local processes; rank 0 speaks, the others only when they fail.

    Returns the exit code: rank 0's, or the first failing one's.
    """
    port = str(_free_port())
    workers = []
    for rank in range(processes):
        env = os.environ | {
            "RANK": str(rank), "WORLD_SIZE": str(processes), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, WORKER_ENV: "1",
        }  # fmt: skip
        quiet = subprocess.DEVNULL if rank else None
        errors = subprocess.PIPE if rank else None
        command = [sys.executable, "-m", "tokcomp.cli", *argv]
        workers.append(subprocess.Popen(command, env=env, stdout=quiet, stderr=errors, text=True))
    return _wait(workers)


GRACE_SECONDS = 5.0  # how long rank 0 may take to end by itself after another worker failed


def _wait(workers: list[subprocess.Popen]) -> int:
    """Wait for every worker; when one fails, stop the others (they would wait for it forever)."""
    import time

    failed: subprocess.Popen | None = None
    while any(w.poll() is None for w in workers):
        failed = failed or next((w for w in workers if w.poll() not in (None, 0)), None)
        if failed is not None:
            if failed is not workers[0]:  # rank 0 meets the same bad input: let it say so itself
                # (past the grace it is waiting for the failed worker in a collective: it is stopped)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    workers[0].wait(timeout=GRACE_SECONDS)
            for worker in workers:
                if worker.poll() is None:
                    worker.terminate()
        time.sleep(0.2)
    main = workers[0]
    if main.returncode not in (0, -15):  # rank 0 failed by itself and has said why
        return main.returncode
    for worker in workers[1:]:
        if worker.returncode not in (0, -15):
            err = worker.stderr.read() if worker.stderr else ""
            lines = [line for line in err.splitlines() if line.strip()]
            print(lines[-1] if lines else f"error: a worker process exited with {worker.returncode}", file=sys.stderr)
            return worker.returncode if worker.returncode > 0 else 3
    return main.returncode
