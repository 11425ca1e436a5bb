"""Entry point of a worker rank spawned by the driver: `python -m infinite_llm.cluster`, with the
engine config in $INFINITE_LLM_WORKER and the rank in $RANK / $WORLD_SIZE."""

from __future__ import annotations

import json
import logging
import os

from infinite_llm.cluster.driver import serve_worker
from infinite_llm.config import EngineConfig

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    payload = json.loads(os.environ["INFINITE_LLM_WORKER"])
    serve_worker(EngineConfig.from_options(**payload["config"]), int(os.environ["RANK"]),
                 int(os.environ["WORLD_SIZE"]))
