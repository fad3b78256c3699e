"""Feedback (issue 14): `POST /v1/feedback` on the real gateway in front of the real
tritonserver (echo models), over loopback. Answers come through the official `openai`
client; feedback goes with httpx. Checked: the 202 and what it says was recorded, the
`kind: feedback` line the writer appends, the reader's join (latest wins, another key's
feedback never attached, unknown ids counted), validation errors in the OpenAI shape
naming the field, 401 and the shared rate limit, PII redaction of the comment, and the
shadow verdict's task-success rate and mean rating per version.

Most tests share one gateway (`shared_gateway`) and keep to their own served model, so each
reads its own log partition.
"""

from __future__ import annotations

import uuid

import httpx
import openai
import pytest
from gateway_helpers import metric, wait_for

from tuneship.inference_log import iter_lines, read_inference_log
from tuneship.monitor import feedback_by_version, feedback_summary

pytestmark = pytest.mark.integration

TICKET = "Ticket: I was charged twice for my order\nTriage:"


def route(colour: str, version: str) -> dict:
    return {"colour": colour, "model": f"llm_{colour}", "version": version, "registered_model": "triage-llm"}


def put_routes(gw, model: str, live: dict, shadow: dict | None = None, **kw: object) -> None:
    r = httpx.put(f"{gw.url}/admin/routes", params={"model": model, "force": "true"}, headers=gw.admin,
                  json={"live": live, "shadow": shadow, **kw}, timeout=10)
    assert r.status_code == 200, r.text


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def feedback(gw, key: str | None, body: dict | bytes) -> httpx.Response:
    headers = bearer(key) if key else {}
    if isinstance(body, bytes):
        return httpx.post(f"{gw.url}/v1/feedback", headers={**headers, "content-type": "application/json"},
                          content=body, timeout=10)
    return httpx.post(f"{gw.url}/v1/feedback", headers=headers, json=body, timeout=10)


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def feedback_lines(gw, model: str) -> list[dict]:
    return [x for x in iter_lines(gw.log_root, model=model) if x.get("kind") == "feedback"]


