"""Slack sink, colour choice, and the atomic hand-over into Triton's repository."""

from __future__ import annotations

from pathlib import Path

from tuneship import config
from tuneship.notify import notify, read_sink
from tuneship.stages import idle_colour, stage_into_repository


def test_notify_without_token_writes_sink(monkeypatch):
    monkeypatch.delenv("SLACK_BOT_TOKEN", raising=False)
    before = len(read_sink())
    msg = notify("model v3 rolled back: p95 too high", level="error", version="3")
    assert msg["delivered"] == "sink"
    after = read_sink()
    assert len(after) == before + 1 and "rolled back" in after[-1]["text"] and after[-1]["fields"]["version"] == "3"


def test_notify_survives_an_unreachable_slack(monkeypatch):
    """A network failure (here: the HTTPS proxy slack-sdk reads from the environment refuses
    the connection, on loopback) is recorded in the sink; the release it reports on goes on."""
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-not-a-real-token")
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NO_PROXY", "")
    msg = notify("v4 is live on green", level="success", version="4")
    assert msg["delivered"].startswith("failed: URLError") and "refused" in msg["delivered"]
    last = read_sink()[-1]
    assert last["text"].endswith("v4 is live on green") and last["delivered"] == msg["delivered"]


def test_idle_colour():
    assert idle_colour({}) == "blue"
    assert idle_colour({"live": {"colour": "blue"}}) == "green"
    assert idle_colour({"live": {"colour": "green"}}) == "blue"


def test_stage_into_repository_renames_and_replaces(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TUNESHIP_TRITON_REPOSITORY", str(tmp_path / "repo"))
    pkg = tmp_path / "pkg"
    (pkg / "1").mkdir(parents=True)
    (pkg / "config.pbtxt").write_text('name: "llm"\nbackend: "python"\n')
    (pkg / "1" / "model.onnx").write_text("v1")
    name = stage_into_repository(str(pkg), "llm_green")
    repo = config.triton_repository()
    assert name == "llm_green"
    assert (repo / "llm_green" / "config.pbtxt").read_text().startswith('name: "llm_green"')
    (pkg / "1" / "model.onnx").write_text("v2")
    stage_into_repository(str(pkg), "llm_green")
    assert (repo / "llm_green" / "1" / "model.onnx").read_text() == "v2"
    assert sorted(p.name for p in repo.iterdir()) == ["llm_green"]  # no staging leftovers
