"""Slack is Tuneship's voice: a bot token sends with slack-sdk, no token writes a JSONL sink.

The sink (`TUNESHIP_HOME/notifications.jsonl`) carries exactly what would have been posted,
so the demo and the tests read what a person on the channel would have seen.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tuneship import config


def sink_path() -> Path:
    return config.home() / "notifications.jsonl"


def notify(text: str, *, level: str = "info", channel: str | None = None, **fields: Any) -> dict:
    """Post `text` to Slack (or the sink). Never raises for a delivery failure: a failed
    notification must not fail the release it reports on; it is recorded instead."""
    channel = channel or os.environ.get("TUNESHIP_SLACK_CHANNEL", "#ml-releases")
    icon = {"info": ":information_source:", "success": ":white_check_mark:",
            "warning": ":warning:", "error": ":rotating_light:"}.get(level, "")
    message = {"ts": time.time(), "channel": channel, "level": level,
               "text": f"{icon} {text}".strip(), "fields": fields}
    token = os.environ.get("SLACK_BOT_TOKEN")
    if token:
        from slack_sdk import WebClient
        from slack_sdk.errors import SlackApiError

        try:
            WebClient(token=token, timeout=10).chat_postMessage(channel=channel, text=message["text"])
            message["delivered"] = "slack"
        except SlackApiError as exc:  # Slack answered with an error (bad channel, revoked token)
            message["delivered"] = f"failed: {exc.response.get('error', exc)}"
        except Exception as exc:  # noqa: BLE001 - network, proxy, TLS, timeout: recorded, never raised
            message["delivered"] = f"failed: {type(exc).__name__}: {exc}"
    else:
        message["delivered"] = "sink"
    path = sink_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(message, default=str) + "\n")
    return message


def read_sink() -> list[dict]:
    path = sink_path()
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