def chat(client: openai.OpenAI, model: str) -> tuple[str, str, str]:
    """(completion id, x-request-id header, colour that answered) of one chat completion."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": TICKET}], max_tokens=8)
    resp = raw.parse()
    return resp.id, raw.headers["x-request-id"], raw.headers["x-tuneship-colour"]


@pytest.fixture(scope="module")
def keys(shared_gateway) -> dict[str, tuple[str, str]]:
    """Two clients, alice and bob: name -> (key id, key). Issuing them enforces keys."""
    return {name: shared_gateway.create_key(name) for name in ("alice", "bob")}


def test_feedback_is_logged_and_joined_to_its_request(shared_gateway, keys):
    gw, model = shared_gateway, "fb_join"
    put_routes(gw, model, route("blue", "1"))
    (alice_id, alice), (bob_id, bob) = keys["alice"], keys["bob"]
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=alice, max_retries=0)
    cid, rid, _ = chat(client, model)
    # What a client sees: the completion's id is the gateway's request id behind a prefix.
    assert cid == f"chatcmpl-{rid}" and len(rid) == 32

    r = feedback(gw, alice, {"request_id": cid, "model": model, "rating": 4, "task_success": True,
                             "comment": "  right category  "})
    assert r.status_code == 202, r.text
    first = r.json()
    assert first["object"] == "feedback" and len(first["feedback_id"]) == 32 and first["ts"]
    assert {k: first[k] for k in ("request_id", "served_model", "key_id", "rating", "task_success", "comment",
                                  "replica")} == {
        "request_id": rid, "served_model": model, "key_id": alice_id, "rating": 4, "task_success": True,
        "comment": "right category", "replica": gw.replica}
    assert "pii_redacted" not in first  # redaction is off on this gateway

    # The line the writer appended: exactly what the answer said, in the model's partition.
    lines = wait_for(lambda: feedback_lines(gw, model))
    assert lines == [{"kind": "feedback", **{k: v for k, v in first.items() if k != "object"}}]

    rec = wait_for(lambda: next((x for x in read_inference_log(gw.log_root, model=model)
                                 if x["request_id"] == rid and x.get("feedback")), None))
    assert rec["key_id"] == alice_id and rec["live"]["colour"] == "blue"
    assert rec["feedback"] == {"ts": first["ts"], "feedback_id": first["feedback_id"], "key_id": alice_id,
                               "replica": gw.replica, "rating": 4, "task_success": True,
                               "comment": "right category", "count": 1}

    # A second verdict from the same client, by the bare x-request-id: the latest wins.
    r = feedback(gw, alice, {"request_id": rid, "model": model, "rating": 2, "task_success": False})
    assert r.status_code == 202, r.text
    second = r.json()
    assert (second["request_id"], second["rating"], second["task_success"], second["comment"]) == (rid, 2, False, None)
    # Bob rates alice's answer (accepted: the gateway cannot know whose request it was), and
    # someone gives feedback on an id the log never had.
    r = feedback(gw, bob, {"request_id": cid, "model": model, "rating": 5, "task_success": True})
    assert r.status_code == 202 and r.json()["key_id"] == bob_id, r.text
    cid2, rid2, _ = chat(client, model)  # another of alice's answers: only bob rates it
    r = feedback(gw, bob, {"request_id": cid2, "model": model, "task_success": False})
    assert r.status_code == 202, r.text
    unknown = uuid.uuid4().hex
    r = feedback(gw, alice, {"request_id": unknown, "model": model, "task_success": True})
    assert r.status_code == 202 and r.json()["rating"] is None, r.text

    assert wait_for(lambda: len(feedback_lines(gw, model)) == 5)
    stats: dict[str, int] = {}
    recs = read_inference_log(gw.log_root, model=model, feedback_stats=stats)
    assert [x["request_id"] for x in recs] == [rid, rid2]  # feedback lines never become records
    fb = recs[0]["feedback"]
    assert (fb["feedback_id"], fb["rating"], fb["task_success"], fb["key_id"], fb["count"]) == (
        second["feedback_id"], 2, False, alice_id, 2)
    assert "feedback" not in recs[1]
    assert stats == {"lines": 5, "attached": 1, "superseded": 1, "foreign": 2, "unknown": 1, "outside_window": 0}
    assert metric(gw, "tuneship_gateway_feedback_total", served_model=model) == 5


def test_feedback_validation_errors_name_the_field(shared_gateway, keys):
    gw = shared_gateway
    put_routes(gw, "fb_a", route("blue", "1"))
    put_routes(gw, "fb_b", route("blue", "1"))
    _, alice = keys["alice"]
    rid = uuid.uuid4().hex
    before = metric(gw, "tuneship_gateway_feedback_total")
    cases = [
        ({"request_id": rid, "model": "fb_a"}, "rating", "missing_required_parameter"),
        ({"request_id": rid, "model": "fb_a", "comment": "no verdict"}, "rating", "missing_required_parameter"),
        ({"request_id": rid, "model": "fb_a", "rating": 6}, "rating", "invalid_value"),
        ({"request_id": rid, "model": "fb_a", "rating": 0}, "rating", "invalid_value"),
        ({"request_id": rid, "model": "fb_a", "rating": "5"}, "rating", "invalid_value"),
        ({"request_id": rid, "model": "fb_a", "rating": 4.5}, "rating", "invalid_value"),
        ({"request_id": rid, "model": "fb_a", "task_success": "yes"}, "task_success", "invalid_value"),
        ({"request_id": rid, "model": "fb_a", "task_success": 1}, "task_success", "invalid_value"),
        ({"request_id": "my-own-trace-id", "model": "fb_a", "rating": 3}, "request_id", "invalid_value"),
        ({"request_id": "chatcmpl-" + rid[:-1], "model": "fb_a", "rating": 3}, "request_id", "invalid_value"),
        ({"model": "fb_a", "rating": 3}, "request_id", "missing_required_parameter"),
        ({"request_id": rid, "model": "fb_a", "rating": 3, "comment": "x" * 2001}, "comment", "invalid_value"),
        ({"request_id": rid, "model": "fb_a", "ratings": 3}, "ratings", "invalid_value"),
        # two served models have routes: the feedback must say which one answered
        ({"request_id": rid, "rating": 3}, "model", "model_required"),
    ]
    for body, param, code in cases:
        err = assert_openai_error(feedback(gw, alice, body), 400, param, code)
        assert err["type"] == "invalid_request_error" and param in err["message"], (body, err)
    assert_openai_error(feedback(gw, alice, b'{"request_id": '), 400, None, "invalid_json")
    assert_openai_error(feedback(gw, alice, {"request_id": rid, "model": "nope", "rating": 3}), 404, "model",
                        "model_not_found")
    # Nothing refused was counted or written.
    assert metric(gw, "tuneship_gateway_feedback_total") == before
    assert feedback_lines(gw, "fb_a") == [] and feedback_lines(gw, "fb_b") == []
    # The edges are valid.
    for body in ({"rating": 1}, {"rating": 5}, {"task_success": False}):
        r = feedback(gw, alice, {"request_id": rid, "model": "fb_a", **body})
        assert r.status_code == 202, (body, r.text)


def test_feedback_needs_a_client_key_and_shares_the_rate_limit(shared_gateway, keys):
    gw, model = shared_gateway, "fb_auth"
    put_routes(gw, model, route("blue", "1"))
    body = {"request_id": uuid.uuid4().hex, "model": model, "rating": 3}
    err = assert_openai_error(feedback(gw, None, body), 401, code="invalid_api_key")
    assert err["type"] == "authentication_error"
    assert_openai_error(feedback(gw, "sk-ts-00000000-" + "a" * 43, body), 401, code="invalid_api_key")
    assert_openai_error(feedback(gw, None, {"rating": 9}), 401)  # the key is checked before the body
    assert feedback_lines(gw, model) == []

    # One bucket per key for every client call: a completion and a feedback use it up.
    _, key = gw.create_key("slow", rpm=1, burst=2)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)
    cid, _, _ = chat(client, model)
    assert feedback(gw, key, {"request_id": cid, "model": model, "rating": 5}).status_code == 202
    r = feedback(gw, key, {"request_id": cid, "model": model, "rating": 4})
    assert_openai_error(r, 429, code="rate_limit_exceeded")
    assert int(r.headers["retry-after"]) >= 1
    assert wait_for(lambda: [x["rating"] for x in feedback_lines(gw, model)] == [5])


def test_shadow_verdict_reports_feedback_rates_per_version(shared_gateway, keys):
    gw, model = shared_gateway, "fb_verdict"
    _, alice = keys["alice"]
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=alice, max_retries=0)
    # The candidate (green v2) answers users as a full canary ...
    put_routes(gw, model, route("blue", "1"), route("green", "2"), canary_weight=100)
    canary = [chat(client, model) for _ in range(4)]
    assert {colour for _, _, colour in canary} == {"green"}
    # ... then only as a shadow copy of blue v1's answers: users never see those.
    put_routes(gw, model, route("blue", "1"), route("green", "2"), canary_weight=0, mirror_sample=1.0)
    live = [chat(client, model) for _ in range(2)]
    assert {colour for _, _, colour in live} == {"blue"}

    verdicts = [
        (canary[0], {"rating": 5, "task_success": True}),
        (canary[1], {"rating": 4, "task_success": True}),
        (canary[2], {"task_success": False}),
        (canary[3], {"rating": 3}),
        (live[0], {"rating": 1, "task_success": False}),
        (live[1], {"rating": 2, "task_success": False}),
    ]
    for (cid, _, _), body in verdicts:
        r = feedback(gw, alice, {"request_id": cid, "model": model, **body})
        assert r.status_code == 202, r.text
    assert wait_for(lambda: len(feedback_lines(gw, model)) == 6)
    # the mirrored copies of blue's answers have come back too (green v2 in the shadow slot)
    def complete() -> list[dict] | None:
        rs = read_inference_log(gw.log_root, model=model)
        return rs if sum((x.get("shadow") or {}).get("status") == 200 for x in rs) == 2 else None

    recs = wait_for(complete)
    assert recs and len(recs) == 6 and all(x.get("feedback") for x in recs)

    v = feedback_summary(recs, "2")
    # Only the four answers green gave users count; its shadow copies carry blue's ratings.
    assert (v["task_success_rate"], v["task_success_n"]) == (2 / 3, 3)
    assert (v["mean_rating"], v["rating_n"]) == (4.0, 3)
    assert feedback_by_version(recs) == {
        "1": {"task_success_rate": 0.0, "task_success_n": 2, "mean_rating": 1.5, "rating_n": 2},
        "2": {"task_success_rate": 2 / 3, "task_success_n": 3, "mean_rating": 4.0, "rating_n": 3},
    }

    bare = [{k: x for k, x in rec.items() if k != "feedback"} for rec in recs]
    v0 = feedback_summary(bare, "2")
    assert (v0["task_success_rate"], v0["task_success_n"], v0["mean_rating"], v0["rating_n"]) == (None, 0, None, 0)
    assert feedback_by_version(bare) == {}


def test_feedback_comment_is_pii_redacted_and_one_model_needs_no_model(start_gateway, tmp_path):
    gw = start_gateway(home=tmp_path / "redacting", TUNESHIP_GATEWAY_REDACT_PII="true")
    key_id, key = gw.create_key("carol")
    rid = uuid.uuid4().hex
    # No model has routes yet: nothing could have been answered.
    assert_openai_error(feedback(gw, key, {"request_id": rid, "rating": 3}), 404, "model", "model_not_found")
    put_routes(gw, "tuneship", route("blue", "1"))
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)
    cid, rid, _ = chat(client, "tuneship")

    comment = "wrong: refund went to jane.doe@example.com, call me on +1 415 555 0134"
    r = feedback(gw, key, {"request_id": cid, "task_success": False, "comment": comment})  # no `model`
    assert r.status_code == 202, r.text
    out = r.json()
    assert out["served_model"] == "tuneship" and out["key_id"] == key_id
    assert out["comment"] == "wrong: refund went to [EMAIL], call me on [PHONE]"
    assert out["pii_redacted"] == ["email", "phone"]
    lines = wait_for(lambda: feedback_lines(gw, "tuneship"))
    assert len(lines) == 1 and lines[0]["comment"] == out["comment"] and lines[0]["pii_redacted"] == ["email", "phone"]
    raw = b"".join(p.read_bytes() for p in gw.log_root.rglob("*.jsonl"))
    assert b"jane.doe" not in raw and b"555 0134" not in raw
    rec = wait_for(lambda: next((x for x in read_inference_log(gw.log_root) if x.get("feedback")), None))
    assert rec["request_id"] == rid and rec["feedback"]["comment"] == out["comment"]
    assert rec["feedback"]["pii_redacted"] == ["email", "phone"] and rec["feedback"]["task_success"] is False
