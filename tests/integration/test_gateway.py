"""The inference gateway against the real tritonserver, over real sockets.

Each test gets fresh gateway process(es) with a fresh TUNESHIP_HOME (routes, admin token,
inference log); the Triton server (llm_blue, llm_green, llm_slow, llm_gated) is shared by the session.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import time
from pathlib import Path

import httpx
import openai
import pytest
from gateway_helpers import metric, wait_for

from tuneship.inference_log import read_inference_log

pytestmark = pytest.mark.integration

PROMPT = "Ticket: I was charged twice for my order\nTriage:"


def route(colour: str, model: str | None = None, version: str = "1", **extra: object) -> dict:
    return {
        "colour": colour,
        "model": model or f"llm_{colour}",
        "version": version,
        "registered_model": "triage-llm",
        "adapter_sha256": f"sha-{colour}-{version}",
        "deployed_at": "2025-01-02T03:04:05+00:00",
        **extra,
    }


def put_routes(gw, live: dict | None, shadow: dict | None = None, **kw: object) -> dict:
    params = {"force": "true"} if kw.pop("force", False) else None
    r = httpx.put(f"{gw.url}/admin/routes", headers=gw.admin, params=params,
                  json={"live": live, "shadow": shadow, **kw}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def complete(gw, prompt: str = PROMPT, **kw: object) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/completions", json={"model": "tuneship", "prompt": prompt, **kw}, timeout=30)


def answered_by(gw) -> str:
    r = complete(gw)
    assert r.status_code == 200, r.text
    m = re.search(r"\[(llm_\w+)\]", r.json()["choices"][0]["text"])
    assert m, r.json()
    return m.group(1)


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


# -- health, version, models -------------------------------------------------------------------
def test_ready_and_version_follow_the_live_route(gateway):
    assert httpx.get(f"{gateway.url}/health/live").status_code == 200
    r = httpx.get(f"{gateway.url}/health/ready")
    assert r.status_code == 503 and r.json()["reason"] == "no live route"
    v = httpx.get(f"{gateway.url}/version").json()
    assert v["colour"] is None and v["version"] is None
    assert httpx.get(f"{gateway.url}/v1/models").json() == {"object": "list", "data": []}
    # No routes at all: the model does not exist (yet), and the 404 says nothing is served.
    err = assert_openai_error(complete(gateway), 404, "model_not_found")
    assert "No model is served yet" in err["message"]
    # Routes without a live colour (a first release's candidate in shadow): 503, not 404.
    put_routes(gateway, None, route("green"))
    assert_openai_error(complete(gateway), 503, "no_live_route")
    r = httpx.get(f"{gateway.url}/health/ready")
    assert r.status_code == 503 and r.json()["models"]["tuneship"]["status"] == "no_live_route"

    # A live route on a model Triton has not loaded is refused unless forced...
    r = httpx.put(f"{gateway.url}/admin/routes", headers=gateway.admin,
                  json={"live": route("red", "llm_missing")})
    assert_openai_error(r, 409, "model_not_ready")
    # ...and when forced, readiness still says no.
    put_routes(gateway, route("red", "llm_missing"), force=True)
    r = httpx.get(f"{gateway.url}/health/ready")
    assert r.status_code == 503 and "not ready" in r.json()["reason"]
    assert_openai_error(complete(gateway), 503, "model_unavailable")

    state = put_routes(gateway, route("blue", version="7"))
    assert state["live"]["colour"] == "blue" and state["previous"]["colour"] == "red"
    r = httpx.get(f"{gateway.url}/health/ready")
    assert r.status_code == 200 and r.json()["colour"] == "blue"
    v = httpx.get(f"{gateway.url}/version").json()
    assert v["colour"] == "blue"
    assert v["version"] == "7"
    assert v["model"] == "triage-llm"
    assert v["triton_model"] == "llm_blue"
    assert v["adapter_sha256"] == "sha-blue-7"
    assert v["deployed_at"] == "2025-01-02T03:04:05+00:00"
    assert v["generation"] == state["generation"]
    models = httpx.get(f"{gateway.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tuneship"]


# -- OpenAI compatibility ----------------------------------------------------------------------
def test_official_openai_client(shared_gateway):
    gateway = shared_gateway
    put_routes(gateway, route("blue"))
    ok0 = metric(gateway, "tuneship_gateway_requests_total", colour="blue", model="llm_blue", status="200")
    lat0 = metric(gateway, "tuneship_gateway_request_latency_seconds_count", colour="blue", status="200")
    nf0 = metric(gateway, "tuneship_gateway_requests_total", status="404")
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-anything", max_retries=0)

    assert [m.id for m in client.models.list()] == ["tuneship"]
    assert client.models.retrieve("tuneship").id == "tuneship"

    resp = client.completions.create(model="tuneship", prompt=PROMPT, max_tokens=8, temperature=0, user="u1")
    assert resp.object == "text_completion"
    assert resp.model == "tuneship"
    assert resp.id.startswith("cmpl-")
    choice = resp.choices[0]
    assert choice.text == " [llm_blue] category=billing priority=high"
    assert choice.index == 0 and choice.finish_reason == "stop" and choice.logprobs is None
    assert resp.usage.completion_tokens == 3
    assert resp.usage.prompt_tokens == len(PROMPT.split())
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 3

    # A list of one prompt; max_tokens truncates and reports finish_reason=length.
    resp = client.completions.create(model="tuneship", prompt=["Ticket: where is my parcel?\nTriage:"], max_tokens=2)
    assert resp.choices[0].text == " [llm_blue] category=shipping"
    assert resp.choices[0].finish_reason == "length"

    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="gpt-4o", prompt="hi")
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tuneship", prompt="hi", n=2)

    # Request metrics, by served model/colour/model/status.
    assert metric(gateway, "tuneship_gateway_requests_total", served_model="tuneship", colour="blue",
                  model="llm_blue", status="200") == ok0 + 2
    assert metric(gateway, "tuneship_gateway_request_latency_seconds_count", colour="blue", status="200") == lat0 + 2
    assert metric(gateway, "tuneship_gateway_requests_total", served_model="none", status="404") == nf0 + 1


def test_error_bodies(shared_gateway):
    gateway = shared_gateway
    put_routes(gateway, route("blue"))
    e0 = metric(gateway, "tuneship_gateway_requests_total", colour="blue", status="502")
    url = f"{gateway.url}/v1/completions"
    r = httpx.post(url, content=b'{"model": "tuneship", "prompt": ', headers={"content-type": "application/json"})
    assert_openai_error(r, 400, "invalid_json")
    assert_openai_error(httpx.post(url, json={"model": "nope", "prompt": "x"}), 404, "model_not_found")
    err = assert_openai_error(httpx.post(url, json={"model": "tuneship"}), 400)
    assert err["param"] == "prompt" and err["type"] == "invalid_request_error"
    err = assert_openai_error(httpx.post(url, json={"model": "tuneship", "prompt": "x", "max_tokens": "lots"}), 400)
    assert err["param"] == "max_tokens"
    assert_openai_error(httpx.post(url, json={"model": "tuneship", "prompt": "x", "max_tokens": 0}), 400)
    assert_openai_error(httpx.post(url, json={"model": "tuneship", "prompt": ["a", "b"]}), 400)
    assert metric(gateway, "tuneship_gateway_requests_total", status="400") >= 6
    # Streaming is supported (test_gateway_api.py); a bad streaming request still fails before any event.
    assert_openai_error(httpx.post(url, json={"model": "tuneship", "prompt": "x", "stream": True, "max_tokens": 0}), 400)
    assert_openai_error(httpx.post(url, json=["not", "an", "object"]), 400)
    assert_openai_error(httpx.get(f"{gateway.url}/v1/nothing-here"), 404, "not_found")
    # The model itself fails -> 502, request id echoed.
    r = httpx.post(url, json={"model": "tuneship", "prompt": "Ticket: __fail__\nTriage:"},
                   headers={"x-request-id": "trace-123"})
    assert_openai_error(r, 502, "upstream_error")
    rid = r.headers["x-request-id"]
    assert rid != "trace-123"  # the gateway's own id is the log's join key
    rec = wait_for(lambda: next((x for x in read_inference_log(gateway.log_root) if x["request_id"] == rid), None))
    assert rec and rec["client_request_id"] == "trace-123"
    assert rec["live"]["status"] == 502 and rec["live"]["error"] == "upstream_error" and rec["live"]["completion"] is None
    assert metric(gateway, "tuneship_gateway_requests_total", colour="blue", status="502") == e0 + 1


# -- admin -------------------------------------------------------------------------------------
def test_admin_requires_the_token(gateway):
    token_file = gateway.home / "gateway" / "admin_token"
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    calls = [("GET", "/admin/routes", None), ("PUT", "/admin/routes", {"live": route("blue")}),
             ("POST", "/admin/switch", None), ("POST", "/admin/rollback", None)]
    for method, path, body in calls:
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": "Basic abc"},
                        {"Authorization": f"Bearer {gateway.admin_token}x"}):
            r = httpx.request(method, gateway.url + path, json=body, headers=headers)
            err = assert_openai_error(r, 401)
            assert err["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
    assert not (gateway.home / "gateway" / "routes" / "tuneship.json").exists()  # nothing got through
    r = httpx.get(f"{gateway.url}/admin/routes", headers=gateway.admin)
    assert r.status_code == 200 and r.json()["live"] is None and r.json()["generation"] == 0


def test_switch_moves_traffic_and_rollback_returns_it(shared_gateway):
    gateway = shared_gateway
    admin = gateway.admin
    put_routes(gateway, route("blue"), previous=None)
    r = httpx.post(f"{gateway.url}/admin/switch", headers=admin)
    assert_openai_error(r, 409, "no_candidate")
    r = httpx.post(f"{gateway.url}/admin/rollback", headers=admin)
    assert_openai_error(r, 409, "no_previous")

    # A candidate Triton has not loaded cannot go live.
    put_routes(gateway, route("blue"), route("green", "llm_missing"), mirror_sample=0.0)
    assert_openai_error(httpx.post(f"{gateway.url}/admin/switch", headers=admin), 409, "model_not_ready")

    state = put_routes(gateway, route("blue"), route("green", version="2"), mirror_sample=0.0)
    assert answered_by(gateway) == "llm_blue"
    assert_openai_error(httpx.post(f"{gateway.url}/admin/switch", params={"colour": "blue"}, headers=admin),
                        409, "colour_mismatch")
    # Optimistic concurrency: a stale generation is refused.
    r = httpx.post(f"{gateway.url}/admin/switch", headers={**admin, "If-Match": str(state["generation"] - 1)})
    assert_openai_error(r, 409, "generation_mismatch")

    r = httpx.post(f"{gateway.url}/admin/switch", params={"colour": "green"}, headers=admin)
    assert r.status_code == 200, r.text
    s = r.json()
    assert s["live"]["colour"] == "green" and s["previous"]["colour"] == "blue" and s["shadow"] is None
    assert s["generation"] == state["generation"] + 1
    assert [answered_by(gateway) for _ in range(3)] == ["llm_green"] * 3
    v = httpx.get(f"{gateway.url}/version").json()
    assert (v["colour"], v["version"]) == ("green", "2")

    r = httpx.post(f"{gateway.url}/admin/rollback", headers=admin)
    assert r.status_code == 200, r.text
    s = r.json()
    assert s["live"]["colour"] == "blue" and s["previous"]["colour"] == "green"
    assert answered_by(gateway) == "llm_blue"
    assert httpx.get(f"{gateway.url}/version").json()["colour"] == "blue"

    # Routes on disk are the state the API reports.
    import json
    on_disk = json.loads((gateway.home / "gateway" / "routes" / "tuneship.json").read_text())
    assert on_disk == httpx.get(f"{gateway.url}/admin/routes", headers=admin).json()

    # Invalid states are rejected with OpenAI-style 400s.
    r = httpx.put(f"{gateway.url}/admin/routes", headers=admin, json={"live": route("blue"), "mirror_sample": 2})
    assert_openai_error(r, 400)
    r = httpx.put(f"{gateway.url}/admin/routes", headers=admin, json={"live": route("blue"), "shadow": route("teal", "llm_blue")})
    assert_openai_error(r, 400)


# -- mirroring and the inference log -----------------------------------------------------------
def test_shadow_mirroring_logs_both_answers(shared_gateway):
    gateway = shared_gateway
    sent0 = metric(gateway, "tuneship_gateway_shadow_sent_total", colour="green")
    failed0 = metric(gateway, "tuneship_gateway_shadow_failed_total")
    put_routes(gateway, route("blue", version="1"), route("green", version="2"), mirror_sample=1.0)
    ids = []
    for i in range(5):
        r = complete(gateway, prompt=f"Ticket: refund please #{i}\nTriage:")
        assert r.status_code == 200
        assert "[llm_blue]" in r.json()["choices"][0]["text"]  # the client only sees live
        ids.append(r.headers["x-request-id"])

    def mine() -> list[dict]:
        return [x for x in read_inference_log(gateway.log_root) if x["request_id"] in ids]

    def joined():
        recs = mine()
        done = [x for x in recs if x["shadow"] and x["shadow"]["status"] != "pending"]
        return recs if len(done) == 5 else None

    recs = wait_for(joined)
    assert recs, mine()
    assert [x["request_id"] for x in recs] == ids
    for i, rec in enumerate(recs):
        assert rec["endpoint"] == "/v1/completions" and rec["model"] == "tuneship"
        assert rec["prompt"] == f"Ticket: refund please #{i}\nTriage:"
        assert rec["live"]["colour"] == "blue" and rec["live"]["version"] == "1" and rec["live"]["status"] == 200
        assert rec["live"]["completion"].startswith(" [llm_blue]") and rec["live"]["latency_ms"] > 0
        assert rec["shadow"]["colour"] == "green" and rec["shadow"]["version"] == "2"
        assert rec["shadow"]["status"] == 200
        assert rec["shadow"]["completion"] == rec["live"]["completion"].replace("llm_blue", "llm_green")
        assert rec["prompt_tokens"] == len(rec["prompt"].split()) and rec["completion_tokens"] == 3
    files = {p.relative_to(gateway.log_root).as_posix() for p in gateway.log_root.glob("*/*/*/*")}
    assert files and all(re.fullmatch(r"served_model=tuneship/dt=\d{4}-\d{2}-\d{2}/hour=\d{2}/shared\.jsonl", f)
                         for f in files), files
    assert all(rec["served_model"] == "tuneship" for rec in recs)
    assert metric(gateway, "tuneship_gateway_shadow_sent_total", colour="green") == sent0 + 5
    assert metric(gateway, "tuneship_gateway_shadow_failed_total") == failed0

    # since= filters by request time.
    assert read_inference_log(gateway.log_root, since=recs[-1]["ts"]) == recs[-1:]

    # mirror_sample=0 stops copying.
    put_routes(gateway, route("blue"), route("green"), mirror_sample=0.0)
    ids.append(complete(gateway).headers["x-request-id"])
    last = wait_for(lambda: len(recs := mine()) == 6 and recs[-1])
    assert last and last["shadow"] is None and last["live"]["status"] == 200


def test_failing_shadow_does_not_touch_live(shared_gateway):
    gateway = shared_gateway
    failed0 = metric(gateway, "tuneship_gateway_shadow_failed_total", colour="green")
    put_routes(gateway, route("blue"), route("green", "llm_missing"), mirror_sample=1.0)
    ids = set()
    for _ in range(3):
        r = complete(gateway)
        assert r.status_code == 200 and "[llm_blue]" in r.json()["choices"][0]["text"]
        ids.add(r.headers["x-request-id"])
    assert wait_for(lambda: metric(gateway, "tuneship_gateway_shadow_failed_total", colour="green") == failed0 + 3)

    def done():
        recs = [x for x in read_inference_log(gateway.log_root) if x["request_id"] in ids]
        return recs if len(recs) == 3 and all(x["shadow"]["status"] != "pending" for x in recs) else None

    recs = wait_for(done)
    assert recs and len(recs) == 3
    assert all(x["live"]["status"] == 200 and x["shadow"]["status"] == 503 and x["shadow"]["completion"] is None
               for x in recs)


@pytest.fixture
def gated(triton):
    """The shared `llm_gated` echo model holds every answer until this gate file exists."""
    gate = Path(triton.server.repository) / "llm_gated" / "gate"
    gate.unlink(missing_ok=True)
    yield gate
    gate.touch()  # never leave a copy of the shared model hanging for the next test


def test_slow_shadow_is_not_waited_for_and_overflow_is_dropped(start_gateway, gated):
    """The shadow holds its answers until the gate opens, and the client gives up after 10 s
    (the model after 20 s): every live answer arriving while the gate is shut proves the
    live path never waits for the shadow, without measuring a latency."""
    gw = start_gateway(TUNESHIP_GATEWAY_SHADOW_QUEUE_SIZE="1", TUNESHIP_GATEWAY_SHADOW_WORKERS="1")
    put_routes(gw, route("blue"), route("gated", "llm_gated"))
    for _ in range(5):
        r = httpx.post(f"{gw.url}/v1/completions", json={"model": "tuneship", "prompt": PROMPT}, timeout=10)
        assert r.status_code == 200 and "[llm_blue]" in r.json()["choices"][0]["text"]
    assert not gated.exists()
    # One in flight (held at the gate), one queued, the rest dropped.
    assert wait_for(lambda: metric(gw, "tuneship_gateway_shadow_dropped_total", colour="gated") == 3)
    assert metric(gw, "tuneship_gateway_shadow_queue_depth") == 1
    assert metric(gw, "tuneship_gateway_shadow_sent_total", colour="gated") == 1
    gated.touch()
    recs = wait_for(lambda: (r := read_inference_log(gw.log_root)) and
                    sum(x["shadow"]["status"] == 200 for x in r) == 2 and r, timeout=10)
    assert recs, read_inference_log(gw.log_root)
    statuses = sorted(str(x["shadow"]["status"]) for x in recs)
    assert statuses == ["200", "200", "dropped", "dropped", "dropped"]
    for x in recs:
        assert x["live"]["status"] == 200 and x["live"]["completion"].startswith(" [llm_blue]")
        if x["shadow"]["status"] == 200:
            assert x["shadow"]["completion"].startswith(" [llm_gated]")


def test_queued_shadow_copies_are_dropped_when_the_shadow_goes_live(start_gateway, gated):
    """Copies still queued for the candidate when it is switched live are not sent: it now
    answers live traffic, and a copy would be counted twice and logged as a shadow answer."""
    gw = start_gateway(TUNESHIP_GATEWAY_SHADOW_WORKERS="1")
    put_routes(gw, route("blue"), route("gated", "llm_gated", version="5"))
    ids = []
    for i in range(5):
        r = complete(gw, prompt=f"Ticket: parcel late #{i}\nTriage:")
        assert r.status_code == 200 and "[llm_blue]" in r.json()["choices"][0]["text"]
        ids.append(r.headers["x-request-id"])
    # One copy in flight (held at the gate), four waiting in the queue.
    assert wait_for(lambda: metric(gw, "tuneship_gateway_shadow_queue_depth") == 4)
    r = httpx.post(f"{gw.url}/admin/switch", params={"colour": "gated"}, headers=gw.admin)
    assert r.status_code == 200 and r.json()["live"]["colour"] == "gated"
    gated.touch()

    assert wait_for(lambda: metric(gw, "tuneship_gateway_shadow_dropped_total", reason="route_changed") == 4)
    assert metric(gw, "tuneship_gateway_shadow_dropped_total", colour="gated", model="llm_gated",
                  reason="route_changed") == 4
    assert metric(gw, "tuneship_gateway_shadow_dropped_total", reason="queue_full") == 0
    assert metric(gw, "tuneship_gateway_shadow_sent_total", colour="gated") == 1  # only the one in flight

    def joined():
        recs = [x for x in read_inference_log(gw.log_root) if x["request_id"] in ids]
        return recs if len(recs) == 5 and all(x["shadow"]["status"] != "pending" for x in recs) else None

    recs = wait_for(joined, timeout=6)
    assert recs, read_inference_log(gw.log_root)
    assert [x["request_id"] for x in recs] == ids
    assert recs[0]["shadow"]["status"] == 200 and recs[0]["shadow"]["completion"].startswith(" [llm_gated]")
    for x in recs[1:]:
        assert x["live"]["colour"] == "blue" and x["live"]["status"] == 200
        assert (x["shadow"]["colour"], x["shadow"]["version"]) == ("gated", "5")
        assert x["shadow"]["status"] == "dropped" and x["shadow"]["reason"] == "route_changed"
        assert x["shadow"]["completion"] is None


def test_queued_shadow_copies_are_dropped_when_the_shadow_is_cleared(start_gateway, gated):
    gw = start_gateway(TUNESHIP_GATEWAY_SHADOW_WORKERS="1")
    put_routes(gw, route("blue"), route("gated", "llm_gated"))
    for _ in range(3):
        assert complete(gw).status_code == 200
    assert wait_for(lambda: metric(gw, "tuneship_gateway_shadow_queue_depth") == 2)
    put_routes(gw, route("blue"), None)
    gated.touch()
    assert wait_for(lambda: metric(gw, "tuneship_gateway_shadow_dropped_total", reason="route_changed") == 2)
    assert metric(gw, "tuneship_gateway_shadow_sent_total", colour="gated") == 1


# -- replicas and restarts ---------------------------------------------------------------------
def test_second_replica_sees_a_switch_made_through_the_first(start_gateway, tmp_path):
    home = tmp_path / "shared-home"
    (home / "gateway").mkdir(parents=True)  # both race to create the admin token
    a = start_gateway(home=home, replica="a", wait=False)
    b = start_gateway(home=home, replica="b", wait=False)
    a.wait_live(), b.wait_live()
    assert a.admin_token == b.admin_token  # one generated token per home
    put_routes(a, route("blue"), route("green"), mirror_sample=0.0)
    assert answered_by(b) == "llm_blue"
    r = httpx.post(f"{a.url}/admin/switch", headers=a.admin)
    assert r.status_code == 200
    assert answered_by(b) == "llm_green"  # the very next request
    assert httpx.get(f"{b.url}/version").json()["colour"] == "green"
    # ...and b's admin API acts on the same state.
    assert httpx.post(f"{b.url}/admin/rollback", headers=b.admin).status_code == 200
    assert answered_by(a) == "llm_blue"
    a.terminate(), b.terminate()
    a.stop(), b.stop()
    replicas = sorted(p.name for p in home.glob("inference_log/served_model=tuneship/dt=*/hour=*/*.jsonl"))
    assert replicas == ["a.jsonl", "b.jsonl"]
    assert len(read_inference_log(home / "inference_log")) == 3  # b twice, a once


def test_restarted_gateway_keeps_routes_and_flushes_its_log(start_gateway, tmp_path):
    home = tmp_path / "home"
    gw = start_gateway(home=home, replica="r1")
    put_routes(gw, route("blue"), route("green", version="9"), mirror_sample=0.0)
    assert httpx.post(f"{gw.url}/admin/switch", headers=gw.admin).status_code == 200
    before = httpx.get(f"{gw.url}/admin/routes", headers=gw.admin).json()
    for _ in range(20):
        assert complete(gw).status_code == 200
    assert gw.stop() in (0, -signal.SIGTERM)
    assert len(read_inference_log(home / "inference_log")) == 20  # flushed on shutdown

    # Restart (as another replica id, with the admin token now from the environment).
    file_token = gw.admin_token
    gw2 = start_gateway(home=home, replica="r2", TUNESHIP_GATEWAY_ADMIN_TOKEN="env-token-0123456789abcdef")
    assert httpx.get(f"{gw2.url}/admin/routes", headers=gw.admin).status_code == 401
    assert gw2.admin_token != file_token
    assert httpx.get(f"{gw2.url}/admin/routes", headers=gw2.admin).json() == before
    assert httpx.get(f"{gw2.url}/health/ready").status_code == 200
    v = httpx.get(f"{gw2.url}/version").json()
    assert (v["colour"], v["version"]) == ("green", "9")
    assert answered_by(gw2) == "llm_green"


def test_admin_can_pin_a_colour_for_smoke_tests(shared_gateway):
    """Release smoke: an admin addresses the idle colour directly; clients cannot; not logged."""
    gateway = shared_gateway
    put_routes(gateway, route("blue", version="1"), None)
    body = {"model": "tuneship", "prompt": "Ticket: smoke-pin check\nTriage:", "max_tokens": 8}
    r = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=30,
                   headers={**gateway.admin, "X-Tuneship-Target": "green"})
    assert r.status_code == 200, r.text
    assert "[llm_green]" in r.json()["choices"][0]["text"]
    assert answered_by(gateway) == "llm_blue"  # live traffic is untouched
    anon = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=30, headers={"X-Tuneship-Target": "green"})
    assert anon.status_code == 401 and anon.json()["error"]
    time.sleep(1.0)
    assert not [x for x in read_inference_log(gateway.log_root) if x["prompt"] == body["prompt"]]
