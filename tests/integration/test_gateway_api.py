"""Gateway API, issue 5 follow-up: chat, streaming, client keys, rate limits, request limits,
canary and PII redaction -- against the real tritonserver (echo models) and real gateway
processes over loopback, with the official `openai` package as the client.

The echo model answers `" [<triton model>] category=... priority=..."` (three whitespace
tokens) and counts the prompt's whitespace-separated words as PROMPT_TOKENS, so the tests can
tell which colour answered and what prompt text reached Triton.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from gateway_helpers import metric, wait_for

from tuneship.inference_log import read_inference_log

pytestmark = pytest.mark.integration

TICKET = "Ticket: I was charged twice for my order\nTriage:"
ANSWER = "[llm_blue] category=billing priority=high"


def route(colour: str, model: str | None = None, version: str = "1", **extra: object) -> dict:
    return {"colour": colour, "model": model or f"llm_{colour}", "version": version,
            "registered_model": "triage-llm", **extra}


def put_routes(gw, live: dict | None, shadow: dict | None = None, **kw: object) -> dict:
    r = httpx.put(f"{gw.url}/admin/routes", headers=gw.admin, json={"live": live, "shadow": shadow, **kw}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None, type: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    if type is not None:
        assert err["type"] == type, err
    return err


def logged(gw, rid: str) -> dict | None:
    return wait_for(lambda: next((x for x in read_inference_log(gw.log_root) if x["request_id"] == rid), None))


def sse_events(r: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE body, checking the framing on the way."""
    assert r.headers["content-type"].startswith("text/event-stream"), r.headers
    blocks = r.text.split("\n\n")
    assert blocks[-1] == "", "the stream must end with a blank line"
    events = []
    for block in blocks[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block
        events.append(block[len("data: "):])
    return events


# -- chat completions and streaming, through the official client --------------------------------
def test_openai_client_chat_and_streaming(start_gateway):
    gw = start_gateway()
    put_routes(gw, route("blue"))
    _, key = gw.create_key("chat-tests")
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)

    # Non-streaming chat: the answer, without the completion's leading separator.
    resp = client.chat.completions.create(model="tuneship", messages=[{"role": "user", "content": TICKET}],
                                          temperature=0, max_tokens=8)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-") and resp.model == "tuneship"
    msg = resp.choices[0].message
    assert (msg.role, msg.content) == ("assistant", ANSWER)
    assert resp.choices[0].finish_reason == "stop"
    # The prompt Triton got is the base model's chat template with the generation prompt,
    # minus the BOS text (Triton's tokenizer adds BOS): exactly what training rendered.
    rendered = f"user: {TICKET}\nassistant:"
    assert resp.usage.prompt_tokens == len(rendered.split())
    assert resp.usage.completion_tokens == 3 and resp.usage.total_tokens == resp.usage.prompt_tokens + 3

    # Streaming chat: OpenAI chunk shapes, same content, the finish reason last, usage on request.
    stream = client.chat.completions.create(model="tuneship", messages=[{"role": "user", "content": TICKET}],
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == ANSWER
    assert sum(1 for d in deltas if d) == 3  # word-sized pieces
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3

    # max_tokens truncates: finish_reason length, also when streamed.
    short = client.chat.completions.create(model="tuneship", messages=[{"role": "user", "content": TICKET}],
                                           max_completion_tokens=2)
    assert (short.choices[0].message.content, short.choices[0].finish_reason) == ("[llm_blue] category=billing", "length")

    # Streaming completions through the official client.
    pieces = list(client.completions.create(model="tuneship", prompt=TICKET, max_tokens=8, stream=True))
    assert all(p.object == "text_completion" for p in pieces)
    assert "".join(p.choices[0].text for p in pieces) == " " + ANSWER
    assert [p.choices[0].finish_reason for p in pieces][-1] == "stop"
    truncated = list(client.completions.create(model="tuneship", prompt=TICKET, max_tokens=1, stream=True))
    assert "".join(p.choices[0].text for p in truncated) == " [llm_blue]"
    assert truncated[-1].choices[0].finish_reason == "length"

    # The raw wire format: data: lines, [DONE] last; streamed requests are logged like others.
    r = httpx.post(f"{gw.url}/v1/completions", headers=bearer(key), timeout=30,
                   json={"model": "tuneship", "prompt": TICKET, "stream": True})
    assert r.status_code == 200 and r.headers["x-tuneship-colour"] == "blue"
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    bodies = [json.loads(e) for e in events[:-1]]
    assert [b["choices"][0]["text"] for b in bodies] == [" [llm_blue]", " category=billing", " priority=high", ""]
    rec = logged(gw, r.headers["x-request-id"])
    assert rec and rec["prompt"] == TICKET and rec["live"]["completion"] == " " + ANSWER

    # A multi-turn conversation with a system message is rendered turn by turn.
    r = httpx.post(f"{gw.url}/v1/chat/completions", headers=bearer(key), timeout=30, json={
        "model": "tuneship", "messages": [
            {"role": "system", "content": "You triage tickets."},
            {"role": "user", "content": [{"type": "text", "text": "Ticket: where is my parcel?\nTriage:"}]},
            {"role": "assistant", "content": "category=shipping priority=normal"},
            {"role": "user", "content": TICKET}]})
    assert r.status_code == 200, r.text
    rec = logged(gw, r.headers["x-request-id"])
    assert rec["endpoint"] == "/v1/chat/completions"
    assert rec["prompt"] == ("system: You triage tickets.\nuser: Ticket: where is my parcel?\nTriage:\n"
                             "assistant: category=shipping priority=normal\nuser: " + TICKET + "\nassistant:")

    # Chat errors, OpenAI-typed in the client.
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tuneship", messages=[])
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tuneship", messages=[{"role": "user", "content": "hi"},
                                                                   {"role": "assistant", "content": "yo"}])
    assert exc.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tuneship", messages=[{"role": "user", "content": "hi"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert exc.value.body["param"] == "tools"
    assert metric(gw, "tuneship_gateway_requests_total", endpoint="/v1/chat/completions", colour="blue",
                  status="200", role="live") == 4


