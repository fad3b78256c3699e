"""The progressive canary on the real gateway, Triton and the triggerer's loop: a candidate
that passes every step ends at 100 % and is promoted; a slow one is caught at its first step
by the p95 bound, all traffic goes back to live at once, and the release is refused with one
alert while live stays where it was."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import pytest

from tuneship.gateway_admin import GatewayAdmin
from tuneship.notify import read_sink
from tuneship.shadow import state_path
from tuneship.stages import Refusal, canary_plan, canary_step, finish_release

pytestmark = pytest.mark.integration
NAME = "tuneship-canary-test"
RELEASE = {"strategy": "shadow_then_canary", "canary_steps": [50, 100], "canary_bake_minutes": 60.0,
           "max_error_rate": 0.01, "max_p95_ms": 500.0, "min_format_rate": 0.0, "min_requests": 5, "alpha": 0.05,
           "min_seconds": 0.0}


def route(colour: str, model: str, version: str) -> dict[str, Any]:
    return {"colour": colour, "model": model, "version": version, "registered_model": NAME}


@pytest.fixture
def stack(release_stack):
    gw, control, versions = release_stack(NAME)
    with GatewayAdmin(gw.url, gw.admin_token, served_model="tuneship") as admin:
        yield gw, admin, control, versions


class Clients:
    """Live traffic while the canary runs: requests one after another, colours counted."""

    def __init__(self, gw: Any) -> None:
        self.gw, self.colours, self._stop = gw, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.gw.client() as c:
            i = 0
            while not self._stop.is_set():
                sent = time.time()
                r = c.post("/v1/completions", json={"model": "tuneship", "prompt": f"Ticket: parcel {i}\nTriage:",
                                                    "max_tokens": 4})
                self.colours.append((r.status_code, r.headers.get("x-tuneship-colour"), sent))
                i += 1

    def __enter__(self) -> Clients:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(30)


async def first_event(trigger: Any) -> dict:
    async for event in trigger.run():
        return event.payload
    raise AssertionError("no event")


def run_canary(admin: GatewayAdmin, version: str, bake_s: float, timeout: float = 90.0) -> dict[str, Any]:
    """What CanaryOperator does, step by step, with the real trigger loop."""
    from tuneship_airflow.triggers import CanaryStepTrigger

    plan = canary_plan(RELEASE, slot="shadow", shadow_verdict={"verdict": "promote"}, shadow_hours=bake_s / 3600)
    assert plan["run"] and plan["bake_s"] == pytest.approx(bake_s)
    started, history, step = time.time(), [], 0
    admin.canary(plan["steps"][0])
    while True:
        trigger = CanaryStepTrigger(task_name="triage", served_model="tuneship", version=version, since=started,
                                    ends_at=time.time() + plan["bake_s"], release=RELEASE, poll_interval=0.2,
                                    state_path=str(state_path("tuneship", "canary", version, started)))

        event = asyncio.run(asyncio.wait_for(first_event(trigger), timeout))
        out = canary_step(admin, plan, step, event, history)
        if "next" not in out:
            return out
        step, history = out["next"], out["history"]


def test_a_good_canary_walks_every_step_and_is_promoted(stack):
    gw, admin, control, (v1, v2) = stack
    admin.put_routes({"live": route("blue", "llm_blue", v1), "shadow": route("green", "llm_green", v2)})
    with Clients(gw) as clients:
        verdict = run_canary(admin, v2, bake_s=3.0)
        assert admin.routes()["canary_weight"] == 100  # the last step: the candidate answers everything
    assert verdict["verdict"] == "promote", verdict
    assert [s["weight"] for s in verdict["canary"]["steps"]] == [50, 100]
    assert [s["status"] for s in verdict["canary"]["steps"]] == ["step_done", "step_done"]
    assert verdict["requests"] > 0 and verdict["errors"] == 0
    answered = {colour for status, colour, _ in clients.colours if status == 200}
    assert answered == {"blue", "green"}  # half and half, then green alone


def test_a_slow_canary_is_caught_at_its_first_step_and_traffic_goes_back_at_once(stack):
    gw, admin, control, (v1, v2) = stack
    admin.put_routes({"live": route("blue", "llm_blue", v1), "shadow": route("slow", "llm_slow", v2)})
    before = admin.routes()
    with Clients(gw) as clients:
        verdict = run_canary(admin, v2, bake_s=600.0)  # decided long before the step's bake ends
        weight_after, dropped_at = admin.routes()["canary_weight"], time.time()

        def after_breach() -> list[str]:
            return [colour for _, colour, sent in clients.colours if sent > dropped_at]

        deadline = time.time() + 60
        while len(after_breach()) < 5 and time.time() < deadline:  # a busy machine answers slowly
            time.sleep(0.2)
    after_breach = after_breach()
    assert verdict["verdict"] == "rollback" and weight_after == 0
    assert verdict["canary"]["breached_at_weight"] == 50 and len(verdict["canary"]["steps"]) == 1
    assert verdict["reasons"][0].startswith("canary step 1 of 2 (50 % of traffic): p95 latency (ms): lower bound")
    assert len(after_breach) >= 5 and set(after_breach) == {"blue"}  # every request sent since: live
    plan = {"task": "llm", "registered_model": NAME, "model": "llm_slow", "version": v2, "colour": "slow",
            "previous_version": v1, "previous_colour": "blue"}
    sent = len(read_sink())
    with pytest.raises(Refusal, match="p95 latency"):
        finish_release(plan, "shadow", verdict, gateway=admin, triton=control)
    routes = admin.routes()
    assert routes["live"] == before["live"] and routes["shadow"] is None
    (msg,) = read_sink()[sent:]
    assert msg["level"] == "error" and "rolled back after the canary" in msg["text"]
    assert not control.is_ready("llm_slow")
    r = httpx.post(f"{gw.url}/v1/completions", json={"model": "tuneship", "prompt": "Ticket: x\nTriage:",
                                                     "max_tokens": 4}, timeout=30)
    assert r.status_code == 200 and r.headers["x-tuneship-colour"] == "blue"
