"""The release's post-switch guard and retention: the stage's decisions, the trigger's real
`run()` loop over a real inference-log directory, and the operator's deferral.

The gateway fake applies the gateway's own routing rules (`serving.gateway.routing`:
RoutesUpdate.apply, switch, rollback) to an in-memory state, so `previous` behaves as the
real admin API makes it behave; Triton and the registry are in-memory. The branches that
depend on how the real gateway, Triton and MLflow behave (Triton lost the previous colour, a
first release's breach, no previous route, a `previous` changed since the release) run
against the real ones in tests/integration/test_post_switch_rollback.py; what stays here
needs a fault injected (a failed rollback) or a half-done earlier try.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from serving.gateway import routing
from tuneship import registry
from tuneship.inference_log import format_ts, parse_ts, partition_file
from tuneship.notify import read_sink
from tuneship.stages import Refusal, StageFailed, guard_release, release_windows, retire_previous


def route(colour: str, version: str) -> dict[str, Any]:
    return {"colour": colour, "model": f"llm_{colour}", "version": version}


class FakeGateway:
    """The admin API's semantics on an in-memory RoutingState."""

    def __init__(self, **slots: Any) -> None:
        self.state = routing.RoutingState(**slots)
        self.calls: list[str] = []
        self.fail_rollback = False

    def _set(self, new: routing.RoutingState) -> dict[str, Any]:
        self.state = new.model_copy(update={"generation": self.state.generation + 1})
        return self.routes()

    def routes(self) -> dict[str, Any]:
        return self.state.model_dump(mode="json")

    def put_routes(self, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append("put_routes")
        update = routing.RoutesUpdate.model_validate(body)
        assert update.generation in (None, self.state.generation), "stale PUT"
        return self._set(update.apply(self.state))

    def switch(self) -> dict[str, Any]:
        self.calls.append("switch")
        return self._set(routing.switch(self.state))

    def rollback(self) -> dict[str, Any]:
        self.calls.append("rollback")
        if self.fail_rollback:
            raise RuntimeError("HTTP 503 from /admin/rollback")
        return self._set(routing.rollback(self.state))


class FakeTriton:
    def __init__(self, *ready: str) -> None:
        self.ready = set(ready)
        self.calls: list[tuple[str, str]] = []

    def is_ready(self, model: str) -> bool:
        return model in self.ready

    def load(self, model: str, timeout: float = 180.0) -> None:
        self.calls.append(("load", model))
        self.ready.add(model)

    def unload(self, model: str) -> None:
        self.calls.append(("unload", model))
        self.ready.discard(model)

    def index(self) -> list[dict[str, Any]]:
        return [{"name": m, "state": "READY"} for m in sorted(self.ready)]


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test its own TUNESHIP_HOME: its own Slack sink and inference log."""
    monkeypatch.setenv("TUNESHIP_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def aliases(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An in-memory alias table behind the registry functions the stage calls."""
    table: dict[str, str] = {}
    tags: dict[str, dict[str, str]] = {}

    def by_alias(alias: str, name: str = ""):
        v = table.get(alias)
        return registry.ModelVersion(name, v, "run", "src", tags.get(v, {})) if v else None

    def set_alias(alias: str, version: str, name: str = "") -> None:
        table[alias] = str(version)

    def set_version_tags(version: str, new: dict[str, str], name: str = "") -> None:
        tags.setdefault(str(version), {}).update(new)

    def delete_alias(alias: str, name: str = "") -> None:
        table.pop(alias)

    monkeypatch.setattr(registry, "by_alias", by_alias)
    monkeypatch.setattr(registry, "set_alias", set_alias)
    monkeypatch.setattr(registry, "set_version_tags", set_version_tags)
    monkeypatch.setattr(registry, "delete_alias", delete_alias)
    table["_tags"] = tags  # type: ignore[assignment]
    return table


BASE = {"task": "llm", "registered_model": "tuneship-test"}
PLAN = {**BASE, "model": "llm_green", "version": "7", "colour": "green", "previous_version": "6", "previous_colour": "blue"}
FIRST = {**BASE, "model": "llm_blue", "version": "1", "colour": "blue", "previous_version": None, "previous_colour": None}
BREACH = {"verdict": "breach", "reasons": ["error rate 0.150 (3 of 20) > 0.01"], "requests": 20, "errors": 3,
          "error_rate": 0.15, "p95_ms": 40.0}


def switched() -> FakeGateway:
    """v6 live on blue, v7 candidate in shadow on green, then the switch (what `decide` does)."""
    gw = FakeGateway(live=route("blue", "6"), shadow=route("green", "7"))
    gw.switch()
    assert gw.routes()["previous"]["model"] == "llm_blue"
    return gw


def test_breach_rolls_back_to_the_previous_colour_and_champion_follows(aliases):
    gw, triton = switched(), FakeTriton("llm_blue", "llm_green")
    aliases["champion"] = "7"
    sent = len(read_sink())

    with pytest.raises(Refusal, match="v7 breached .*error rate 0.150.*rolled back"):
        guard_release(PLAN, BREACH, retention_minutes=60, gateway=gw, triton=triton)

    r = gw.routes()
    assert r["live"]["model"] == "llm_blue" and r["live"]["version"] == "6"
    assert r["previous"] is None and r["shadow"] is None  # the failed colour cannot come back by a second rollback
    assert aliases["champion"] == "6"
    assert "6" not in aliases["_tags"] and "error rate" in aliases["_tags"]["7"]["post_switch_breach"]
    assert triton.ready == {"llm_blue"} and triton.calls == [("unload", "llm_green")]
    (msg,) = read_sink()[sent:]
    assert msg["level"] == "error" and msg["fields"]["verdict"]["error_rate"] == 0.15
    assert "error rate 0.150" in msg["text"] and "20 requests" in msg["text"] and "blue v6 again" in msg["text"]
    assert "@champion: v6" in msg["text"]


def test_retry_after_the_rollback_does_not_move_traffic_again(aliases):
    gw, triton = switched(), FakeTriton("llm_blue", "llm_green")
    gw.rollback()  # the first attempt rolled back, then died before the alias and the clean-up
    aliases["champion"] = "7"
    before = list(gw.calls)
    with pytest.raises(Refusal, match="already off v7"):
        guard_release(PLAN, BREACH, retention_minutes=60, gateway=gw, triton=triton)
    assert gw.calls[len(before):] == ["put_routes"]  # only `previous` cleared
    assert gw.routes()["live"]["version"] == "6" and gw.routes()["previous"] is None
    assert aliases["champion"] == "6" and triton.ready == {"llm_blue"}


def test_failed_rollback_alerts_and_raises_for_a_retry(aliases):
    gw, triton = switched(), FakeTriton("llm_blue", "llm_green")
    gw.fail_rollback = True
    aliases["champion"] = "7"
    with pytest.raises(RuntimeError, match="HTTP 503"):
        guard_release(PLAN, BREACH, retention_minutes=60, gateway=gw, triton=triton)
    msg = read_sink()[-1]
    assert msg["level"] == "error" and "automatic rollback FAILED" in msg["text"]
    assert gw.routes()["live"]["version"] == "7" and aliases["champion"] == "7"


def test_healthy_and_insufficient_keep_the_release(aliases):
    gw, triton = switched(), FakeTriton("llm_blue", "llm_green")
    sent = len(read_sink())
    now = 1_800_000_000.0
    out = guard_release(PLAN, {"verdict": "healthy", "requests": 80}, retention_minutes=90, gateway=gw,
                        triton=triton, now=now)
    assert out["decision"] == "kept" and parse_ts(out["retain_until"]).timestamp() == now + 90 * 60
    assert len(read_sink()) == sent and gw.calls == ["switch"] and triton.calls == []
    few = {"verdict": "insufficient", "reasons": ["not enough traffic: only 3 live responses"], "requests": 3}
    out = guard_release(PLAN, few, retention_minutes=90, gateway=gw, triton=triton, now=now)
    assert out["decision"] == "kept"
    msg = read_sink()[-1]
    assert msg["level"] == "warning" and "could not judge" in msg["text"] and "only 3" in msg["text"]
    # a first release has nothing to retain
    out = guard_release(FIRST, {"verdict": "healthy"}, retention_minutes=90, gateway=gw, triton=triton, now=now)
    assert parse_ts(out["retain_until"]).timestamp() == now


def test_retire_previous_clears_and_unloads_only_what_it_replaced():
    gw, triton = switched(), FakeTriton("llm_blue", "llm_green")
    out = retire_previous(PLAN, gateway=gw, triton=triton)
    assert out == {"retired": "llm_blue", "version": "6", "cleared_previous": True, "unloaded": True}
    assert gw.routes()["previous"] is None and gw.routes()["live"]["version"] == "7"
    assert triton.ready == {"llm_green"}
    # rollback after that point: no longer instant, the admin API has nothing to go back to
    with pytest.raises(routing.InvalidTransition):
        gw.rollback()
    # a retry finds nothing left to do
    assert retire_previous(PLAN, gateway=gw, triton=triton)["unloaded"] is False

    rolled = switched()
    rolled.rollback()  # someone rolled back by hand during retention: blue is live again
    triton = FakeTriton("llm_blue", "llm_green")
    out = retire_previous(PLAN, gateway=rolled, triton=triton)
    assert out["retired"] is None and "live" in out["reason"] and triton.calls == []
    assert retire_previous(FIRST, gateway=rolled, triton=triton)["retired"] is None


def test_release_windows_params_and_overrides():
    params = {"shadow_hours": 72.0, "post_switch_minutes": 30.0, "retention_minutes": 120.0}
    assert release_windows(params) == {"shadow_hours": 72.0, "post_switch_minutes": 30.0, "retention_minutes": 120.0}
    # staging/demo: the shadow override caps every window at its own length
    short = release_windows(params, shadow_hours_override="0.01")
    assert short == {"shadow_hours": 0.01, "post_switch_minutes": pytest.approx(0.6), "retention_minutes": pytest.approx(0.6)}
    long = release_windows(params, shadow_hours_override="5")  # a cap never lengthens a window
    assert long["post_switch_minutes"] == 30.0 and long["retention_minutes"] == 120.0
    own = release_windows(params, shadow_hours_override="0.01", post_switch_minutes_override="2",
                          retention_minutes_override="0")
    assert own["post_switch_minutes"] == 2.0 and own["retention_minutes"] == 0.0
    assert release_windows(params, shadow_hours_override="")["shadow_hours"] == 72.0
    with pytest.raises(StageFailed, match="not a number"):
        release_windows(params, post_switch_minutes_override="ten")
    with pytest.raises(StageFailed, match="positive"):
        release_windows(params, post_switch_minutes_override="0")


# ---------------------------------------------------------------- trigger and operator


def write_log(root: Path, version: str, n: int, *, at: float, status: int = 200, latency: float = 15.0,
              served_model: str = "tuneship") -> None:
    for i in range(n):
        ts = parse_ts(at + i * 0.001)
        path = partition_file(root, ts, "gw0", served_model)
        path.parent.mkdir(parents=True, exist_ok=True)
        line = {"kind": "request", "ts": format_ts(ts), "request_id": f"{version}-{at}-{status}-{i}",
                "role": "live", "prompt": "Ticket: x\nTriage:", "shadow": None,
                "live": {"colour": "green", "version": version, "completion": " category=billing priority=low",
                         "latency_ms": latency, "status": status}}
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


async def first_event(trigger: Any, timeout: float = 10.0) -> dict:
    async def get() -> dict:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("trigger ended without an event")

    return await asyncio.wait_for(get(), timeout)


@pytest.fixture
def log_root(home: Path) -> Path:
    return home / "inference_log"


def guard_trigger(version: str, since: float, ends_at: float, **release: Any) -> Any:
    from tuneship.shadow import state_path
    from tuneship_airflow.triggers import PostSwitchWindowTrigger

    release = {"max_error_rate": 0.05, "max_p95_ms": 500.0, "min_requests": 20, **release}
    return PostSwitchWindowTrigger(served_model="tuneship", version=version, since=since, ends_at=ends_at,
                                   release=release, state_path=str(state_path("tuneship", "post-switch", version, since)),
                                   poll_interval=0.05)


def test_trigger_fires_early_on_a_breach(log_root: Path):
    switch = time.time() - 5
    write_log(log_root, "7", 10, at=switch + 1)
    write_log(log_root, "7", 30, at=switch + 2, status=502)  # 30 of 40
    write_log(log_root, "7", 40, at=switch - 60, status=502)  # before the switch: not counted
    write_log(log_root, "7", 40, at=switch + 1, status=502, served_model="faq")  # another task's v7: not counted
    trigger = guard_trigger("7", switch, switch + 3600)
    path, kwargs = trigger.serialize()
    assert path == "tuneship_airflow.triggers.PostSwitchWindowTrigger"
    assert type(trigger)(**kwargs).serialize() == (path, kwargs)
    event = asyncio.run(first_event(trigger))  # an hour before the window ends
    assert event["status"] == "breach" and event["verdict"]["verdict"] == "breach"
    assert (event["verdict"]["requests"], event["verdict"]["errors"]) == (40, 30)
    assert event["verdict"]["reasons"][0].startswith("error rate: lower bound")


def test_one_error_in_twenty_two_is_watched_not_rolled_back(log_root: Path):
    """Its point estimate (0.045) is over the 0.01 budget; its confidence sequence is not."""
    switch = time.time() - 5
    write_log(log_root, "7", 21, at=switch + 1)
    write_log(log_root, "7", 1, at=switch + 2, status=502)
    with pytest.raises(TimeoutError):
        asyncio.run(first_event(guard_trigger("7", switch, time.time() + 60, max_error_rate=0.01), timeout=0.5))


def test_trigger_completes_when_the_window_ends(log_root: Path):
    switch = time.time() - 5
    write_log(log_root, "7", 25, at=switch + 1)
    open_window = guard_trigger("7", switch, time.time() + 60)
    with pytest.raises(TimeoutError):  # healthy so far, window still open: keeps watching
        asyncio.run(first_event(open_window, timeout=0.5))
    ended = guard_trigger("7", switch + 0.001, time.time() + 0.3)
    event = asyncio.run(first_event(ended))
    assert event["status"] == "complete" and event["verdict"]["verdict"] == "healthy"
    assert event["at"] >= ended.ends_at
    quiet = guard_trigger("8", switch, switch + 1)
    assert asyncio.run(first_event(quiet))["verdict"]["verdict"] == "insufficient"


def test_operator_defers_on_the_switch_time_and_checks_the_event():
    from airflow.sdk.exceptions import TaskDeferred

    from tuneship_airflow.operators import PostSwitchWindowOperator

    op = PostSwitchWindowOperator(task_id="post_switch_window", served_model="tuneship", version="7", switched_at="1800000000.5",
                                  window_minutes="2", thresholds={"max_error_rate": "0.05", "max_p95_ms": "900",
                                                                  "min_requests": "10"})
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({})
    trig = deferred.value.trigger
    assert (trig.since, trig.ends_at) == (1800000000.5, 1800000000.5 + 120)
    assert {k: trig.release[k] for k in ("max_error_rate", "max_p95_ms", "min_requests")} == {
        "max_error_rate": 0.05, "max_p95_ms": 900.0, "min_requests": 10}
    assert trig.state_path.endswith("post-switch-v7-1800000000.500.json")  # a retry resumes the same watch
    assert deferred.value.method_name == "execute_complete"

    verdict = {"verdict": "breach", "reasons": ["error rate 0.2 > 0.05"], "requests": 10}
    out = op.execute_complete({}, {"status": "breach", "verdict": verdict, "at": 1800000030.0})
    assert out["verdict"] == "breach" and out["window_event"] == {"status": "breach", "at": 1800000030.0}
    for bad in (None, {"status": "error", "message": "boom"}, {"status": "complete"},
                {"status": "breach", "verdict": {"verdict": "healthy"}}):
        with pytest.raises(RuntimeError):
            op.execute_complete({}, bad)
    with pytest.raises(ValueError):
        PostSwitchWindowOperator(task_id="w", served_model="tuneship", version="7", window_minutes="0").execute({})
