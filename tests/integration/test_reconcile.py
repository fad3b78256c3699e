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


def test_warm_up_runs_the_smoke_prompts_and_a_failing_model_stops_the_release(control, tmp_path, monkeypatch):
    """Warm-up goes straight to the loaded colour through Triton's generate endpoint, for
    ordinary and decoupled models alike; a model that fails it fails the load, with a
    message naming the model and Triton's error, and Slack is told."""
    from tuneship import notify
    from tuneship.evaluate import load_cases, load_suite
    from tuneship.stages import StageFailed, warm_up_candidate

    monkeypatch.setenv("TUNESHIP_HOME", str(tmp_path))
    n = len(load_cases(load_suite("smoke")))
    for model in ("llm_blue", "llm_stream"):  # llm_stream is decoupled, like the compiled model
        done = warm_up_candidate(model, control)
        assert done["model"] == model and done["requests"] == n == len(done["latency_ms"])

    with pytest.raises(RuntimeError, match=r"warm-up request 1/1 to llm_green failed: HTTP 400 .*failure requested"):
        control.warm_up("llm_green", ["__fail__ Ticket: x"])
    with pytest.raises(StageFailed, match="llm_nope"):
        warm_up_candidate("llm_nope", control)
    assert "llm_nope failed its warm-up" in notify.read_sink()[-1]["text"]
