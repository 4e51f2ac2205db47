"""Run the gateway under uvicorn (SIGINT/SIGTERM stop it cleanly)."""

from __future__ import annotations

import logging
import sys

import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.guard import guarded_protocol

log = logging.getLogger("corral.gateway")


def run(cfg: GatewayConfig) -> int:
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    if cfg.cluster_token_generated:
        # No token configured: one was made up. Workers need it to join; say it once.
        print(f"corral gateway: cluster token for joining workers: {cfg.cluster_token}\n"
              "  (set CORRAL_CLUSTER_TOKEN or cluster_token in the config file to choose it)",
              file=sys.stderr, flush=True)
    app = create_app(cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                timeout_graceful_shutdown=5, access_log=False,
                http=guarded_protocol(cfg.head_timeout))  # slow headers are cut off
    return 0
