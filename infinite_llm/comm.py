"""Process groups of the cluster and the collectives the step protocol uses.

Ranks are instances. Control messages (typed dataclasses) travel as pickled objects over a gloo
group; tensors travel over the data group (`ClusterConfig.data_backend`: NCCL on GPU, gloo on
CPU). On one machine the driver
starts the other ranks itself; under `torchrun` every rank is started by torchrun.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class WorkerError(RuntimeError):
    """A worker process died or stopped answering."""


@dataclass(slots=True)
class Cluster:
    rank: int
    world_size: int
    control: Any  # gloo ProcessGroup for objects
    data: Any  # ProcessGroup for tensors

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's object, on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's object on rank 0 (None elsewhere)."""
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.control)
        return out

    def all_to_all(self, send: torch.Tensor, send_counts: list[int],
                   recv_counts: list[int]) -> torch.Tensor:
        """Uneven exchange of a flat buffer: send[sum(send_counts[:j]):...] goes to rank j."""
        recv = send.new_empty(sum(recv_counts))
        dist.all_to_all_single(recv, send, recv_counts, send_counts, group=self.data)
        return recv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device: torch.device, rank: int) -> torch.device:
    """The device of this rank: "cuda" without an index means this machine's GPU number
    LOCAL_RANK (set by torchrun and by `spawn_workers`), wrapping around when ranks outnumber
    GPUs (several instances on one GPU)."""
    if device.type != "cuda" or device.index is not None:
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_cluster(rank: int, world_size: int, device: torch.device, timeout_s: float,
                 backend: str) -> Cluster:
    """Join the job described by MASTER_ADDR / MASTER_PORT (set by us or by torchrun), with
    `backend` for the tensors."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(rank_device(device, rank))
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    return Cluster(rank, world_size, control or dist.group.WORLD, dist.group.WORLD)


def spawn_workers(world_size: int, config: Any) -> list[subprocess.Popen]:
    """Start ranks 1..N-1 as `python -m infinite_llm.cluster` on this machine, on a free
    port of 127.0.0.1."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    payload = json.dumps({"config": config.options()})
    procs = []
    for rank in range(1, world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   INFINITE_LLM_WORKER=payload)
        procs.append(subprocess.Popen([sys.executable, "-m", "infinite_llm.cluster"],
                                      env=env))
    return procs
