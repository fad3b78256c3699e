"""Blue/green under load: a switch and a rollback drop nothing and never reach an unloaded model.

Issue 5 asks that a release can load a candidate, mirror to it, switch to it and switch back
while clients keep sending, without one failed request. Here a load generator keeps
`CONCURRENCY` asyncio clients (httpx, one keep-alive connection each) busy against a real
gateway process in front of the real tritonserver for the whole release:

    blue live -> load green (Triton model control, under load) -> green as shadow, mirrored
      -> smoke green (admin-pinned) -> switch (green live, blue retained)
      -> rollback (blue live, green retained) -> unload green -> blue alone

Each colour is its own copy of the echo model, loaded for this test, and the echo model
names itself in every completion, so each response says which Triton model wrote it. The
checks: every request got a 200; the `x-tuneship-colour` header names the colour whose
model wrote the text; requests that finished before a transition began were answered by
the old colour and requests sent after it returned by the new one; transitions happened
with requests in flight; no answer from green arrived after its unload was requested and
nothing was sent to it afterwards; the inference log holds one 200 record per request,
with the colour and model the client saw.

The second test loads a candidate whose `initialize()` raises: Triton refuses it and says
why, the gateway refuses to switch, canary or route live traffic to it, and the clients on
the live colour see no failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from gateway_helpers import metric, wait_for

from tuneship.inference_log import read_inference_log

ECHO_MODEL = Path(__file__).resolve().parents[1] / "fixtures" / "triton_models" / "echo_llm"

pytestmark = pytest.mark.integration

CONCURRENCY = 32
PHASE_S = 1.2  # each stretch of traffic between two transitions lasts at least this long...
PHASE_REQUESTS = 150  # ...and holds at least this many requests sent inside it
KINDS = ("completion", "chat", "completion", "stream")  # what a worker sends, in turn
ANSWERED_BY = re.compile(r"\[([A-Za-z0-9_.-]+)\]")

BROKEN_MODEL_PY = '''\
"""A candidate that cannot load: initialize() fails (as missing or corrupt weights would)."""


class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("candidate weights are missing (deliberately broken for the test)")

    def execute(self, requests):
        raise RuntimeError("never loaded")
'''


# -- the load generator --------------------------------------------------------------------------
@dataclass
class Outcome:
    kind: str
    start: float  # time.monotonic() when the request was sent...
    end: float  # ...and when its whole body had arrived
    status: int | None  # None: the request failed below HTTP (connect, reset, timeout)
    colour: str | None = None  # x-tuneship-colour
    role: str | None = None  # x-tuneship-route
    model: str | None = None  # the Triton model that wrote the completion
    rid: str | None = None
    error: str | None = None


def _answer_text(kind: str, r: httpx.Response) -> str:
    if kind == "stream":
        blocks = r.text.split("\n\n")
        if blocks[-1] != "" or blocks[-2] != "data: [DONE]":
            raise ValueError(f"stream did not end with [DONE]: {r.text[-200:]!r}")
        return "".join(json.loads(b.removeprefix("data: "))["choices"][0]["text"] for b in blocks[:-2])
    body = r.json()
    choice = body["choices"][0]
    return choice["message"]["content"] if kind == "chat" else choice["text"]


class LoadGenerator:
    """`concurrency` clients in a background event loop, each sending its next request as soon
    as the last one is answered, until `stop()`. Outcomes are appended as they complete."""

    def __init__(self, base_url: str, key: str, concurrency: int = CONCURRENCY) -> None:
        self.base_url = base_url
        self.key = key
        self.concurrency = concurrency
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._crash: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="load-generator", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by check()/stop() in the test thread
            self._crash = exc

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=30.0, limits=limits,
                                     headers={"Authorization": f"Bearer {self.key}"}) as client:
            await asyncio.gather(*(self._worker(client, i) for i in range(self.concurrency)))

    async def _worker(self, client: httpx.AsyncClient, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            kind = KINDS[(i + n) % len(KINDS)]
            prompt = f"Ticket: order {i}-{n} was charged twice\nTriage:"
            if kind == "chat":
                path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
            else:
                path, body = "/v1/completions", {"prompt": prompt, "stream": kind == "stream"}
            body.update(model="tuneship", max_tokens=8)
            n += 1
            start = time.monotonic()
            try:
                r = await client.post(path, json=body)
            except httpx.HTTPError as exc:
                self.outcomes.append(Outcome(kind, start, time.monotonic(), None, error=f"{type(exc).__name__}: {exc}"))
                continue
            o = Outcome(kind, start, time.monotonic(), r.status_code, r.headers.get("x-tuneship-colour"),
                        r.headers.get("x-tuneship-route"), rid=r.headers.get("x-request-id"))
            if r.status_code != 200:
                o.error = r.text[:300]
            else:
                try:
                    m = ANSWERED_BY.search(_answer_text(kind, r))
                    o.model = m.group(1) if m else None
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    o.error = f"unreadable answer ({type(exc).__name__}: {exc})"
            self.outcomes.append(o)

    def check(self) -> None:
        assert self._crash is None, f"the load generator crashed: {self._crash!r}"
        assert self._thread.is_alive(), "the load generator stopped"

    def __enter__(self) -> LoadGenerator:
        self._thread.start()
        self.phase()  # traffic is flowing before the test changes anything
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the load generator did not stop"
        assert self._crash is None, f"the load generator crashed: {self._crash!r}"
        return self.outcomes

    def phase(self, seconds: float = PHASE_S, requests: int = PHASE_REQUESTS, timeout: float = 30.0) -> None:
        """Let traffic flow for at least `seconds` and until `requests` sent from now on are done."""
        t0 = time.monotonic()
        while True:
            self.check()
            now = time.monotonic()
            done = sum(1 for o in self.outcomes[-4 * requests:] if o.start >= t0)
            if now - t0 >= seconds and done >= requests:
                return
            assert now - t0 < timeout, f"only {done} requests in {now - t0:.1f} s: the load stalled"
            time.sleep(0.05)


# -- helpers ---------------------------------------------------------------------------------------
def add_model(triton, name: str, model_py: str | None = None) -> str:
    """A copy of the echo model in Triton's repository (not loaded yet); `model_py` replaces its code."""
    dest = triton.server.repository / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(ECHO_MODEL, dest, ignore=shutil.ignore_patterns("__pycache__"))
    if model_py is not None:
        (dest / "1" / "model.py").write_text(model_py)
    return name


