"""A worker rank: joins the cluster, builds its instance and follows rank 0's plans until told
to stop. Started by the driver (`python -m infinite_llm.cluster`) or, under torchrun, by
`LLM(...)` itself on ranks other than 0."""

from __future__ import annotations

import torch.distributed as dist

from infinite_llm.comm import init_cluster
from infinite_llm.worker.instance import build_instance
from infinite_llm.config import EngineConfig


def serve_worker(config: EngineConfig, rank: int, world_size: int) -> None:
    cluster = init_cluster(rank, world_size, config.torch_device, config.worker_timeout_s,
                           config.torch_data_backend)
    try:
        instance = build_instance(config, rank, cluster)
        cluster.gather(instance.heartbeat())
        while True:
            plan = cluster.broadcast(None)
            if plan.shutdown:
                break
            cluster.gather(instance.run(plan))
    finally:
        dist.destroy_process_group()
