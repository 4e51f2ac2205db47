"""Run the gateway under uvicorn (SIGINT/SIGTERM stop it cleanly)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.guard import guarded_protocol

log = logging.getLogger("corral.gateway")


def run(cfg: GatewayConfig) -> int:
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    if cfg.cluster_token_generated:
        # No token configured: one was made up. Workers need it to join. It goes to a file
        # only the owner can read, never to the console (consoles end up in logs).
        path = save_token(cfg.cluster_token)
        print(f"corral gateway: the cluster token for joining workers is in {path}\n"
              "  (set CORRAL_CLUSTER_TOKEN or cluster_token in the config file to choose it)",
              file=sys.stderr, flush=True)
    app = create_app(cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                timeout_graceful_shutdown=5, access_log=False,
                http=guarded_protocol(cfg.head_timeout))  # slow headers are cut off
    return 0


def save_token(token: str) -> Path:
    """Writes a generated cluster token to a file readable by its owner only."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    path = base / "corral" / "cluster-token"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return path