def model_ready(triton, name: str) -> bool:
    return httpx.get(f"http://{triton.url}/v2/models/{name}/ready", timeout=10).status_code == 200


def repository_state(triton, name: str) -> dict:
    r = httpx.post(f"http://{triton.url}/v2/repository/index", json={}, timeout=10)
    assert r.status_code == 200, r.text
    return next((m for m in r.json() if m["name"] == name), {})


def unload(triton, name: str) -> None:
    r = httpx.post(f"http://{triton.url}/v2/repository/models/{name}/unload", json={}, timeout=60)
    assert r.status_code == 200, r.text


def unload_quietly(triton, *names: str) -> None:
    """Teardown: the session's Triton keeps serving other tests; a failure here must not hide the test's."""
    for name in names:
        with contextlib.suppress(Exception):
            unload(triton, name)


def route(colour: str, model: str, version: str) -> dict:
    return {"colour": colour, "model": model, "version": version, "registered_model": "triage-llm"}


def admin(gw, method: str, path: str, **kw: object) -> httpx.Response:
    return httpx.request(method, f"{gw.url}{path}", headers=gw.admin, timeout=30, **kw)


def timed(fn, *args: object, **kw: object) -> tuple[object, float, float]:
    t0 = time.monotonic()
    out = fn(*args, **kw)
    return out, t0, time.monotonic()


def show(outcomes: list[Outcome], n: int = 5) -> str:
    return "\n".join(repr(o) for o in outcomes[:n])


def inference_metrics(gw) -> tuple[float, float]:
    """(requests answered 200 as live traffic, inference requests answered with anything else)."""
    name = "tuneship_gateway_requests_total"
    ok = metric(gw, name, status="200", role="live")
    not_ok = metric(gw, name) - metric(gw, name, status="200")
    return ok, not_ok