def test_stream_relays_each_piece_while_the_model_is_still_generating(start_gateway, triton):
    """Against a decoupled model (what compile_for_triton deploys), a streamed answer is relayed
    piece by piece as Triton produces it. llm_stream sends its first word, then holds the
    rest until the test opens its gate file: the client has the first word before the model
    has generated the second, which a gateway that buffered the answer could never do (the
    model gives up after 20 s; the client's read timeout is 15 s)."""
    gw = start_gateway()
    put_routes(gw, route("blue", model="llm_stream"))
    _, key = gw.create_key("stream-tests")
    gate = Path(triton.server.repository) / "llm_stream" / "gate"
    gate.unlink(missing_ok=True)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=15)
    try:
        # A whole answer from the decoupled model (Triton's generate endpoint).
        whole = client.completions.create(model="tuneship", prompt=TICKET, max_tokens=8)
        assert whole.choices[0].text == " [llm_stream] category=billing priority=high"
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(TICKET.split()), 3)

        stream = client.chat.completions.create(model="tuneship", messages=[{"role": "user", "content": TICKET}],
                                                stream=True, stream_options={"include_usage": True})
        chunks = iter(stream)
        first = next(chunks)
        assert first.choices[0].delta.role == "assistant"
        word = next(chunks)
        assert word.choices[0].delta.content == "[llm_stream]"  # the chat answer, leading space stripped
        assert not gate.exists()  # so the model has not generated the second word yet
        gate.touch()
        rest = list(chunks)
        contents = [c.choices[0].delta.content for c in rest if c.choices and c.choices[0].delta.content]
        assert contents == [" category=billing", " priority=high"]
        assert rest[-1].choices == [] and rest[-1].usage.completion_tokens == 3
        assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "stop"

        # Completions streaming, and the log gets the whole answer once the stream ends.
        r = httpx.post(f"{gw.url}/v1/completions", headers=bearer(key), timeout=15,
                       json={"model": "tuneship", "prompt": TICKET, "stream": True, "max_tokens": 2})
        events = sse_events(r)
        texts = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
        assert texts == [" [llm_stream]", " category=billing", ""] and events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        rec = logged(gw, r.headers["x-request-id"])
        assert rec["live"]["completion"] == " [llm_stream] category=billing" and rec["live"]["status"] == 200
        assert rec["completion_tokens"] == 2

        # A failure after the first piece: the stream ends with an OpenAI error event, and
        # the log has the failure with what was sent.
        r = httpx.post(f"{gw.url}/v1/completions", headers=bearer(key), timeout=15,
                       json={"model": "tuneship", "prompt": "__fail_mid__ " + TICKET, "stream": True})
        assert r.status_code == 200
        events = sse_events(r)
        assert json.loads(events[0])["choices"][0]["text"] == " [llm_stream]"
        err = json.loads(events[-1])["error"]
        assert err["code"] == "upstream_error" and "mid-stream" in err["message"]
        rec = logged(gw, r.headers["x-request-id"])
        assert rec["live"]["status"] == 502 and rec["live"]["completion"] == " [llm_stream]"
        # A failure before the first piece is still a status code.
        r = httpx.post(f"{gw.url}/v1/completions", headers=bearer(key), timeout=15,
                       json={"model": "tuneship", "prompt": "__fail__", "stream": True})
        assert_openai_error(r, 502, "upstream_error")
    finally:
        gate.unlink(missing_ok=True)


