"""Slack messages people can read at 3 AM: Block Kit that slack-sdk's own validation accepts,
one thread per release, the same blocks in the sink and on the Slack path.

The release stages run for real (MLflow on SQLite, the stage functions, the sink); the
gateway and Triton are the in-memory stand-ins tests/unit/test_refusals.py uses (the real
ones drive the same stages in tests/integration/). Slack's server cannot run here: for the
Slack path slack-sdk's real `WebClient` (its serialisation, its HTTP over a real loopback
socket) talks to a small stand-in that records each `chat.postMessage` body and answers as
Slack does (`{"ok": true, "channel": ..., "ts": ...}`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from slack_sdk.models.blocks import ActionsBlock, Block, ContextBlock, HeaderBlock, SectionBlock

from tuneship import notify as slack
from tuneship import registry
from tuneship.notify import notify, read_sink
from tuneship.stages import (
    Refusal,
    StageFailed,
    dataset_by_version,
    finish_release,
    guard_release,
    warm_up_candidate,
)
from tuneship.tasks import load_task

NAME = "tuneship-notify-test"  # the registered model of these tests
CTX = ("AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_DAG_RUN_ID", "AIRFLOW_CTX_TASK_ID")


def valid(blocks: list[dict[str, Any]]) -> list[Block]:
    """slack-sdk's validation of each block (lengths and counts: `validate_json` raises
    SlackObjectFormationError), the dicts exactly what its models serialise, plus the
    limits Slack enforces that slack-sdk does not check (fields' length, 50 blocks)."""
    assert 0 < len(blocks) <= 50
    parsed = [Block.parse(b) for b in blocks]
    for model, raw in zip(parsed, blocks, strict=True):
        model.validate_json()
        assert model.to_dict() == raw
        if isinstance(model, SectionBlock):
            assert all(len(f.text) <= 2000 for f in model.fields or [])
    return parsed


def kinds(msg: dict[str, Any]) -> list[type]:
    return [type(b) for b in valid(msg["blocks"])]


def fields_of(msg: dict[str, Any]) -> dict[str, str]:
    """The figures as a person reads them: label -> value."""
    out = {}
    for b in valid(msg["blocks"]):
        if isinstance(b, SectionBlock) and b.fields:
            for f in b.fields:
                label, _, value = f.text.partition("\n")
                out[label.strip("*")] = value
    return out


def buttons_of(msg: dict[str, Any]) -> dict[str, str]:
    return {e.text.text: e.url for b in valid(msg["blocks"]) if isinstance(b, ActionsBlock) for e in b.elements}


@pytest.fixture(scope="module")
def mlflow_home(tmp_path_factory: pytest.TempPathFactory):
    """A real MLflow registry (SQLite) with versions 1..3 of NAME, shared by the module."""
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("TUNESHIP_MLFLOW_ARTIFACTS", str(root / "artifacts"))
        for v in range(1, 4):
            run = registry.start_run(f"notify-test-{v}", run_name=f"v{v}")
            registry.register(run, f"notify-test-{v}", tags={"task": "llm"}, name=NAME, alias=None)
        yield root


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_home: Path) -> Path:
    """Each test its own sink; the module's registry; no Slack token, no Airflow run, no proxy."""
    monkeypatch.setenv("TUNESHIP_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{mlflow_home / 'mlflow.db'}")
    monkeypatch.setenv("TUNESHIP_MLFLOW_ARTIFACTS", str(mlflow_home / "artifacts"))
    for var in (*CTX, "SLACK_BOT_TOKEN", "TUNESHIP_SLACK_BASE_URL", "TUNESHIP_AIRFLOW_URL", "AIRFLOW__API__BASE_URL",
                "TUNESHIP_MLFLOW_UI_URL", "TUNESHIP_SLACK_CHANNEL", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    yield tmp_path
    for msg in read_sink():  # whatever a test sent: valid Block Kit, never the text-only fallback
        assert "blocks_error" not in msg, msg["blocks_error"]
        valid(msg["blocks"])


class Gateway:
    """The gateway hook's methods the release stages call, on an in-memory route table."""

    def __init__(self, routes: dict[str, Any]) -> None:
        self.state = dict(routes)

    def routes(self) -> dict[str, Any]:
        return dict(self.state)

    def put_routes(self, routes: dict[str, Any]) -> dict[str, Any]:
        self.state = dict(routes)
        return self.routes()

    def switch(self) -> dict[str, Any]:
        s = self.state
        self.state = {**s, "live": s["shadow"], "shadow": None, "previous": s.get("live")}
        return self.routes()

    def rollback(self) -> dict[str, Any]:
        s = self.state
        self.state = {**s, "live": s["previous"], "previous": None}
        return self.routes()


class Triton:
    def __init__(self, *ready: str, warm_up_error: str | None = None) -> None:
        self.ready, self.warm_up_error = set(ready), warm_up_error

    def is_ready(self, model: str) -> bool:
        return model in self.ready

    def load(self, model: str, timeout: float = 180.0) -> None:
        self.ready.add(model)

    def unload(self, model: str) -> None:
        self.ready.discard(model)

    def warm_up(self, model: str, prompts: list[str]) -> dict[str, Any]:
        raise RuntimeError(self.warm_up_error or "no")


BLUE = {"colour": "blue", "model": "llm_blue", "version": "1"}
GREEN = {"colour": "green", "model": "llm_green", "version": "2"}
PLAN = {"task": "llm", "registered_model": NAME, "model": "llm_green", "version": "2", "colour": "green",
        "previous_version": "1", "previous_colour": "blue"}
VERDICT = {"verdict": "promote", "requests": 240, "error_rate": 0.004, "p95_ms": 182.4, "reasons": []}


def test_a_release_is_one_thread_of_valid_block_kit(monkeypatch):
    """Promoted, the guard could not judge, then breached and rolled back: three stages of
    release llm v2, driven through the real stage functions, in one thread; each message
    has the header, the key figures and the buttons a person needs at 3 AM."""
    monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "llm_release")
    monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "asset_triggered__2026-12-01T03:00:00+00:00")
    monkeypatch.setenv("AIRFLOW_CTX_TASK_ID", "decide")
    monkeypatch.setenv("TUNESHIP_AIRFLOW_URL", "https://airflow.example.com/")
    monkeypatch.setenv("TUNESHIP_MLFLOW_UI_URL", "https://mlflow.example.com")
    registry.set_alias("champion", "1", NAME)
    gateway, triton = Gateway({"live": BLUE, "shadow": GREEN}), Triton("llm_blue", "llm_green")

    finish_release(PLAN, "shadow", VERDICT, gateway=gateway, triton=triton)
    guard_release(PLAN, {"verdict": "insufficient", "reasons": ["only 3 live responses"], "requests": 3},
                  retention_minutes=60, gateway=gateway, triton=triton)
    breach = {"verdict": "breach", "reasons": ["p95 latency 900 ms > 500 ms"], "requests": 80,
              "error_rate": 0.01, "p95_ms": 900.0}
    with pytest.raises(Refusal, match="rolled back"):
        guard_release(PLAN, breach, retention_minutes=60, gateway=gateway, triton=triton)

    live, unsure, rolled = read_sink()
    for msg in (live, unsure, rolled):
        assert kinds(msg)[:2] == [HeaderBlock, SectionBlock] and kinds(msg)[-2:] == [ContextBlock, ActionsBlock]
        assert msg["thread"] == "llm-v2"
        assert buttons_of(msg) == {
            "Airflow run": "https://airflow.example.com/dags/llm_release/runs/"
                           "asset_triggered__2026-12-01T03%3A00%3A00%2B00%3A00/tasks/decide",
            "MLflow v2": f"https://mlflow.example.com/#/models/{NAME}/versions/2"}
    assert live["parent"] is None and unsure["parent"] == live["id"] and rolled["parent"] == live["id"]
    assert not unsure["reply_broadcast"] and rolled["reply_broadcast"]  # the one a person must act on
    assert live["blocks"][0]["text"]["text"] == ":white_check_mark: llm v2: live on green"
    assert rolled["blocks"][0]["text"]["text"] == ":rotating_light: llm v2: post-switch guard breached"
    assert fields_of(live) == {"Task": "llm", "Version": "2", "Colour": "green", "Live before": "blue v1",
                               "Requests": "240", "Error rate": "0.004", "p95 ms": "182.4"}
    assert fields_of(rolled)["p95 ms"] == "900" and fields_of(rolled)["Requests"] == "80"
    verdict_line = rolled["blocks"][1]["text"]["text"]
    assert "900 ms &gt; 500 ms" in verdict_line and "blue v1 again" in verdict_line  # Slack's escaping
    assert "p95 latency 900 ms > 500 ms" in rolled["text"]  # the sink's plain text as before
    assert "`llm_release` / `asset_triggered__2026-12-01T03:00:00+00:00` / `decide`" in \
        json.dumps(rolled["blocks"][-2], ensure_ascii=False)