# -- the tests ---------------------------------------------------------------------------------------
def test_switch_and_rollback_under_load_drop_nothing(triton, start_gateway):
    blue, green = add_model(triton, "llm_swl_blue"), add_model(triton, "llm_swl_green")
    colour_model = {"blue": blue, "green": green}
    triton.load(blue)
    gw = start_gateway()
    _, key = gw.create_key("load", rpm=0)
    r = admin(gw, "PUT", "/admin/routes", json={"live": route("blue", blue, "1"), "shadow": None})
    assert r.status_code == 200, r.text
    t: dict[str, list[float]] = {}  # transition -> [monotonic time it began, time it returned]
    try:
        with LoadGenerator(gw.url, key) as load:
            # The candidate goes into the idle colour while live traffic flows.
            _, *t["load_green"] = timed(triton.load, green)
            assert model_ready(triton, green)
            r = admin(gw, "PUT", "/admin/routes", json={"live": route("blue", blue, "1"),
                                                        "shadow": route("green", green, "2"), "mirror_sample": 0.5})
            assert r.status_code == 200, r.text
            load.phase()
            smoke = httpx.post(f"{gw.url}/v1/completions", headers={**gw.admin, "X-Tuneship-Target": "green"},
                               timeout=30, json={"model": "tuneship", "prompt": "Ticket: smoke\nTriage:", "max_tokens": 8})
            assert smoke.status_code == 200 and f"[{green}]" in smoke.json()["choices"][0]["text"], smoke.text

            r, *t["switch"] = timed(admin, gw, "POST", "/admin/switch", params={"colour": "green"})
            assert r.status_code == 200, r.text
            assert (r.json()["live"]["colour"], r.json()["previous"]["colour"]) == ("green", "blue")
            load.phase()  # retention: blue stays loaded, so the rollback is instant
            assert model_ready(triton, blue)

            r, *t["rollback"] = timed(admin, gw, "POST", "/admin/rollback")
            assert r.status_code == 200, r.text
            assert (r.json()["live"]["colour"], r.json()["previous"]["colour"]) == ("blue", "green")
            # Retention for green, then it goes: once the copies mirrored to it while it was the
            # shadow have all been sent (the mirror queue lags on a busy machine), so none is cut off.
            assert wait_for(lambda: metric(gw, "tuneship_gateway_shadow_queue_depth") == 0, timeout=30)
            load.phase()

            _, *t["unload_green"] = timed(unload, triton, green)
            # Readiness drops when unloading starts; the index says UNAVAILABLE once it is gone.
            assert wait_for(lambda: repository_state(triton, green).get("state") == "UNAVAILABLE", timeout=30), \
                repository_state(triton, green)
            t_unloaded = time.monotonic()
            assert not model_ready(triton, green)
            load.phase()
            # Rolling back onto the unloaded colour is refused and changes nothing.
            gen = admin(gw, "GET", "/admin/routes").json()["generation"]
            r = admin(gw, "POST", "/admin/rollback")
            assert r.status_code == 409 and r.json()["error"]["code"] == "model_not_ready", r.text
            assert admin(gw, "GET", "/admin/routes").json()["generation"] == gen
            load.phase()
        outcomes = load.outcomes
        served, failed = inference_metrics(gw)  # the load has stopped: every request is counted
    finally:
        unload_quietly(triton, blue, green)

    # Zero failed requests, and every answer is self-consistent.
    failures = [o for o in outcomes if o.status != 200 or o.error]
    assert not failures, f"{len(failures)} of {len(outcomes)} requests failed:\n{show(failures)}\n{gw.logs()[-3000:]}"
    assert len(outcomes) >= 6 * PHASE_REQUESTS
    assert {o.kind for o in outcomes} == set(KINDS)
    wrong = [o for o in outcomes if o.role != "live" or colour_model.get(o.colour or "") != o.model]
    assert not wrong, f"header and answer disagree:\n{show(wrong)}"
    assert (served, failed) == (len(outcomes), 0)

    def answered(lo: float, hi: float) -> list[Outcome]:
        """Requests sent after `lo` and answered before `hi`."""
        return [o for o in outcomes if o.start > lo and o.end < hi]

    # Who answered, between the transitions (the boundaries are when the admin call began/returned).
    t_end = max(o.end for o in outcomes) + 1
    windows = [("before the switch", 0.0, t["switch"][0], {blue}),
               ("after the switch", t["switch"][1], t["rollback"][0], {green}),
               ("after the rollback", t["rollback"][1], t_end, {blue})]
    for what, lo, hi, expected in windows:
        got = answered(lo, hi)
        assert len(got) >= PHASE_REQUESTS, (what, len(got))
        assert {o.model for o in got} == expected, (what, {o.model for o in got})

    # The transitions happened under load: requests were in flight while each one ran.
    for what in ("load_green", "switch", "rollback", "unload_green"):
        t0, t1 = t[what]
        in_flight = [o for o in outcomes if o.start < t1 and o.end > t0]
        assert len(in_flight) >= CONCURRENCY // 2, (what, len(in_flight))

    # No request was answered by an unloaded model: green's last answer came before its unload
    # was asked for, nothing was sent to it after, and blue answered everything since.
    green_answers = [o for o in outcomes if o.model == green]
    assert green_answers and max(o.end for o in green_answers) < t["unload_green"][0]
    after_unload = [o for o in outcomes if o.start > t_unloaded]
    assert len(after_unload) >= PHASE_REQUESTS and {o.model for o in after_unload} == {blue}

    # The inference log: one 200 record per request, with the colour and model the client saw.
    gw.stop()  # flushes the log
    by_rid = {x["request_id"]: x for x in read_inference_log(gw.log_root)}
    assert len(by_rid) == len(outcomes)
    mismatched = [o for o in outcomes if o.rid not in by_rid or
                  (by_rid[o.rid]["live"]["status"], by_rid[o.rid]["live"]["colour"], by_rid[o.rid]["live"]["model"])
                  != (200, o.colour, o.model)]
    assert not mismatched, show(mismatched)
    # Mirrored copies (blue live, green shadow) reached green and it answered them all.
    shadows = [x["shadow"] for x in by_rid.values() if x["shadow"]]
    assert shadows and {s["colour"] for s in shadows} == {"green"}
    assert {s["status"] for s in shadows} <= {200, "dropped"} and any(s["status"] == 200 for s in shadows)