def test_plain_trained_route_takes_the_user_turn_as_the_prompt(start_gateway):
    """A model trained on prompt/completion rows gets the user message as is (inverse of datagen.to_chat)."""
    gw = start_gateway()
    put_routes(gw, route("blue", metadata={"prompt_format": "plain"}))
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
    resp = client.chat.completions.with_raw_response.create(model="tuneship",
                                                            messages=[{"role": "user", "content": TICKET}])
    assert resp.parse().choices[0].message.content == ANSWER
    rec = logged(gw, resp.headers["x-request-id"])
    assert rec["prompt"] == TICKET
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tuneship", messages=[{"role": "system", "content": "x"},
                                                                   {"role": "user", "content": TICKET}])


def test_chat_prompt_is_the_training_rendering_token_for_token():
    """The gateway's prompt is what `split_prompt_completion` renders with a real transformers
    tokenizer carrying the base model's chat template, and tokenizes to the same ids once
    Triton's tokenizer adds BOS itself."""
    from serving.gateway import chat
    from tests.tasks import triage
    from tuneship import basemodel

    _triage = triage()
    pretrain_corpus = _triage.pretrain_corpus
    from tuneship.train.trainer import split_prompt_completion

    tok = basemodel._wrap_tokenizer(basemodel._train_tokenizer(pretrain_corpus(300, 0), 600))
    template = chat.ChatTemplate(tok.chat_template, tok.bos_token, tok.eos_token)
    conversations = [
        [{"role": "user", "content": TICKET}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": TICKET}],
        [{"role": "user", "content": "Ticket: hi\nTriage:"}, {"role": "assistant", "content": "category=account"},
         {"role": "user", "content": "  spaced   out\n"}],
    ]
    for messages in conversations:
        trained, _, _ = split_prompt_completion({"messages": [*messages, {"role": "assistant", "content": "x"}]}, tok)
        served = chat.chat_prompt(messages, template)
        assert trained == tok.bos_token + served
        assert tok(trained, add_special_tokens=False)["input_ids"] == tok(served, add_special_tokens=True)["input_ids"]
        assert tok.backend_tokenizer.encode(served, add_special_tokens=True).ids == \
            tok(trained, add_special_tokens=False)["input_ids"]


# -- client API keys -------------------------------------------------------------------------------
def test_client_keys_hashed_and_required_once_issued(start_gateway):
    gw = start_gateway()
    put_routes(gw, route("blue"))
    url = f"{gw.url}/v1/completions"
    body = {"model": "tuneship", "prompt": TICKET}
    assert httpx.post(url, json=body).status_code == 200  # no key issued yet: open (client_auth=auto)

    # The CLI prints the key once, on stdout, and stores only its SHA-256.
    out = gw.keys_cli("create", "--name", "alice", "--rpm", "0")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    m = re.fullmatch(r"sk-ts-([0-9a-f]{8})-[A-Za-z0-9_-]{43}", key)
    assert m, out.stdout
    key_id = m.group(1)
    assert key_id in out.stderr and key not in out.stderr
    assert stat.S_IMODE(os.stat(gw.keys_path).st_mode) == 0o600
    stored = json.loads(gw.keys_path.read_text())["keys"][key_id]
    assert stored["sha256"] == hashlib.sha256(key.encode()).hexdigest() and stored["name"] == "alice"
    assert key.split("-")[-1] not in gw.keys_path.read_text()
    listed = gw.keys_cli("list")
    assert key_id in listed.stdout and "alice" in listed.stdout and key not in listed.stdout

    # Keys now enforced: missing, wrong, tampered, admin token -> 401 OpenAI-style.
    for headers in ({}, bearer("sk-nope"), bearer(key[:-1] + ("A" if key[-1] != "A" else "B")),
                    bearer(key.replace(key_id, "0" * 8)), gw.admin, {"Authorization": f"Basic {key}"}):
        r = httpx.post(url, json=body, headers=headers)
        assert_openai_error(r, 401, "invalid_api_key", "authentication_error")
        assert r.headers["www-authenticate"] == "Bearer"
    # Authentication comes before parsing: a malformed body without a key is a 401.
    assert_openai_error(httpx.post(url, content=b"{", headers={"content-type": "application/json"}), 401)
    assert_openai_error(httpx.get(f"{gw.url}/v1/models"), 401)
    bad = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tuneship", messages=[{"role": "user", "content": TICKET}])

    good = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)
    assert [m.id for m in good.models.list()] == ["tuneship"]
    raw = good.completions.with_raw_response.create(model="tuneship", prompt=TICKET)
    assert raw.parse().choices[0].text == " " + ANSWER
    rec = logged(gw, raw.headers["x-request-id"])
    assert rec["key_id"] == key_id and rec["role"] == "live"

    # The admin token still pins a colour for release smoke (no client key needed there).
    r = httpx.post(url, json=body, headers={**gw.admin, "X-Tuneship-Target": "green"})
    assert r.status_code == 200 and "[llm_green]" in r.json()["choices"][0]["text"]

    # Revoked: refused on the very next request (the file is re-read when it changes), and
    # revoking the last key does not open the gateway again.
    assert gw.keys_cli("revoke", key_id).returncode == 0
    assert_openai_error(httpx.post(url, json=body, headers=bearer(key)), 401)
    assert_openai_error(httpx.post(url, json=body), 401)
    assert gw.keys_cli("revoke", "ffffffff").returncode == 1
    # Nothing secret in the logs.
    files = "".join(p.read_text() for p in gw.log_root.rglob("*.jsonl"))
    assert key not in files and key not in gw.logs()


