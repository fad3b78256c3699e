"""The post-switch guard and the retention window against the real gateway, Triton and MLflow.

A real gateway process (its own home, which is also this test's TUNESHIP_HOME, so the
inference log it writes is the one the trigger reads, and MLflow's embedded store lives
beside it) in front of the session's tritonserver: v1 live on blue, the candidate v2 on
`llm_slow` (the echo model with a 1 s delay) goes through the real admin API's switch,
clients send requests through the gateway, the real trigger loop judges the log, and the
stage rolls back through the admin API. The second test retires the previous colour after
a clean window and checks that rollback and reconciliation agree with it afterwards. The
rest run the guard's other branches against the same real components: Triton lost the
previous colour, a first release's breach, no previous route, and a `previous` that changed
since the release.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from gateway_helpers import wait_for

from tuneship import registry
from tuneship.inference_log import read_inference_log
from tuneship.notify import read_sink
from tuneship.stages import Refusal, guard_release, reconcile_serving, retire_previous
from tuneship.tasks import load_task

NAME = "tuneship-guard-test"  # the registered model of these tests
# The triage task under the name the session's echo models carry (llm_blue, llm_green).
LLM = load_task("triage").model_copy(update={"name": "llm", "registered_model": NAME})

pytestmark = pytest.mark.integration


class Admin:
    """The gateway's admin API over HTTP (what the Airflow GatewayHook sends)."""

    def __init__(self, gw: Any) -> None:
        self.client = httpx.Client(base_url=gw.url, headers=gw.admin, timeout=30)

    def _ok(self, r: httpx.Response) -> dict[str, Any]:
        r.raise_for_status()
        return r.json()

    def routes(self) -> dict[str, Any]:
        return self._ok(self.client.get("/admin/routes"))

    def put_routes(self, routes: dict[str, Any]) -> dict[str, Any]:
        return self._ok(self.client.put("/admin/routes", json=routes))

    def switch(self) -> dict[str, Any]:
        return self._ok(self.client.post("/admin/switch"))

    def rollback(self) -> dict[str, Any]:
        return self._ok(self.client.post("/admin/rollback"))


def route(colour: str, model: str, version: str) -> dict[str, Any]:
    return {"colour": colour, "model": model, "version": version, "registered_model": NAME}


@pytest.fixture
def stack(release_stack):
    gw, control, versions = release_stack(NAME)
    return gw, Admin(gw), control, versions


def _send(gw: Any, n: int) -> list[httpx.Response]:
    with gw.client() as c:
        return [c.post("/v1/completions", json={"model": "tuneship", "prompt": f"Ticket: slow {i}\nTriage:",
                                                "max_tokens": 4}) for i in range(n)]


