"""The Deployments page in the Airflow UI (the plugin, behind Airflow's login), in a real
browser: each panel renders the state this test wrote where the loop writes it (the
gateway's routes file, a canary window's state and per-poll bounds, an evaluation, the drift
governor's log, the audit trail, a model card), and a task with nothing yet says so."""

from __future__ import annotations

import json
import time
from urllib.parse import urlparse

import httpx
import pytest

from tuneship import audit, config

pytestmark = pytest.mark.browser

SINCE = 1764600000.0


def metric(name: str, est: float, lo: float, hi: float, threshold: float, status: str) -> dict:
    return {"name": name, "rule": f"{name} <= {threshold}", "estimate": est, "interval": [lo, hi],
            "threshold": threshold, "status": status}


@pytest.fixture(scope="module")
def deployed(airflow_ui):
    home = config.home()
    routes = home / "gateway" / "routes" / "triage.json"
    routes.parent.mkdir(parents=True, exist_ok=True)
    route = {"colour": "blue", "model": "triage_blue", "version": "3", "deployed_at": "2026-12-01T09:00:00Z"}
    routes.write_text(json.dumps({"schema_version": 1, "generation": 9, "updated_at": "2026-12-01T10:00:00+00:00",
                                  "served_model": "triage", "live": route,
                                  "shadow": {**route, "colour": "green", "model": "triage_green", "version": "4",
                                             "deployed_at": "2026-12-01T10:00:00Z"},
                                  "previous": None, "mirror_sample": 1.0, "canary_weight": 25}))
    windows = home / "monitor" / "windows" / "triage"
    windows.mkdir(parents=True, exist_ok=True)
    state = windows / f"canary-v4-{SINCE:.3f}.json"
    state.write_text("{}")
    with open(state.with_suffix(".history.jsonl"), "w") as f:
        for n, (lo, hi) in zip((10, 40, 90), ((0.0, 0.61), (0.0, 0.18), (0.0, 0.0071)), strict=True):
            f.write(json.dumps({"at": SINCE + n, "requests": n, "verdict": "continue" if n < 90 else "promote",
                                "metrics": [metric("error_rate", 0.0, lo, hi, 0.01, "good" if n == 90 else "open"),
                                            metric("p95_ms", 420.0, 300.0, 600.0, 5000.0, "good")]}) + "\n")
    evals = config.artifacts() / "tasks" / "triage" / "evals"
    evals.mkdir(parents=True, exist_ok=True)
    (evals / "v4.json").write_text(json.dumps({"passed": True, "reference_name": "champion v3", "gates": [
        {"suite": "triage@v3", "metric": "category_accuracy", "unit": "share", "rule": "vs reference",
         "threshold": -0.1, "value": 0.925, "low": 0.801, "high": 0.974, "n": 40, "reference": 0.775,
         "diff": 0.15, "diff_low": -0.01, "diff_high": 0.308, "p_value": 0.07, "verdict": "pass", "reason": ""}]}))
    gov = home / "monitor" / "triage" / "governor.jsonl"
    gov.parent.mkdir(parents=True, exist_ok=True)
    gov.write_text(json.dumps({"at": time.time() - 600, "score": 0.31, "drifted": True, "fire": True,
                               "reason": "fired: drifted on 1 check in a row (debounce 1)"}) + "\n")
    audit.record("switch", task="triage", version="3", reason="shadow window: every bound on the good side",
                 actor="airflow:llm_release/decide", figures={"requests": 412})
    audit.record("canary_step", task="triage", version="4", reason="step 25 % passed", actor="airflow:llm_release/canary")
    cards = home / "reports"
    cards.mkdir(parents=True, exist_ok=True)
    (cards / "model-card-triage-v4.html").write_text("<html><body><h1>Model card: tuneship-triage v4</h1></body></html>")
    return airflow_ui


def test_anonymous_callers_do_not_see_deployments(deployed):
    r = httpx.get(f"{deployed.base_url}/tuneship/deployments/", timeout=30)
    assert r.status_code == 401 and "triage_green" not in r.text


def test_every_panel_shows_what_the_loop_wrote(page, deployed, screenshot):
    page.goto(f"{deployed.base_url}/tuneship/deployments/")
    assert urlparse(page.url).path.rstrip("/") == "/auth/login"
    deployed.sign_in(page)
    page.wait_for_url(f"{deployed.base_url}/tuneship/deployments/")
    screenshot("deployments")
    triage = page.locator("#task-triage")
    serving = triage.locator("table").first
    assert "blue v3 (since 2026-12-01T09:00:00Z)" in serving.inner_text()
    assert "green v4" in serving.inner_text() and "25 %" in serving.inner_text()
    assert triage.get_by_role("heading", name="Window: canary of v4").is_visible()
    assert "90 requests; verdict so far: promote" in triage.inner_text()
    assert triage.get_by_role("img", name="window bounds over requests").is_visible()
    assert triage.get_by_role("img", name="window bounds over requests").evaluate("i => i.naturalWidth") > 300
    assert triage.get_by_role("heading", name="Last gates: v4 against champion v3").is_visible()
    assert "category_accuracy" in triage.inner_text() and "0.925" in triage.inner_text()
    drift = triage.get_by_role("heading", name="Drift").locator("xpath=following-sibling::table[1]")
    assert "0.310" in drift.inner_text() and "retrain" in drift.inner_text()
    trail = triage.get_by_role("heading", name="Audit trail").locator("xpath=following-sibling::table[1]")
    text = trail.inner_text()
    assert "airflow:llm_release/decide" in text and "canary_step" in text and "BROKEN" not in text
    # nothing served for faq yet: each panel says so
    faq = page.locator("#task-faq").inner_text()
    assert "nothing served yet" in faq and "no release window yet" in faq and "no drift check yet" in faq
    triage.get_by_role("link", name="model-card-triage-v4.html").click()
    page.wait_for_url(f"{deployed.base_url}/tuneship/reports/model-card-triage-v4.html")
    assert page.get_by_role("heading", name="Model card: tuneship-triage v4").is_visible()


def test_an_edited_audit_record_shows_as_broken(page, deployed):
    path = audit.audit_path()
    lines = path.read_text().splitlines()
    rec = json.loads(lines[-1])
    rec["reason"] = "step 100 % passed"  # edited after the fact
    path.write_text("\n".join([*lines[:-1], json.dumps(rec)]) + "\n")
    page.goto(f"{deployed.base_url}/tuneship/deployments/")
    if urlparse(page.url).path.rstrip("/") == "/auth/login":
        deployed.sign_in(page)
        page.wait_for_url(f"{deployed.base_url}/tuneship/deployments/")
    trail = page.locator("#task-triage").get_by_role("heading", name="Audit trail") \
        .locator("xpath=following-sibling::table[1]")
    assert "BROKEN" in trail.inner_text() and "step 100 % passed" in trail.inner_text()
