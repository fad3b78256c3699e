"""Reconciliation against the real Triton: after a crash, Triton's colour models are made to
match the gateway's routing state (load what is routed to, unload colours nothing uses)."""

from __future__ import annotations

import pytest

from tuneship.stages import reconcile_serving
from tuneship.tasks import load_task
from tuneship.triton_control import TritonControl

# The triage task under the name the session's echo models carry (llm_blue, llm_green).
LLM = load_task("triage").model_copy(update={"name": "llm"})


@pytest.fixture
def control(triton, monkeypatch):
    monkeypatch.setenv("TUNESHIP_TRITON_REPOSITORY", str(triton.server.repository))
    ctl = TritonControl(triton.url)
    yield ctl
    for model in ("llm_blue", "llm_green"):  # leave the session's Triton as other tests expect
        if not ctl.is_ready(model):
            ctl.load(model)


def test_reconcile_loads_routed_and_unloads_orphaned_colours(control, triton):
    triton.add_echo_model("faq_green")  # another task's colour: never touched
    control.unload("llm_blue")  # e.g. Triton restarted: explicit mode comes back empty
    assert not control.is_ready("llm_blue") and control.is_ready("llm_green")
    routes = {"live": {"colour": "blue", "model": "llm_blue"}, "shadow": None, "previous": None}

    done = reconcile_serving(LLM, routes, control)

    assert done == {"loaded": ["llm_blue"], "unloaded": ["llm_green"]}
    assert control.is_ready("llm_blue") and not control.is_ready("llm_green")
    assert control.is_ready("llm_slow")  # not a colour model: never touched
    assert control.is_ready("faq_green")  # another task's colour, routed by its own routes
    # already consistent: nothing to do
    assert reconcile_serving(LLM, routes, control) == {"loaded": [], "unloaded": []}


def test_warm_up_runs_the_smoke_prompts_and_a_failing_model_stops_the_release(control, tmp_path, monkeypatch):
    """Warm-up goes straight to the loaded colour through Triton's generate endpoint, for
    ordinary and decoupled models alike; a model that fails it fails the load, with a
    message naming the model and Triton's error, and Slack is told."""
    from tuneship import notify
    from tuneship.evaluate import load_cases, load_suite
    from tuneship.stages import StageFailed, warm_up_candidate

    monkeypatch.setenv("TUNESHIP_HOME", str(tmp_path))
    n = len(load_cases(load_suite("triage-smoke")))
    for model in ("llm_blue", "llm_stream"):  # llm_stream is decoupled, like the compiled model
        done = warm_up_candidate(LLM, model, control)
        assert done["model"] == model and done["requests"] == n == len(done["latency_ms"])

    with pytest.raises(RuntimeError, match=r"warm-up request 1/1 to llm_green failed: HTTP 400 .*failure requested"):
        control.warm_up("llm_green", ["__fail__ Ticket: x"])
    with pytest.raises(StageFailed, match="llm_nope"):
        warm_up_candidate(LLM, "llm_nope", control)
    assert "llm_nope failed its warm-up" in notify.read_sink()[-1]["text"]