def test_keys_ensure_is_idempotent_and_required_mode_refuses_without_keys(start_gateway, tmp_path):
    gw = start_gateway(TUNESHIP_GATEWAY_CLIENT_AUTH="required")
    put_routes(gw, route("blue"))
    assert_openai_error(httpx.post(f"{gw.url}/v1/completions", json={"model": "tuneship", "prompt": TICKET}), 401)
    save = gw.home / "gateway" / "client_key"
    first = gw.keys_cli("ensure", "--name", "demo", "--save", str(save))
    assert first.returncode == 0 and first.stdout == "" and "created" in first.stderr
    key = save.read_text().strip()
    assert stat.S_IMODE(os.stat(save).st_mode) == 0o600
    again = gw.keys_cli("ensure", "--name", "demo", "--save", str(save))
    assert again.returncode == 0 and "kept" in again.stderr and save.read_text().strip() == key
    assert len(json.loads(gw.keys_path.read_text())["keys"]) == 1
    r = httpx.post(f"{gw.url}/v1/completions", json={"model": "tuneship", "prompt": TICKET}, headers=bearer(key))
    assert r.status_code == 200, r.text


# -- rate limits -----------------------------------------------------------------------------------
def test_per_key_rate_limits(start_gateway):
    gw = start_gateway()
    put_routes(gw, route("blue"))
    slow_id, slow = gw.create_key("slow", rpm=3)
    _, other = gw.create_key("other", rpm=0)
    url = f"{gw.url}/v1/completions"
    body = {"model": "tuneship", "prompt": TICKET}
    assert [httpx.post(url, json=body, headers=bearer(slow)).status_code for _ in range(3)] == [200] * 3
    r = httpx.post(url, json=body, headers=bearer(slow))
    err = assert_openai_error(r, 429, "rate_limit_exceeded", "requests")
    assert slow_id in err["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 20  # 3 rpm: one request every 20 s
    # A limited request is refused before its body is even parsed.
    assert_openai_error(httpx.post(url, content=b"{", headers=bearer(slow)), 429)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=slow, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="tuneship", messages=[{"role": "user", "content": TICKET}])
    # Other keys have their own bucket.
    assert all(httpx.post(url, json=body, headers=bearer(other)).status_code == 200 for _ in range(10))
    assert metric(gw, "tuneship_gateway_rate_limited_total", key=slow_id) == 3
    assert metric(gw, "tuneship_gateway_requests_total", status="429") == 3

    # The bucket refills at rpm/60 per second: 120 rpm with a burst of 1 -> one per 0.5 s.
    _, fast = gw.create_key("burst1", rpm=120, burst=1)
    assert httpx.post(url, json=body, headers=bearer(fast)).status_code == 200
    r = httpx.post(url, json=body, headers=bearer(fast))
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    time.sleep(0.6)
    assert httpx.post(url, json=body, headers=bearer(fast)).status_code == 200


