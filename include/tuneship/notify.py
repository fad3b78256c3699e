"""Slack is Tuneship's voice: a bot token sends with slack-sdk, no token writes a JSONL sink.

Every message is Block Kit built with slack-sdk's block models, so Slack's limits (header
length, fields per section, buttons per block) are checked here, by slack-sdk's own
validation, rather than by Slack rejecting an alert at 3 AM: a header (level emoji and a
short title), the verdict (the message text), the key figures as fields, a context line
(task, release, Airflow run) and buttons to the Airflow run, the report and the MLflow
version. What would not fit is trimmed on purpose, never sent to be refused.

One thread per release: the first message with a thread key (`release_thread`, e.g.
`<task>-v7`) is the parent, later stages of the same release reply to it (`thread_ts`);
an alert a person must act on (level `error`) is also broadcast to the channel.

The sink (`TUNESHIP_HOME/notifications.jsonl`) carries exactly what would have been posted
(the same blocks), plus each message's id, its thread key and its thread root's id, so the
demo and the tests read what a person on the channel would have seen and can rebuild the
threads. It is also where the Slack path remembers each thread's parent `ts`: every
Airflow task is its own process, so the parent is looked up there, under a lock.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tuneship import atomic, config

LEVELS = {"info": ":information_source:", "success": ":white_check_mark:",
          "warning": ":warning:", "error": ":rotating_light:"}

# Slack's limits (https://docs.slack.dev/reference/block-kit/blocks): slack-sdk validates the
# counts and the header; the text lengths it does not check are trimmed here.
HEADER_MAX = 150          # header block plain_text
SECTION_MAX = 3000        # section text
FIELD_MAX = 300           # one field (Slack allows 2000; a figure that long is not a figure)
FIELDS_PER_SECTION = 10   # Slack's per-section count
MAX_FIELDS = 20           # two sections of figures at most; the rest is named in the last one
CONTEXT_MAX = 10          # context elements
BUTTON_TEXT_MAX = 75
URL_MAX = 3000
MAX_BUTTONS = 5
TEXT_MAX = 40000          # chat.postMessage truncates `text` beyond this


def sink_path() -> Path:
    return config.home() / "notifications.jsonl"


def _lock_path() -> Path:
    return config.home() / "notifications.lock"


# ------------------------------------------------------------------ links


def airflow_ui_url() -> str:
    """Base URL of the Airflow UI people open from Slack: TUNESHIP_AIRFLOW_URL (as for the
    CLI), else Airflow's own `[api] base_url`, else the embedded default's loopback port."""
    url = os.environ.get("TUNESHIP_AIRFLOW_URL") or os.environ.get("AIRFLOW__API__BASE_URL")
    return (url or f"http://127.0.0.1:{config.Ports.from_env().airflow}").rstrip("/")


def mlflow_ui_url() -> str:
    """Base URL of the MLflow UI: TUNESHIP_MLFLOW_UI_URL, else an http(s) tracking URI, else
    the embedded default's MLflow server port."""
    url = os.environ.get("TUNESHIP_MLFLOW_UI_URL")
    tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not url and tracking.startswith(("http://", "https://")):
        url = tracking
    return (url or f"http://127.0.0.1:{config.Ports.from_env().mlflow}").rstrip("/")


def airflow_run() -> dict[str, str]:
    """The Airflow task this process runs, from the `AIRFLOW_CTX_*` variables Airflow's
    task runner exports before `execute` (empty outside Airflow: tests, the CLI)."""
    keys = {"dag_id": "AIRFLOW_CTX_DAG_ID", "run_id": "AIRFLOW_CTX_DAG_RUN_ID", "task_id": "AIRFLOW_CTX_TASK_ID"}
    return {k: os.environ[v] for k, v in keys.items() if os.environ.get(v)}


def airflow_run_url(dag_id: str, run_id: str, task_id: str | None = None) -> str:
    url = f"{airflow_ui_url()}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"
    return url + (f"/tasks/{quote(task_id, safe='')}" if task_id else "")


def mlflow_version_url(registered_model: str, version: int | str) -> str:
    return f"{mlflow_ui_url()}/#/models/{quote(registered_model, safe='')}/versions/{quote(str(version), safe='')}"


def report_url(report: str | Path | None) -> str | None:
    """A report people can open from Slack: an http(s) URL as given, an HTML report under
    `TUNESHIP_HOME/reports` as the Airflow plugin's Reports page serves it; None for a file
    no server publishes (it is named in the context line instead)."""
    if not report:
        return None
    text = str(report)
    if text.startswith(("http://", "https://")):
        return text
    path, reports = Path(text).resolve(), (config.home() / "reports").resolve()
    if path.parent == reports and path.suffix == ".html":
        return f"{airflow_ui_url()}/tuneship/reports/{quote(path.name)}"
    return None