def test_held_and_rolled_back_releases_each_have_their_own_thread():
    gateway, triton = Gateway({"live": BLUE, "shadow": GREEN}), Triton("llm_blue", "llm_green")
    plan3 = {**PLAN, "version": "3"}
    with pytest.raises(Refusal, match="held"):
        finish_release(plan3, "shadow", {**VERDICT, "verdict": "hold", "reasons": ["format rate undecided"]},
                       gateway=gateway, triton=triton)
    with pytest.raises(Refusal, match="rolled back"):
        finish_release(PLAN, "shadow", {**VERDICT, "verdict": "rollback", "reasons": ["p95 40 ms > 1 ms"]},
                       gateway=Gateway({"live": BLUE, "shadow": GREEN}), triton=triton)
    with pytest.raises(Refusal, match="rolled back"):  # a second try of v3's decision task
        finish_release(plan3, "shadow", {**VERDICT, "verdict": "rollback", "reasons": ["p95 40 ms > 1 ms"]},
                       gateway=gateway, triton=triton)
    held, v2, v3 = read_sink()
    assert (held["thread"], v2["thread"], v3["thread"]) == ("llm-v3", "llm-v2", "llm-v3")
    assert held["parent"] is None and v2["parent"] is None and v3["parent"] == held["id"]
    assert held["level"] == "warning" and held["title"] == "llm v3: held for a person after the shadow window"
    assert list(buttons_of(held)) == ["MLflow v3"]  # outside Airflow: no run to link