def test_breach_after_switch_rolls_back_through_the_real_gateway(stack):
    from tuneship.shadow import state_path
    from tuneship_airflow.operators import PostSwitchWindowOperator
    from tuneship_airflow.triggers import PostSwitchWindowTrigger

    gw, admin, control, (v1, v2) = stack
    admin.put_routes({"live": route("blue", "llm_blue", v1)})
    admin.put_routes({**admin.routes(), "shadow": route("slow", "llm_slow", v2)})
    switched_at = time.time()
    routes = admin.switch()  # what `decide` does on promote
    registry.set_alias("champion", v2, NAME)
    assert routes["live"]["model"] == "llm_slow" and routes["previous"]["model"] == "llm_blue"

    # about 1 s each: p95 far above the 500 ms budget; 11 answers are the fewest whose p95
    # confidence sequence (Howard-Ramdas, alpha 0.025 per metric) has a lower bound at all
    answers = _send(gw, 12)
    assert all(r.status_code == 200 and r.headers["x-tuneship-colour"] == "slow" for r in answers)
    assert wait_for(lambda: len(read_inference_log(gw.log_root, since=switched_at)) >= 12)

    trigger = PostSwitchWindowTrigger(
        served_model="tuneship", version=v2, since=switched_at, ends_at=switched_at + 3600, poll_interval=0.1,
        release={"max_error_rate": 0.01, "max_p95_ms": 500, "min_requests": 5},
        state_path=str(state_path("tuneship", "post-switch", v2, switched_at)))

    async def first_event() -> dict:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("no event")

    event = asyncio.run(asyncio.wait_for(first_event(), 30))  # long before the hour is up
    assert event["status"] == "breach", event
    op = PostSwitchWindowOperator(task_id="post_switch_window", served_model="tuneship", version=v2, switched_at=switched_at,
                                  window_minutes=60)
    verdict = op.execute_complete({}, event)
    assert verdict["requests"] == 12 and verdict["p95_ms"] > 500 and verdict["errors"] == 0

    plan = {"task": "llm", "registered_model": NAME, "model": "llm_slow", "version": v2, "colour": "slow", "previous_version": v1, "previous_colour": "blue"}
    sent = len(read_sink())
    with pytest.raises(Refusal, match="p95 latency"):
        guard_release(plan, verdict, retention_minutes=60, gateway=admin, triton=control)

    routes = admin.routes()
    assert (routes["live"]["model"], routes["live"]["version"]) == ("llm_blue", v1)
    assert routes["previous"] is None and routes["shadow"] is None
    assert registry.by_alias("champion", NAME).version == v1
    assert registry.get_version(v2, NAME).tags["post_switch_breach"].startswith("p95 latency")
    assert not control.is_ready("llm_slow") and control.is_ready("llm_blue")
    (msg,) = read_sink()[sent:]
    assert msg["level"] == "error" and "p95 latency" in msg["text"] and "12 requests" in msg["text"]
    after = _send(gw, 1)[0]
    assert after.status_code == 200 and after.headers["x-tuneship-colour"] == "blue"
    # nothing to roll back to any more: the failed version cannot come back by accident
    assert admin.client.post("/admin/rollback").status_code == 409


def test_retention_retires_the_previous_colour_and_reconcile_agrees(stack):
    gw, admin, control, (v1, v2) = stack
    admin.put_routes({"live": route("blue", "llm_blue", v1)})
    admin.put_routes({**admin.routes(), "shadow": route("green", "llm_green", v2)})
    admin.switch()
    plan = {"task": "llm", "registered_model": NAME, "model": "llm_green", "version": v2, "colour": "green", "previous_version": v1, "previous_colour": "blue"}

    out = retire_previous(plan, gateway=admin, triton=control)

    assert out["retired"] == "llm_blue" and out["unloaded"] is True
    routes = admin.routes()
    assert routes["previous"] is None and routes["live"]["model"] == "llm_green"
    assert not control.is_ready("llm_blue") and control.is_ready("llm_green")
    assert admin.client.post("/admin/rollback").status_code == 409  # no longer instant: nothing to go back to
    assert _send(gw, 1)[0].headers["x-tuneship-colour"] == "green"
    # reconciliation loads what the routes name: it does not bring the retired colour back
    assert reconcile_serving(LLM, routes, control) == {"loaded": [], "unloaded": []}
    assert not control.is_ready("llm_blue")


BREACH = {"verdict": "breach", "reasons": ["error rate 0.150 (3 of 20) > 0.01"], "requests": 20, "errors": 3,
          "error_rate": 0.15, "p95_ms": 40.0}


def _switched(admin: Admin, v1: str, v2: str) -> dict[str, Any]:
    """v1 live on blue, v2 in shadow on green, then the switch and @champion (what `decide` does)."""
    admin.put_routes({"live": route("blue", "llm_blue", v1)})
    admin.put_routes({**admin.routes(), "shadow": route("green", "llm_green", v2)})
    routes = admin.switch()
    registry.set_alias("champion", v2, NAME)
    return routes


