"""The gateway's admin credential, shared by the gateway and the Airflow hook that drives it.

Source, in order: env TUNESHIP_GATEWAY_ADMIN_TOKEN; else a random token created once (by
whichever process gets there first: O_CREAT|O_EXCL, mode 0600) at home/gateway/admin_token.
No web framework here, so the Airflow layer reads it without importing the gateway.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from tuneship import config


def token_path() -> Path:
    return config.home() / "gateway" / "admin_token"


def load_or_create_token(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # Another replica is creating it: wait for it to be written.
        for _ in range(50):
            existing = path.read_text().strip()
            if existing:
                return existing
            time.sleep(0.02)
        raise RuntimeError(f"admin token file {path} exists but is empty") from None
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def admin_token() -> str:
    return os.environ.get("TUNESHIP_GATEWAY_ADMIN_TOKEN") or load_or_create_token(token_path())