def test_a_failed_automatic_rollback_is_broadcast_into_its_release_thread():
    class Broken(Gateway):
        def rollback(self) -> dict[str, Any]:
            raise RuntimeError("HTTP 503 from /admin/rollback")

    gateway = Broken({"live": GREEN, "previous": BLUE})
    notify("llm v2 is live on green", level="success", thread="llm-v2", task="llm")
    breach = {"verdict": "breach", "reasons": ["error rate 0.2 > 0.05"], "requests": 50, "error_rate": 0.2}
    with pytest.raises(RuntimeError, match="503"):
        guard_release(PLAN, breach, retention_minutes=60, gateway=gateway, triton=Triton("llm_blue", "llm_green"))
    first, alert = read_sink()
    assert alert["parent"] == first["id"] and alert["reply_broadcast"] and alert["level"] == "error"
    assert alert["title"] == "llm v2: automatic rollback FAILED, act now"
    assert fields_of(alert)["Error rate"] == "0.2" and "POST /admin/rollback" in alert["blocks"][1]["text"]["text"]


def test_refusals_outside_a_release_thread_still_carry_figures():
    task = load_task("triage")
    with pytest.raises(Refusal):
        dataset_by_version(task, "20990101-nope")
    with pytest.raises(StageFailed):
        warm_up_candidate(task, "triage_green", Triton(warm_up_error="model triage_green is not ready"))
    from tuneship.batch import BatchError, plan_batch

    with pytest.raises(BatchError, match="no champion"):
        plan_batch(task)
    missing, warm, batch = read_sink()
    assert missing["thread"] is None and missing["title"] == "triage: no dataset version 20990101-nope"
    assert fields_of(missing) == {"Task": "triage", "Dataset version": "20990101-nope"}
    assert fields_of(warm) == {"Task": "triage", "Model": "triage_green"} and "not ready" in warm["text"]
    assert batch["title"] == "triage: batch inference refused" and batch["level"] == "error"
    assert all(kinds(m)[-1] is ContextBlock for m in (missing, warm, batch))  # no buttons: no links known


