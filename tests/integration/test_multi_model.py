"""Two served models side by side behind one gateway (issue 11): a `triage` task on
`triage_blue`/`triage_green` and a chat `faq` task on `faq_blue`/`faq_green`, real Triton, the
real gateway over loopback, the `openai` SDK as the client.

Each model is answered by its own live colour; `/v1/models` lists both; a switch, rollback
or canary of one leaves the other's routes file byte for byte (and its generation and
answers) untouched; an unknown model is a 404 naming the served ones; each request lands in
its own model's inference-log partition."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
from gateway_helpers import metric, wait_for
from test_gateway import assert_openai_error, route

from tuneship.inference_log import read_inference_log, served_models

pytestmark = pytest.mark.integration

TRIAGE_PROMPT = "Ticket: I was charged twice for my order\nTriage:"
MODELS = ("triage_blue", "triage_green", "faq_blue", "faq_green")


@pytest.fixture
def two_models(triton, gateway):
    for name in MODELS:
        triton.add_echo_model(name)
    for model, live, shadow in (("triage", "triage_blue", "triage_green"), ("faq", "faq_green", "faq_blue")):
        r = httpx.put(f"{gateway.url}/admin/routes", params={"model": model}, headers=gateway.admin, timeout=10,
                      json={"live": route(live.split("_")[1], live), "shadow": route(shadow.split("_")[1], shadow,
                                                                                      version="2"),
                            "mirror_sample": 1.0 if model == "triage" else 0.0})
        assert r.status_code == 200, r.text
        assert r.json()["served_model"] == model and r.json()["generation"] == 1  # its own generation
    return gateway


def routes_file(gw, model: str) -> bytes:
    return (gw.home / "gateway" / "routes" / f"{model}.json").read_bytes()


def answered_by(client: openai.OpenAI, model: str) -> str:
    if model == "faq":
        text = client.chat.completions.create(
            model="faq", messages=[{"role": "user", "content": "How do I reset my password?"}]
        ).choices[0].message.content
    else:
        text = client.completions.create(model=model, prompt=TRIAGE_PROMPT, max_tokens=8).choices[0].text
    m = re.search(r"\[(\w+)\]", text or "")
    assert m, text
    return m.group(1)


def admin(gw, verb: str, model: str | None, params: dict | None = None, **kw) -> httpx.Response:
    params = {**({"model": model} if model else {}), **(params or {})}
    return httpx.post(f"{gw.url}/admin/{verb}", params=params, headers=gw.admin, timeout=10, **kw)


def test_two_served_models_side_by_side(two_models):
    gw = two_models
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-anything", max_retries=0)

    # Discovery and answers: each model by its own live colour.
    assert sorted(m.id for m in client.models.list()) == ["faq", "triage"]
    assert client.models.retrieve("faq").id == "faq"
    assert answered_by(client, "triage") == "triage_blue"
    assert answered_by(client, "faq") == "faq_green"
    v = httpx.get(f"{gw.url}/version").json()
    assert {n: (x["colour"], x["triton_model"]) for n, x in v["served_models"].items()} == {
        "faq": ("green", "faq_green"), "triage": ("blue", "triage_blue")}
    assert "colour" not in v  # several models and none chosen: no top-level guess
    assert httpx.get(f"{gw.url}/version", params={"model": "faq"}).json()["triton_model"] == "faq_green"
    ready = httpx.get(f"{gw.url}/health/ready")
    assert ready.status_code == 200, ready.text
    assert {n: e["status"] for n, e in ready.json()["models"].items()} == {"faq": "ready", "triage": "ready"}

    # Unknown model: OpenAI's 404, naming the served models. Missing model: 400.
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="triag", prompt="x")
    assert exc.value.code == "model_not_found" and "faq, triage" in str(exc.value)
    assert_openai_error(httpx.post(f"{gw.url}/v1/completions", json={"prompt": "x"}), 400,
                        "missing_required_parameter")
    assert_openai_error(httpx.get(f"{gw.url}/v1/models/nope"), 404, "model_not_found")

    # Admin calls must name the model once there are two.
    err = assert_openai_error(httpx.get(f"{gw.url}/admin/routes", headers=gw.admin), 400, "model_required")
    assert "faq, triage" in err["message"]
    assert_openai_error(admin(gw, "switch", None), 400, "model_required")
    assert_openai_error(admin(gw, "rollback", "nope"), 404, "model_not_found")
    assert_openai_error(httpx.get(f"{gw.url}/admin/routes", params={"model": "Bad Name"}, headers=gw.admin),
                        400, "invalid_value")
    # A body naming another model than ?model= is refused (no renaming through a PUT).
    faq_state = httpx.get(f"{gw.url}/admin/routes", params={"model": "faq"}, headers=gw.admin).json()
    assert_openai_error(httpx.put(f"{gw.url}/admin/routes", params={"model": "triage"}, headers=gw.admin,
                                  json=faq_state), 400)

    # Switch, rollback and canary on triage: faq's file, generation and answers untouched.
    faq_before = routes_file(gw, "faq")
    r = admin(gw, "switch", "triage", params={"colour": "green"})
    assert r.status_code == 200, r.text
    assert r.json()["live"]["model"] == "triage_green" and r.json()["generation"] == 2
    assert answered_by(client, "triage") == "triage_green"
    assert answered_by(client, "faq") == "faq_green"
    r = admin(gw, "rollback", "triage")
    assert r.status_code == 200 and r.json()["live"]["model"] == "triage_blue"
    assert answered_by(client, "triage") == "triage_blue"
    # ...the candidate back in shadow, then 100 % canary: triage answered by green, faq not touched.
    triage = httpx.get(f"{gw.url}/admin/routes", params={"model": "triage"}, headers=gw.admin).json()
    r = httpx.put(f"{gw.url}/admin/routes", params={"model": "triage"}, headers=gw.admin,
                  json={**triage, "shadow": route("green", "triage_green", version="2")})
    assert r.status_code == 200, r.text
    assert admin(gw, "canary", "triage", json={"weight": 100}).status_code == 200
    assert answered_by(client, "triage") == "triage_green"
    assert answered_by(client, "faq") == "faq_green"
    assert routes_file(gw, "faq") == faq_before

    # And the other way round: a switch of faq leaves triage's file as it is.
    triage_before = routes_file(gw, "triage")
    r = admin(gw, "switch", "faq")
    assert r.status_code == 200 and r.json()["live"]["model"] == "faq_blue" and r.json()["generation"] == 2
    assert answered_by(client, "faq") == "faq_blue"
    assert answered_by(client, "triage") == "triage_green"  # still its canary
    assert routes_file(gw, "triage") == triage_before

    # Per-model metrics.
    assert metric(gw, "tuneship_gateway_requests_total", served_model="faq", status="200") == 4
    assert metric(gw, "tuneship_gateway_requests_total", served_model="triage", colour="green", status="200") == 3

    # The inference log: one partition per served model, each record naming its model.
    def logged() -> tuple[list[dict], list[dict]] | None:
        t = read_inference_log(gw.log_root, model="triage"), read_inference_log(gw.log_root, model="faq")
        return t if len(t[0]) == 5 and len(t[1]) == 4 else None

    triage_recs, faq_recs = wait_for(logged)
    assert {r["served_model"] for r in triage_recs} == {"triage"}
    assert {r["served_model"] for r in faq_recs} == {"faq"}
    assert {r["live"]["model"] for r in faq_recs} == {"faq_green", "faq_blue"}
    assert served_models(gw.log_root) == ["faq", "triage"]
    assert len(read_inference_log(gw.log_root)) == 9  # no model: every partition
    # triage mirrored its first request to its own shadow, and only there.
    first = triage_recs[0]
    assert first["shadow"]["colour"] == "green" and first["shadow"]["model"] == "triage_green"
    assert all(r["shadow"] is None for r in faq_recs)  # faq's mirror sample is 0


def test_hook_and_cli_act_on_one_model(two_models, tmp_path):
    """GatewayAdmin (what the Airflow GatewayHook delegates to) and `tuneship rollback --model`."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tuneship.gateway_admin import GatewayAdmin, GatewayAdminError

    gw = two_models
    with GatewayAdmin(gw.url, gw.admin_token, served_model="faq") as faq, \
            GatewayAdmin(gw.url, gw.admin_token) as anyone:
        with pytest.raises(GatewayAdminError) as exc:
            anyone.routes()
        assert exc.value.status == 400 and exc.value.code == "model_required"
        assert faq.routes()["live"]["model"] == "faq_green"
        triage_before = routes_file(gw, "triage")
        assert faq.switch(colour="blue")["live"]["model"] == "faq_blue"
        assert faq.version()["triton_model"] == "faq_blue"
        assert routes_file(gw, "triage") == triage_before

    base = {k: v for k, v in os.environ.items() if not k.startswith(("TUNESHIP_", "AIRFLOW"))}
    env = {**base, "TUNESHIP_GATEWAY_URL": gw.url, "TUNESHIP_GATEWAY_ADMIN_TOKEN": gw.admin_token,
           "TUNESHIP_HOME": str(tmp_path / "cli-home"), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    cli = [str(Path(sys.executable).parent / "tuneship")]
    r = subprocess.run([*cli, "rollback", "--yes"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--model" in r.stderr, r.stderr  # several models: say which
    r = subprocess.run([*cli, "rollback", "--yes", "--model", "faq", "--json"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["live"]["model"] == "faq_green"
    assert routes_file(gw, "triage") == triage_before
    r = subprocess.run([*cli, "status", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    models = json.loads(r.stdout)["models"]
    assert {n: m["routes"]["live"]["model"] for n, m in models.items()} == {"faq": "faq_green",
                                                                           "triage": "triage_blue"}
