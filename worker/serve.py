"""Run one worker under uvicorn (SIGINT/SIGTERM stop it cleanly, leaving its gateway)."""

from __future__ import annotations

import logging

import uvicorn

from worker.app import create_app
from worker.config import WorkerConfig


def run(cfg: WorkerConfig) -> int:
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    app = create_app(cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                timeout_graceful_shutdown=5, access_log=False)
    return 0