def test_long_texts_many_fields_and_links_are_trimmed_not_rejected():
    text = "gate FAIL " + "x" * 9000 + "\nsecond line"
    figures = {f"metric_{i:02d}": "y" * 5000 for i in range(35)}
    links = {f"link {i} " + "z" * 100: f"https://example.com/{i}" for i in range(30)}
    links["a file"] = "/tmp/report.json"  # not a URL: no button
    msg = notify(text, level="error", title="t" * 400, figures=figures, links=links, thread="big-v1",
                 task="big", report="/tmp/report.json")
    header, verdict, first, second, context, actions = valid(msg["blocks"])
    assert isinstance(header, HeaderBlock) and len(header.text.text) == 150 and header.text.text.endswith("…")
    assert len(verdict.text.text) == 3000 and verdict.text.text.endswith("…")
    assert len(first.fields) == len(second.fields) == 10 and all(len(f.text) <= 300 for f in first.fields)
    assert second.fields[-1].text.startswith("*+16 more*\nmetric_19, metric_20")
    assert isinstance(context, ContextBlock) and "report: `/tmp/report.json`" in context.elements[-1].text
    assert len(actions.elements) == 5 and all(len(e.text.text) <= 75 for e in actions.elements)
    assert read_sink()[-1]["text"].endswith("second line")  # the fallback text keeps it all


def test_key_figures_default_to_the_scalar_fields():
    msg = notify("v4 is live on green", level="success", version="4", task="llm", verdict={"requests": 3},
                 rate=0.12345678, big=1234567, ok=True, none=None)
    assert fields_of(msg) == {"version": "4", "task": "llm", "rate": "0.1235", "big": "1,234,567", "ok": "yes"}
    assert msg["fields"]["verdict"] == {"requests": 3}  # kept whole in the sink


def test_report_buttons_only_for_reports_a_server_publishes(home, monkeypatch):
    monkeypatch.setenv("TUNESHIP_AIRFLOW_URL", "https://airflow.example.com")
    page = home / "reports" / "demo-20261201-030000.html"
    assert slack.report_url(page) == "https://airflow.example.com/tuneship/reports/demo-20261201-030000.html"
    assert slack.report_url("https://grafana.example.com/d/x") == "https://grafana.example.com/d/x"
    assert slack.report_url(home / "artifacts" / "report.html") is None  # no server publishes it
    msg = notify("demo done", level="success", links=slack.release_links(NAME, 3, page), thread="demo-v3")
    assert list(buttons_of(msg)) == ["Report", "MLflow v3"]


NOTIFY_IN_A_PROCESS = """
import sys, time
from tuneship.notify import notify
time.sleep(max(0.0, float(sys.argv[4]) - time.time()))  # all imported, then all at once
m = notify(sys.argv[1], level=sys.argv[2], thread=sys.argv[3])
print(m["delivered"], m["parent"] or "-", m.get("thread_ts") or "-")
"""