def test_breach_loads_the_previous_colour_first_when_triton_lost_it(stack):
    """Triton restarted (or someone unloaded it) during the window: the real gateway refuses a
    rollback to an unready colour, so the guard loads it first, then rolls back."""
    gw, admin, control, (v1, v2) = stack
    _switched(admin, v1, v2)
    control.unload("llm_blue")
    assert admin.client.post("/admin/rollback").status_code != 200  # the gateway will not route to it
    plan = {"task": "llm", "registered_model": NAME, "model": "llm_green", "version": v2, "colour": "green", "previous_version": v1, "previous_colour": "blue"}
    sent = len(read_sink())

    with pytest.raises(Refusal, match=f"v{v2} breached .*rolled back"):
        guard_release(plan, BREACH, retention_minutes=60, gateway=admin, triton=control)

    routes = admin.routes()
    assert (routes["live"]["model"], routes["live"]["version"]) == ("llm_blue", v1) and routes["previous"] is None
    assert control.is_ready("llm_blue") and not control.is_ready("llm_green")
    assert registry.by_alias("champion", NAME).version == v1
    (msg,) = read_sink()[sent:]
    assert msg["level"] == "error" and f"blue v{v1} again" in msg["text"]
    assert _send(gw, 1)[0].headers["x-tuneship-colour"] == "blue"


def test_first_release_breach_takes_the_route_down_and_removes_champion(stack):
    gw, admin, control, (v1, _) = stack
    admin.put_routes({"live": route("blue", "llm_blue", v1)})
    registry.set_alias("champion", v1, NAME)
    plan = {"task": "llm", "registered_model": NAME, "model": "llm_blue", "version": v1, "colour": "blue", "previous_version": None, "previous_colour": None}
    sent = len(read_sink())

    with pytest.raises(Refusal, match="first release.*taken down"):
        guard_release(plan, BREACH, retention_minutes=60, gateway=admin, triton=control)

    routes = admin.routes()
    assert routes["live"] is None and routes["shadow"] is None and routes["previous"] is None
    assert registry.by_alias("champion", NAME) is None
    assert not control.is_ready("llm_blue")
    (msg,) = read_sink()[sent:]
    assert msg["level"] == "error" and "@champion: none" in msg["text"]
    answer = _send(gw, 1)[0]  # back to before the release: no model serves
    assert answer.status_code == 503 and "live" in answer.text


def test_breach_without_a_previous_route_leaves_traffic_and_says_so(stack):
    gw, admin, control, (v1, v2) = stack
    _switched(admin, v1, v2)
    admin.put_routes({**admin.routes(), "previous": None})  # cleared by hand during the window
    plan = {"task": "llm", "registered_model": NAME, "model": "llm_green", "version": v2, "colour": "green", "previous_version": v1, "previous_colour": "blue"}
    sent = len(read_sink())

    with pytest.raises(Refusal, match="NOT rolled back"):
        guard_release(plan, BREACH, retention_minutes=60, gateway=admin, triton=control)

    routes = admin.routes()
    assert (routes["live"]["model"], routes["live"]["version"]) == ("llm_green", v2)
    assert registry.by_alias("champion", NAME).version == v2
    assert control.is_ready("llm_green") and control.is_ready("llm_blue")
    (msg,) = read_sink()[sent:]
    assert msg["level"] == "error" and "by hand" in msg["text"]
    assert _send(gw, 1)[0].headers["x-tuneship-colour"] == "green"


def test_retention_leaves_a_previous_that_changed_since_the_release(stack):
    """Someone rolled back and forward again (or released by hand) during the retention
    window: `previous` now names another version on blue, so it is neither cleared nor
    unloaded."""
    gw, admin, control, (v1, v2) = stack
    _switched(admin, v1, v2)
    admin.put_routes({**admin.routes(), "previous": route("blue", "llm_blue", "999")})
    plan = {"task": "llm", "registered_model": NAME, "model": "llm_green", "version": v2, "colour": "green", "previous_version": v1, "previous_colour": "blue"}

    out = retire_previous(plan, gateway=admin, triton=control)

    assert out["retired"] is None and "previous" in out["reason"]
    routes = admin.routes()
    assert routes["previous"]["version"] == "999" and routes["live"]["model"] == "llm_green"
    assert control.is_ready("llm_blue") and control.is_ready("llm_green")
    assert admin.rollback()["live"]["model"] == "llm_blue"  # still an instant rollback