def release_thread(task: str, version: int | str) -> str:
    """The thread key of one release of one task: every stage of it replies in one thread."""
    return f"{task}-v{version}"


def release_links(registered_model: str | None, version: int | str | None,
                  report: str | Path | None = None) -> dict[str, str | None]:
    """The buttons of a release message (the Airflow run is added by `notify` itself)."""
    links: dict[str, str | None] = {}
    if report:
        links["Report"] = report_url(report)
    if registered_model and version is not None:
        links[f"MLflow v{version}"] = mlflow_version_url(registered_model, version)
    return links


# ------------------------------------------------------------------ blocks


def escape(text: str) -> str:
    """Slack's three control characters in mrkdwn and `text` (`<!channel>` must not ping)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _trim(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _figure(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def headline(text: str, title: str | None = None) -> str:
    """The header's words: the title, else the text's first line (trimmed by the header)."""
    return (title or (text.strip().splitlines() or [""])[0]).strip()


def key_figures(fields: dict[str, Any]) -> dict[str, Any]:
    """The figures a message shows when its caller named none: the scalar fields."""
    return {k.replace("_", " "): v for k, v in fields.items()
            if v is not None and isinstance(v, str | int | float | bool)}


def build_blocks(text: str, *, level: str = "info", title: str | None = None,
                 figures: dict[str, Any] | None = None, links: dict[str, str | None] | None = None,
                 context: list[str] | None = None) -> list[dict[str, Any]]:
    """The Block Kit blocks of one message, each built with slack-sdk's models and turned into
    a dict by their `to_dict()`, which raises `SlackObjectFormationError` on a count or length
    Slack would refuse. Over-long texts and too many fields are trimmed here first."""
    from slack_sdk.models.blocks import (
        ActionsBlock,
        ButtonElement,
        ContextBlock,
        HeaderBlock,
        MarkdownTextObject,
        PlainTextObject,
        SectionBlock,
    )

    icon = LEVELS.get(level, "")
    head = headline(text, title)
    blocks: list[Any] = [HeaderBlock(text=PlainTextObject(text=_trim(f"{icon} {head}".strip(), HEADER_MAX),
                                                          emoji=True))]
    blocks.append(SectionBlock(text=MarkdownTextObject(text=_trim(escape(text.strip() or head), SECTION_MAX))))
    cells = [_trim(f"*{escape(str(k))}*\n{escape(_figure(v))}", FIELD_MAX)
             for k, v in (figures or {}).items() if v is not None and v != ""]
    if len(cells) > MAX_FIELDS:  # deliberately: the last cell says what was left out
        left = [str(k) for k in list(figures or {})[MAX_FIELDS - 1:]]
        cells = [*cells[: MAX_FIELDS - 1],
                 _trim(f"*+{len(cells) - MAX_FIELDS + 1} more*\n{escape(', '.join(left))}", FIELD_MAX)]
    for i in range(0, len(cells), FIELDS_PER_SECTION):
        blocks.append(SectionBlock(fields=[MarkdownTextObject(text=c) for c in cells[i:i + FIELDS_PER_SECTION]]))
    notes = [_trim(escape(c), SECTION_MAX) for c in (context or []) if c][:CONTEXT_MAX]
    if notes:
        blocks.append(ContextBlock(elements=[MarkdownTextObject(text=c) for c in notes]))
    buttons = [(label, url) for label, url in (links or {}).items()
               if url and url.startswith(("http://", "https://")) and len(url) <= URL_MAX][:MAX_BUTTONS]
    if buttons:
        blocks.append(ActionsBlock(elements=[
            ButtonElement(text=PlainTextObject(text=_trim(label, BUTTON_TEXT_MAX), emoji=True), url=url,
                          action_id=f"tuneship-link-{i}")
            for i, (label, url) in enumerate(buttons)]))
    return [b.to_dict() for b in blocks]


# ------------------------------------------------------------------ sending


def _thread_state(records: list[dict[str, Any]], channel: str, key: str) -> tuple[str | None, dict | None]:
    """(the sink id of the thread's root, the Slack parent {ts, channel}) for `key`."""
    root, parent = None, None
    for m in records:
        if m.get("thread") != key or m.get("channel") != channel:
            continue
        if root is None and not m.get("parent"):
            root = m.get("id")
        if parent is None and (m.get("slack") or {}).get("ts") and not m.get("thread_ts"):
            parent = m["slack"]
    return root, parent


def notify(text: str, *, level: str = "info", channel: str | None = None, title: str | None = None,
           figures: dict[str, Any] | None = None, links: dict[str, str | None] | None = None,
           thread: str | None = None, broadcast: bool | None = None, **fields: Any) -> dict:
    """Post `text` to Slack (or the sink) as Block Kit: `title` for the header (default: the
    text's first line), `figures` as fields (default: the scalar `fields`), `links` as
    buttons (the Airflow run this process runs in is added), `thread` to reply in that
    release's thread; `broadcast` (default: for errors) also shows a reply in the channel.
    `fields` are kept in the sink as they are.

    Never raises for a delivery failure: a failed notification must not fail the release it
    reports on; it is recorded instead. Blocks slack-sdk finds invalid (a bug: everything is
    trimmed to Slack's limits first) are recorded as `blocks_error` and the text goes alone."""
    channel = channel or os.environ.get("TUNESHIP_SLACK_CHANNEL", "#ml-releases")
    icon = LEVELS.get(level, "")
    run = airflow_run()
    links = dict(links or {})
    if run.get("dag_id") and run.get("run_id") and "Airflow run" not in links:
        links = {"Airflow run": airflow_run_url(run["dag_id"], run["run_id"], run.get("task_id")), **links}
    context = [f"task *{fields['task']}*" if fields.get("task") else "",
               f"release `{thread}`" if thread else "",
               " / ".join(f"`{run[k]}`" for k in ("dag_id", "run_id", "task_id") if k in run)]
    unlinked = fields.get("report")
    if unlinked and not report_url(unlinked):
        context.append(f"report: `{unlinked}`")
    figures = key_figures(fields) if figures is None else figures
    from slack_sdk.errors import SlackObjectFormationError

    try:
        blocks, blocks_error = build_blocks(text, level=level, title=title, figures=figures, links=links,
                                            context=context), None
    except SlackObjectFormationError as exc:  # a bug here must not silence the alert: text only, recorded
        blocks, blocks_error = None, str(exc)
    message: dict[str, Any] = {"id": uuid.uuid4().hex, "ts": time.time(), "channel": channel, "level": level,
                               "title": headline(text, title), "text": f"{icon} {text}".strip(),
                               "fields": fields, "blocks": blocks, "thread": thread, "parent": None,
                               "thread_ts": None, **({"blocks_error": blocks_error} if blocks_error else {})}
    if broadcast is None:
        broadcast = level == "error"
    path = sink_path()
    with atomic.exclusive(_lock_path()):  # one thread parent per release across task processes
        root, parent = _thread_state(read_sink(), channel, thread) if thread else (None, None)
        message.update(parent=root, reply_broadcast=bool(root and broadcast))
        token = os.environ.get("SLACK_BOT_TOKEN")
        if token:
            message.update(_post(token, message, parent, broadcast))
        else:
            message["delivered"] = "sink"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(message, default=str) + "\n")
    return message


