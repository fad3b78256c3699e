"""Free loopback ports for the services tests start next to a running demo (one home)."""

from __future__ import annotations

import socket

_GIVEN: set[int] = set()


def free_port() -> int:
    """A port free now and never handed out before in this process: the kernel may hand the
    same ephemeral port to two binds in a row once the first socket is closed (a Triton given
    one port for HTTP and gRPC exits: 'cannot listen ... at the same address and port')."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port
