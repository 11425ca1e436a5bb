"""KV migration at a step boundary: a request's blocks on its owner move, all layers at once, to
another instance, so the owner can admit more (a gManager decision).

Every rank takes part, in plan order: one all_gather tells each target the segments it receives
(start position and size), one all_to_all moves the K/V, then the target adopts the segments
(counted lent) and the owner frees its blocks and records the segments as borrowed. Segments are
updated in one go after the data has arrived, so a step never sees half a move.
"""

from __future__ import annotations

from typing import Protocol

import torch

from infinite_llm.comm import Cluster
from infinite_llm.kvcache.pool import KVPool
from infinite_llm.kvcache.rmanager import RManager
from infinite_llm.request import Request

Layout = tuple[tuple[int, int], ...]  # (start position, number of blocks) per segment


class Move(Protocol):
    """One migration as the gManager decides it (`cluster.gmanager.Migration`)."""

    @property
    def request_id(self) -> str: ...
    @property
    def source(self) -> int: ...
    @property
    def target(self) -> int: ...


def migrate(migrations: tuple[Move, ...], requests: dict[str, Request], rmanager: RManager,
            pool: KVPool, cluster: Cluster) -> None:
    me = cluster.rank
    outgoing = [m for m in migrations if m.source == me and m.request_id in requests]
    layouts: dict[str, Layout] = {
        m.request_id: tuple((s.start, s.num_blocks) for s in requests[m.request_id].segments
                            if s.instance == me)
        for m in outgoing
    }
    all_layouts: list[dict[str, Layout]] = cluster.all_gather(layouts)
    per_block = 2 * pool.k[:, 0].numel()  # K and V of one block, all layers

    send, send_counts = [], [0] * cluster.world_size
    for m in outgoing:
        blocks = [b for s in requests[m.request_id].segments if s.instance == me for b in s.blocks]
        index = torch.tensor(blocks, dtype=torch.long, device=pool.k.device)
        send += [pool.k[:, index].flatten(), pool.v[:, index].flatten()]
        send_counts[m.target] += len(blocks) * per_block
    incoming = [(m, all_layouts[m.source].get(m.request_id, ()))
                for source in range(cluster.world_size)
                for m in migrations if m.source == source and m.target == me]
    recv_counts = [0] * cluster.world_size
    for m, layout in incoming:
        recv_counts[m.source] += sum(n for _, n in layout) * per_block
    data = cluster.all_to_all(torch.cat([pool.k.new_empty(0), *send]), send_counts, recv_counts)

    offset = 0
    for m, layout in incoming:
        blocks = [b for start, n in layout
                  for b in rmanager.adopt(m.source, m.request_id, start, n)]
        n = len(blocks) * per_block // 2
        index = torch.tensor(blocks, dtype=torch.long, device=pool.k.device)
        shape = (pool.k.shape[0], len(blocks), *pool.k.shape[2:])
        pool.k[:, index] = data[offset : offset + n].view(shape)
        pool.v[:, index] = data[offset + n : offset + 2 * n].view(shape)
        offset += 2 * n
    for m in outgoing:
        rmanager.migrate_out(requests[m.request_id], m.target)