def _post(token: str, message: dict[str, Any], parent: dict | None, broadcast: bool) -> dict[str, Any]:
    """chat.postMessage with the message's blocks; a reply when the thread has a Slack parent."""
    from slack_sdk import WebClient
    from slack_sdk.errors import SlackApiError

    # TUNESHIP_SLACK_BASE_URL: Slack's API root for GovSlack or a company proxy (and the tests'
    # stand-in server); slack-sdk's default otherwise.
    base = os.environ.get("TUNESHIP_SLACK_BASE_URL")
    client = WebClient(token=token, timeout=10, **({"base_url": base.rstrip("/") + "/"} if base else {}))
    args: dict[str, Any] = {"channel": message["channel"], "text": _trim(escape(message["text"]), TEXT_MAX),
                            "unfurl_links": False, "unfurl_media": False}
    if message["blocks"]:
        args["blocks"] = message["blocks"]
    out: dict[str, Any] = {"reply_broadcast": bool(parent and broadcast)}
    if parent:  # replies go to the channel id Slack answered the parent with
        args.update(channel=parent.get("channel") or message["channel"], thread_ts=parent["ts"])
        if broadcast:
            args["reply_broadcast"] = True
        out["thread_ts"] = parent["ts"]
    try:
        response = client.chat_postMessage(**args)
        out.update(delivered="slack", slack={"ts": response.get("ts"), "channel": response.get("channel")})
    except SlackApiError as exc:  # Slack answered with an error (bad channel, revoked token)
        out.update(delivered=f"failed: {exc.response.get('error', exc)}", thread_ts=None, reply_broadcast=False)
    except Exception as exc:  # noqa: BLE001 - network, proxy, TLS, timeout: recorded, never raised
        out.update(delivered=f"failed: {type(exc).__name__}: {exc}", thread_ts=None, reply_broadcast=False)
    return out


def read_sink() -> list[dict]:
    path = sink_path()
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
