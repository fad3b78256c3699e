"""Stopping services: a service this process started is its child, and once it exits it is a
zombie until reaped; `stop` must see it gone at once, not wait out its 30 s deadline."""

from __future__ import annotations

import os
import subprocess
import time

from tuneship import services


def test_an_exited_child_is_gone_at_once_though_nobody_reaped_it():
    proc = subprocess.Popen(["sleep", "60"])
    assert services._alive(proc.pid)
    proc.terminate()  # exits; a zombie until waited for (still answers kill(pid, 0))
    deadline = time.monotonic() + 5
    while services._alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not services._alive(proc.pid)


def test_a_process_that_is_not_our_child_is_alive_while_it_runs():
    assert services._alive(os.getppid())
