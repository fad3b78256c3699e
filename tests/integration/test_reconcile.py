"""Reconciliation against the real Triton: after a crash, Triton's colour models are made to
match the gateway's routing state (load what is routed to, unload colours nothing uses)."""

from __future__ import annotations

import pytest

from tuneship.stages import reconcile_serving
from tuneship.triton_control import TritonControl


@pytest.fixture
def control(triton, monkeypatch):
    monkeypatch.setenv("TUNESHIP_TRITON_REPOSITORY", str(triton.server.repository))
    ctl = TritonControl(triton.url)
    yield ctl
    for model in ("llm_blue", "llm_green"):  # leave the session's Triton as other tests expect
        if not ctl.is_ready(model):
            ctl.load(model)


def test_reconcile_loads_routed_and_unloads_orphaned_colours(control):
    control.unload("llm_blue")  # e.g. Triton restarted: explicit mode comes back empty
    assert not control.is_ready("llm_blue") and control.is_ready("llm_green")
    routes = {"live": {"colour": "blue", "model": "llm_blue"}, "shadow": None, "previous": None}

    done = reconcile_serving(routes, control)

    assert done == {"loaded": ["llm_blue"], "unloaded": ["llm_green"]}
    assert control.is_ready("llm_blue") and not control.is_ready("llm_green")
    assert control.is_ready("llm_slow")  # not a colour model: never touched
    # already consistent: nothing to do
    assert reconcile_serving(routes, control) == {"loaded": [], "unloaded": []}