# -- request limits --------------------------------------------------------------------------------
def test_request_limits(start_gateway):
    gw = start_gateway(TUNESHIP_GATEWAY_MAX_BODY_BYTES="4096", TUNESHIP_GATEWAY_MAX_PROMPT_CHARS="1000",
                       TUNESHIP_GATEWAY_MAX_TOKENS_LIMIT="64")
    put_routes(gw, route("blue"))
    url = f"{gw.url}/v1/completions"
    chat_url = f"{gw.url}/v1/chat/completions"
    big = "x" * 5000
    # Declared length over the limit: 413 before the body is read.
    assert_openai_error(httpx.post(url, json={"model": "tuneship", "prompt": big}), 413, "request_too_large")
    assert_openai_error(httpx.post(chat_url, json={"model": "tuneship", "messages": [{"role": "user", "content": big}]}),
                        413, "request_too_large")

    # Chunked upload (no Content-Length): counted while it is received.
    def chunks():
        yield b'{"model": "tuneship", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    r = httpx.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_openai_error(r, 413, "request_too_large")
    r = httpx.put(f"{gw.url}/admin/routes", content=chunks(), headers={**gw.admin, "content-type": "application/json"})
    assert_openai_error(r, 413, "request_too_large")
    assert metric(gw, "tuneship_gateway_requests_total", status="413") == 3
    # Just under the body limit, over the prompt limit: 400 context_length_exceeded.
    err = assert_openai_error(httpx.post(url, json={"model": "tuneship", "prompt": "z" * 1001}), 400,
                              "context_length_exceeded")
    assert err["param"] == "prompt"
    err = assert_openai_error(httpx.post(chat_url, json={"model": "tuneship", "messages": [
        {"role": "user", "content": "z" * 990}]}), 400, "context_length_exceeded")  # 990 + "user: ...assistant:"
    assert err["param"] == "messages"
    # max_tokens over the limit, on both endpoints and both field names.
    err = assert_openai_error(httpx.post(url, json={"model": "tuneship", "prompt": "x", "max_tokens": 65}), 400)
    assert err["param"] == "max_tokens"
    err = assert_openai_error(httpx.post(chat_url, json={"model": "tuneship", "max_tokens": 65,
                                                         "messages": [{"role": "user", "content": "x"}]}), 400)
    assert err["param"] == "max_tokens"
    err = assert_openai_error(httpx.post(chat_url, json={"model": "tuneship", "max_completion_tokens": 0,
                                                         "messages": [{"role": "user", "content": "x"}]}), 400)
    assert err["param"] == "max_completion_tokens"
    assert httpx.post(url, json={"model": "tuneship", "prompt": TICKET, "max_tokens": 64}).status_code == 200
    # Malformed JSON, wrong shapes, unknown model on chat.
    assert_openai_error(httpx.post(chat_url, content=b'{"model": "tuneship", "messages": [',
                                   headers={"content-type": "application/json"}), 400, "invalid_json")
    err = assert_openai_error(httpx.post(chat_url, json={"model": "tuneship", "messages": [{"role": "robot",
                                                                                           "content": "x"}]}), 400)
    assert err["param"] == "messages"
    err = assert_openai_error(httpx.post(chat_url, json={"model": "tuneship"}), 400, "missing_required_parameter")
    assert err["param"] == "messages"
    assert_openai_error(httpx.post(chat_url, json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
                        404, "model_not_found")
    # A streaming request that fails validation answers with a status, not an event stream.
    r = httpx.post(chat_url, json={"model": "nope", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    assert_openai_error(r, 404, "model_not_found")
    # An upstream failure on a streaming request is still a proper status (the answer is complete before the stream).
    r = httpx.post(chat_url, json={"model": "tuneship", "stream": True,
                                   "messages": [{"role": "user", "content": "__fail__"}]})
    assert_openai_error(r, 502, "upstream_error")


# -- canary ----------------------------------------------------------------------------------------
def test_canary_weight_splits_live_traffic_and_is_recorded(start_gateway):
    from tuneship.monitor import candidate_responses

    gw = start_gateway()
    put_routes(gw, route("blue", version="1"), mirror_sample=0.0)
    url = f"{gw.url}/admin/canary"
    assert_openai_error(httpx.post(url, json={"weight": 30}), 401)
    assert_openai_error(httpx.post(url, json={"weight": 30}, headers=gw.admin), 409, "no_candidate")
    put_routes(gw, route("blue", version="1"), route("teal", "llm_missing"), mirror_sample=0.0)
    assert_openai_error(httpx.post(url, json={"weight": 30}, headers=gw.admin), 409, "model_not_ready")
    assert_openai_error(httpx.post(url, json={"weight": 101}, headers=gw.admin), 400)
    put_routes(gw, route("blue", version="1"), route("green", version="2"), mirror_sample=1.0)
    r = httpx.post(url, json={"weight": 30}, headers=gw.admin)
    assert r.status_code == 200 and r.json()["canary_weight"] == 30

    answered: dict[str, str] = {}
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        for i in range(200):
            r = c.post("/v1/completions", json={"model": "tuneship", "prompt": f"Ticket: refund #{i}\nTriage:"})
            assert r.status_code == 200, r.text
            model = re.search(r"\[(llm_\w+)\]", r.json()["choices"][0]["text"]).group(1)
            role = r.headers["x-tuneship-route"]
            assert (model, r.headers["x-tuneship-colour"]) in {("llm_blue", "blue"), ("llm_green", "green")}
            assert role == ("canary" if model == "llm_green" else "live")
            answered[r.headers["x-request-id"]] = role
    n_canary = sum(role == "canary" for role in answered.values())
    assert 30 <= n_canary <= 90, n_canary  # 30% of 200 = 60, sd 6.5
    assert metric(gw, "tuneship_gateway_requests_total", colour="green", role="canary", status="200") == n_canary
    assert metric(gw, "tuneship_gateway_requests_total", colour="blue", role="live", status="200") == 200 - n_canary
    assert metric(gw, "tuneship_gateway_completion_tokens_total", colour="green") == 3 * n_canary

    def all_logged():
        recs = [x for x in read_inference_log(gw.log_root) if x["request_id"] in answered]
        done = len(recs) == 200 and all(x["shadow"] is None or x["shadow"]["status"] != "pending" for x in recs)
        return recs if done else None

    recs = all_logged() or wait_for(all_logged)
    assert recs
    for rec in recs:
        assert rec["role"] == answered[rec["request_id"]]
        if rec["role"] == "canary":  # answered by the candidate, and not mirrored to itself
            assert (rec["live"]["colour"], rec["live"]["version"], rec["shadow"]) == ("green", "2", None)
        else:
            assert rec["live"]["colour"] == "blue" and rec["shadow"]["colour"] == "green"
    # The shadow verdict sees every candidate answer: the canary ones and the mirrored ones.
    assert len(candidate_responses(recs, "2")) == 200

    # 100 sends everything to the candidate; 0 nothing.
    assert httpx.post(url, json={"weight": 100}, headers=gw.admin).status_code == 200
    assert {httpx.post(f"{gw.url}/v1/completions", json={"model": "tuneship", "prompt": TICKET})
            .headers["x-tuneship-colour"] for _ in range(10)} == {"green"}
    # A new candidate never inherits the weight; a switch resets it.
    state = put_routes(gw, route("blue", version="1"), route("green", version="3"))
    assert state["canary_weight"] == 0
    assert httpx.post(url, json={"weight": 50}, headers=gw.admin).json()["canary_weight"] == 50
    assert put_routes(gw, route("blue", version="1"), route("green", version="3"))["canary_weight"] == 50
    s = httpx.post(f"{gw.url}/admin/switch", headers=gw.admin).json()
    assert s["canary_weight"] == 0 and s["live"]["colour"] == "green"
    assert {httpx.post(f"{gw.url}/v1/completions", json={"model": "tuneship", "prompt": TICKET})
            .headers["x-tuneship-route"] for _ in range(10)} == {"live"}


# -- PII redaction in the inference log ------------------------------------------------------------
PII_PROMPT = ("Ticket: refund to jane.doe@example.com, call +1 415 555 0134, card 4111 1111 1111 1111, "
              "api_key=abcd1234efgh5678ijkl, order 123456789\nTriage:")
REDACTED = ("Ticket: refund to [EMAIL], call [PHONE], card [CREDIT_CARD], "
            "[SECRET], order 123456789\nTriage:")
PII_ANSWER = "[llm_blue] category=billing priority=normal"


def test_pii_is_redacted_before_the_log_is_written(start_gateway, tmp_path):
    gw = start_gateway(home=tmp_path / "redacting", TUNESHIP_GATEWAY_REDACT_PII="true")
    put_routes(gw, route("blue"), route("green", version="2"), mirror_sample=1.0)
    r = httpx.post(f"{gw.url}/v1/chat/completions", timeout=30,
                   json={"model": "tuneship", "messages": [{"role": "user", "content": PII_PROMPT}]})
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == PII_ANSWER  # the client's answer is untouched
    rec = wait_for(lambda: (x := logged(gw, r.headers["x-request-id"])) and x["shadow"]["status"] == 200 and x)
    assert rec["prompt"] == f"user: {REDACTED}\nassistant:"
    assert rec["pii_redacted"] == ["credit_card", "email", "phone", "secret"]
    assert rec["shadow"]["pii_redacted"] == [] and rec["live"]["completion"] == " " + PII_ANSWER
    raw = "".join(p.read_text() for p in gw.log_root.rglob("*.jsonl"))
    for secret in ("jane.doe@example.com", "555 0134", "4111 1111", "abcd1234efgh5678ijkl"):
        assert secret not in raw

    # Without the option the same request is logged as sent (the control).
    plain = start_gateway(home=tmp_path / "plain")
    put_routes(plain, route("blue"))
    r = httpx.post(f"{plain.url}/v1/completions", json={"model": "tuneship", "prompt": PII_PROMPT}, timeout=30)
    rec = logged(plain, r.headers["x-request-id"])
    assert rec["prompt"] == PII_PROMPT and "pii_redacted" not in rec


def test_redactor_covers_completions_of_both_lines():
    from serving.gateway.pii import RecordRedactor, redact

    assert redact("nothing here, order 1234567890123") == ("nothing here, order 1234567890123", [])
    assert redact("key sk-ts-0123abcd-" + "a" * 43)[0] == "key [SECRET]"  # a pasted gateway key
    req = RecordRedactor(["email"])({"kind": "request", "prompt": "a@b.io", "live": {"completion": "mail c@d.io"},
                                     "shadow": {"status": "pending"}})
    assert (req["prompt"], req["live"]["completion"], req["pii_redacted"]) == ("[EMAIL]", "mail [EMAIL]", ["email"])
    sh = RecordRedactor()({"kind": "shadow", "shadow": {"completion": "call +44 20 7946 0958"}})
    assert sh["shadow"] == {"completion": "call [PHONE]", "pii_redacted": ["phone"]}
    with pytest.raises(ValueError, match="passport"):
        RecordRedactor(["passport"])
    with pytest.raises(ValueError, match="ZZ"):
        RecordRedactor(phone_regions=["ZZ"])


# -- the container entrypoint ----------------------------------------------------------------------
def test_uvicorn_app_attribute_serves(triton, tmp_path):
    """serving/docker/Dockerfile.gateway runs `uvicorn serving.gateway.app:app`."""
    from conftest import REPO
    from ports import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESHIP_")}
    env.update(TUNESHIP_HOME=str(tmp_path / "home"), TUNESHIP_TRITON_URL=triton.url)
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "serving.gateway.app:app", "--port", str(port),
                             "--log-level", "warning"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def live() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(live, timeout=60, interval=0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/health/ready").status_code == 503  # no routes in a fresh home
    finally:
        proc.terminate()
        proc.wait(timeout=20)