def _notify_in_process(text: str, level: str, thread: str, start_at: float = 0.0) -> subprocess.Popen:
    """notify from another process, as each Airflow task is."""
    return subprocess.Popen([sys.executable, "-c", NOTIFY_IN_A_PROCESS, text, level, thread, str(start_at)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())


class _Slack(BaseHTTPRequestHandler):
    """Answers chat.postMessage as Slack does; records each request's path, auth and body."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        time.sleep(server.delay)  # Slack's answer takes a while
        server.posts.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if server.error:
            answer = {"ok": False, "error": server.error}
        else:
            answer = {"ok": True, "channel": "C0RELEASES", "ts": f"1764558000.{len(server.posts):06d}",
                      "message": {"text": body.get("text")}}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def slack_api(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Slack)
    server.posts, server.error, server.delay = [], None, 0.0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-test-token")
    monkeypatch.setenv("TUNESHIP_SLACK_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/api")
    yield server
    server.shutdown()
    server.server_close()


def test_one_thread_parent_across_processes_that_notify_at_once(slack_api):
    """Four task processes of one release notify at the same moment while Slack takes 0.3 s
    to answer each post: still one parent, and every other post replies to it."""
    slack_api.delay = 0.3
    start_at = time.time() + 8  # after every process has imported slack-sdk
    procs = [_notify_in_process(f"stage {i}", "info", "race-v1", start_at) for i in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.startswith("slack "), err
    msgs = read_sink()
    assert len(msgs) == 4 and all(m["thread"] == "race-v1" for m in msgs)
    roots = [m for m in msgs if m["parent"] is None]
    assert len(roots) == 1 and roots[0] is msgs[0]  # the first line written is the parent
    assert all(m["parent"] == roots[0]["id"] for m in msgs[1:])
    posted = [p["body"] for p in slack_api.posts]
    assert [b.get("thread_ts") for b in posted] == [None, *[roots[0]["slack"]["ts"]] * 3]


def test_slack_path_posts_the_sink_blocks_and_replies_in_the_release_thread(slack_api):
    gateway, triton = Gateway({"live": BLUE, "shadow": GREEN}), Triton("llm_blue", "llm_green")
    registry.set_alias("champion", "1", NAME)
    finish_release(PLAN, "shadow", VERDICT, gateway=gateway, triton=triton)
    out, err = _notify_in_process("v2 serving <!channel> check", "error", "llm-v2").communicate(timeout=120)
    assert out.split() == ["slack", read_sink()[0]["id"], "1764558000.000001"], err  # another process
    notify("unrelated", level="info")

    first, reply, plain = (p["body"] for p in slack_api.posts)
    assert {p["path"] for p in slack_api.posts} == {"/api/chat.postMessage"}
    assert {p["auth"] for p in slack_api.posts} == {"Bearer xoxb-test-token"}
    sink = read_sink()
    for posted, recorded in zip((first, reply, plain), sink, strict=True):
        assert posted["blocks"] == recorded["blocks"] and recorded["delivered"] == "slack"
        assert posted["text"] == slack.escape(recorded["text"])
        valid(posted["blocks"])
    assert first["channel"] == "#ml-releases" and "thread_ts" not in first
    assert sink[0]["slack"] == {"ts": "1764558000.000001", "channel": "C0RELEASES"}
    assert reply["thread_ts"] == "1764558000.000001" and reply["channel"] == "C0RELEASES"
    assert reply["reply_broadcast"] is True  # an error: shown in the channel too
    assert "&lt;!channel&gt;" in reply["text"]  # never pings the channel by accident
    assert "thread_ts" not in plain and "reply_broadcast" not in plain
    assert sink[1]["thread_ts"] == "1764558000.000001" and sink[1]["parent"] == sink[0]["id"]


def test_slack_refusing_a_post_is_recorded_and_the_thread_starts_at_the_next_delivered_one(slack_api):
    slack_api.error = "channel_not_found"
    first = notify("first", level="info", thread="x-v1")
    assert first["delivered"] == "failed: channel_not_found" and "slack" not in first
    slack_api.error = None
    second = notify("second", level="info", thread="x-v1")
    third = notify("third", level="warning", thread="x-v1")
    posted = [p["body"] for p in slack_api.posts]
    assert "thread_ts" not in posted[1] and posted[2]["thread_ts"] == second["slack"]["ts"]
    assert "reply_broadcast" not in posted[2]  # a warning stays in the thread
    assert second["parent"] == third["parent"] == first["id"]  # the sink's thread still starts at the first
