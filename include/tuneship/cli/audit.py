"""`tuneship audit show|verify` (also `python -m tuneship.audit show|verify`): read the audit
trail on this machine (`TUNESHIP_HOME/audit/audit.jsonl`) and check its hash chain.

Unlike the other commands these read a local file, not a service: run them where
TUNESHIP_HOME is (the Airflow workers' shared volume in production), or pass --file.
Exit codes: 0 ok, 2 usage error (bad --since, unknown --action), 5 the trail is broken.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tuneship import audit
from tuneship.cli.app import EXIT_USAGE, JsonOpt, err, out_json

EXIT_BROKEN = 5

audit_app = typer.Typer(no_args_is_help=True, add_completion=False, help="The audit trail of release decisions (local file): show "
                                                   "it, verify its hash chain. Exit 5 when the chain is broken.")

FileOpt = Annotated[Path | None, typer.Option("--file", dir_okay=False, help="The trail to read (default: "
                                              "TUNESHIP_HOME/audit/audit.jsonl), e.g. a copy kept elsewhere.")]


def _cell(value: Any, width: int) -> str:
    text = " ".join(str("-" if value is None else value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table(rows: list[dict[str, Any]]) -> list[str]:
    """A readable table: one line per record, the problem under any record that fails its check."""
    cols = [("", 2), ("seq", 5), ("at (UTC)", 19), ("task", 14), ("ver", 5), ("action", 22), ("actor", 30),
            ("reason", 70)]
    lines = ["  ".join(f"{name:{w}s}" for name, w in cols).rstrip()]
    for r in rows:
        if "seq" not in r:
            lines.append(f"!! line {r['line']}: {r['problem']}")
            continue
        at = str(r.get("at") or "").replace("T", " ")[:19]
        values = ["ok" if r["verified"] else "!!", r["seq"], at, r.get("task"), r.get("version"), r.get("action"),
                  r.get("actor"), r.get("reason")]
        lines.append("  ".join(f"{_cell(v, w):{w}s}" for v, (_, w) in zip(values, cols, strict=True)).rstrip())
        if not r["verified"]:
            lines.append(f"   line {r['line']}: {r['problem']}")
    return lines


@audit_app.command("show")
def show(
    task: Annotated[str | None, typer.Option("--task", help="Only this task's records.")] = None,
    action: Annotated[str | None, typer.Option("--action", help="Only this action: "
                                               + ", ".join(audit.ACTIONS) + ".")] = None,
    since: Annotated[str | None, typer.Option("--since", metavar="ISO", help="Only records at or after this "
                                              "UTC date or time, e.g. 2026-12-01 or 2026-12-01T15:00:00Z.")] = None,
    last: Annotated[int | None, typer.Option("--last", min=1, help="Only the newest N of those.")] = None,
    file: FileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The records, oldest first: seq, time, task, version, action, actor, reason; `!!` marks a
    record that fails its hash check (the reason is printed under it). --json: every field,
    figures and links included, with `verified` and `problem`."""
    try:
        rows = audit.verified_records(task=task, since=since, action=action, path=file)
    except audit.AuditError as exc:
        err(f"error: {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    if last is not None:
        rows = rows[-last:]
    if as_json:
        out_json(rows)
        return
    path = file or audit.audit_path()
    if not rows:
        err(f"no audit records{' matching' if task or action or since else ''} in {path}")
        return
    for line in table(rows):
        typer.echo(line)
    broken = sum(1 for r in rows if not r["verified"])
    if broken:
        err(f"{broken} record(s) shown fail their check; `verify` names the first broken place")


@audit_app.command("verify")
def verify(file: FileOpt = None, as_json: JsonOpt = False) -> None:
    """Walk the whole trail: exit 0 with a one-line summary (records, newest seq and hash)
    when intact; exit 5 with the first broken line and what is wrong (an edited record, a
    deleted or reordered one, a damaged or torn line, records cut off the end)."""
    verdict = audit.verify(file)
    if as_json:
        out_json(verdict.to_json())
    else:
        err(verdict.summary())
        for p in verdict.problems[1:]:
            err(f"  also {p}")
    if not verdict.ok:
        raise typer.Exit(EXIT_BROKEN)


def main() -> None:
    """`python -m tuneship.audit`."""
    audit_app(prog_name="python -m tuneship.audit")