def test_candidate_that_fails_to_load_leaves_live_untouched_under_load(triton, start_gateway):
    blue = add_model(triton, "llm_fl_blue")
    broken = add_model(triton, "llm_fl_broken", BROKEN_MODEL_PY)
    triton.load(blue)
    gw = start_gateway()
    _, key = gw.create_key("load", rpm=0)
    live = route("blue", blue, "1")
    r = admin(gw, "PUT", "/admin/routes", json={"live": live, "shadow": None})
    assert r.status_code == 200, r.text
    try:
        with LoadGenerator(gw.url, key) as load:
            # Triton refuses the candidate, and says why.
            r = httpx.post(f"http://{triton.url}/v2/repository/models/{broken}/load", json={}, timeout=120)
            assert r.status_code == 400, r.text
            assert "deliberately broken" in r.text, r.text
            assert not model_ready(triton, broken)
            state = repository_state(triton, broken)
            assert state.get("state") == "UNAVAILABLE" and "deliberately broken" in state.get("reason", ""), state
            load.phase()

            # Even if a release went on and made it the shadow, it cannot take traffic.
            r = admin(gw, "PUT", "/admin/routes",
                      json={"live": live, "shadow": route("green", broken, "2"), "mirror_sample": 1.0})
            assert r.status_code == 200, r.text
            gen = r.json()["generation"]
            load.phase()
            refusals = {
                "switch": admin(gw, "POST", "/admin/switch", params={"colour": "green"}),
                "canary": admin(gw, "POST", "/admin/canary", json={"weight": 50}),
                "live": admin(gw, "PUT", "/admin/routes", json={"live": route("green", broken, "2")}),
            }
            for what, r in refusals.items():
                assert r.status_code == 409 and r.json()["error"]["code"] == "model_not_ready", (what, r.text)
            routes = admin(gw, "GET", "/admin/routes").json()
            assert routes["generation"] == gen and routes["live"]["model"] == blue and routes["canary_weight"] == 0
            load.phase()
        outcomes = load.outcomes
        served, failed = inference_metrics(gw)
        shadow_failed = metric(gw, "tuneship_gateway_shadow_failed_total", colour="green")
    finally:
        unload_quietly(triton, blue, broken)

    failures = [o for o in outcomes if o.status != 200 or o.error]
    assert not failures, f"{len(failures)} of {len(outcomes)} requests failed:\n{show(failures)}\n{gw.logs()[-3000:]}"
    assert len(outcomes) >= 3 * PHASE_REQUESTS
    assert {(o.colour, o.role, o.model) for o in outcomes} == {("blue", "live", blue)}
    assert (served, failed) == (len(outcomes), 0)
    assert shadow_failed > 0  # the copies mirrored to it failed, on the side, as they should
    assert httpx.get(f"{gw.url}/health/ready").json()["colour"] == "blue"
