"""The `tuneship` commands (typer). Exit codes, one meaning each, so a CI step can branch:

    0  done (the run succeeded, the call was accepted)
    1  the DAG run failed (the failing tasks and the tail of their logs are printed)
    2  usage or configuration error (bad option, unreadable config, missing credentials)
    3  Airflow or the gateway refused or could not be reached (HTTP error, unknown DAG, 409)
    4  timed out waiting; the run goes on (`tuneship runs wait DAG RUN` picks it up again)

Progress and messages go to stderr; stdout carries only what a script consumes: a run id,
a new key, or with `--json` one JSON document.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import httpx
import typer

from tuneship.airflow_api import AirflowAPI
from tuneship.cli.settings import ConfigError, Endpoints, endpoints
from tuneship.gateway_admin import GatewayAdmin, GatewayAdminError
from tuneship.runwatch import RunTimeout, RunWatcher, failures

EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE, EXIT_SERVICE, EXIT_TIMEOUT = 0, 1, 2, 3, 4

app = typer.Typer(name="tuneship", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Drive Tuneship from CI or a terminal: trigger DAG runs and wait for them, see and roll "
                       "back what the gateway serves, manage client keys. Exit codes: 0 ok, 1 run failed, "
                       "2 usage/config error, 3 service refused or unreachable, 4 timed out.")
runs_app = typer.Typer(no_args_is_help=True, help="DAG runs already started.")
keys_app = typer.Typer(no_args_is_help=True, help="Gateway client API keys (through the gateway's admin API).")
tasks_app = typer.Typer(no_args_is_help=True, help="Task files (include/tasks/*.yaml): list and check them.")
app.add_typer(runs_app, name="runs")
app.add_typer(keys_app, name="keys")
app.add_typer(tasks_app, name="tasks")

F = TypeVar("F", bound=Callable[..., Any])
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of text.")]


def err(msg: str) -> None:
    typer.echo(msg, err=True)


def progress(msg: str) -> None:
    err(f"[{time.strftime('%H:%M:%S')}] {msg}")


def out_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def handled(fn: F) -> F:
    """Map the failures every command can meet to the documented exit codes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            err(f"error: {exc}")
            raise typer.Exit(EXIT_USAGE) from None
        except GatewayAdminError as exc:
            err(f"error: gateway {exc}")
            if exc.code == "model_required":  # several served models and no --model: a usage error
                err("hint: pass --model NAME (one of the served models named above)")
                raise typer.Exit(EXIT_USAGE) from None
            raise typer.Exit(EXIT_SERVICE) from None
        except httpx.HTTPStatusError as exc:
            err(f"error: Airflow {exc}")
            raise typer.Exit(EXIT_SERVICE) from None
        except httpx.HTTPError as exc:
            err(f"error: could not reach {getattr(exc, 'request', None) and exc.request.url}: {exc}")
            raise typer.Exit(EXIT_SERVICE) from None

    return wrapper  # type: ignore[return-value]


def _endpoints(ctx: typer.Context) -> Endpoints:
    return endpoints(ctx.obj.get("config") if ctx.obj else None)


def _airflow(ep: Endpoints) -> AirflowAPI:
    user, password, token = ep.airflow_credentials()
    if token:
        return AirflowAPI.with_token(ep.airflow_url, token)
    return AirflowAPI(ep.airflow_url, user, password or "")


def _gateway(ep: Endpoints, model: str | None = None) -> GatewayAdmin:
    return GatewayAdmin(ep.gateway_url, ep.gateway_token(), served_model=model)


ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", help="The served model (the OpenAI `model` id of a task). Required when the gateway "
                          "serves several; with one it defaults to it.")]


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", envvar="TUNESHIP_CONFIG", dir_okay=False,
                                                help="TOML config file (default: ~/.config/tuneship/config.toml "
                                                     "if it exists). Environment variables override it.")] = None,
) -> None:
    ctx.obj = {"config": config}


# -- runs ------------------------------------------------------------------------------------
def parse_conf(conf: str | None, params: list[str], task: str | None) -> dict[str, Any]:
    """--conf JSON object, then each --param key=value on top (value parsed as JSON when it
    is JSON: numbers, true/false, null, lists; else kept as a string), then --task."""
    out: dict[str, Any] = {}
    if conf:
        try:
            out = json.loads(conf)
        except ValueError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="--conf") from None
        if not isinstance(out, dict):
            raise typer.BadParameter("must be a JSON object ({...})", param_hint="--conf")
    for item in params:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r} is not key=value", param_hint="--param")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    if task:
        out["task"] = task
    return out


def _run_url(api: AirflowAPI, dag_id: str, run_id: str) -> str:
    return f"{api.base_url}/dags/{dag_id}/runs/{run_id}"


def _wait(api: AirflowAPI, dag_id: str, run_id: str, timeout: float, poll: float, log_lines: int,
          as_json: bool) -> None:
    """Wait for a run, print progress; exit 0 on success, 1 with the reason on failure, 4 on timeout."""
    watcher = RunWatcher(api, timeout, emit=progress, poll_s=poll)
    result: dict[str, Any] = {"dag_id": dag_id, "run_id": run_id, "url": _run_url(api, dag_id, run_id)}
    try:
        run = watcher.wait_run(dag_id, run_id)
    except RunTimeout as exc:
        result["state"] = api.run(dag_id, run_id)["state"]
        err(f"error: {exc}; the run goes on. Pick it up again with: tuneship runs wait {dag_id} {run_id}")
        if as_json:
            out_json(result)
        raise typer.Exit(EXIT_TIMEOUT) from None
    result["state"] = run["state"]
    if run["state"] == "success":
        if as_json:
            out_json(result)
        return
    found = failures(api, dag_id, run_id, log_lines)
    result["failed_tasks"] = [f.to_json() for f in found]
    for f in found:
        err(f"FAILED task {f.task_id} (try {f.try_number}); last lines of its log:")
        for line in f.log_tail:
            err(f"    {line}")
    if not found:
        err("FAILED, but no task instance failed (a timeout or a run marked failed by hand?)")
    err(f"see {result['url']}")
    if as_json:
        out_json(result)
    raise typer.Exit(EXIT_RUN_FAILED)


TimeoutOpt = Annotated[float, typer.Option(min=1, help="Seconds to wait before giving up (exit 4).")]
PollOpt = Annotated[float, typer.Option(min=0.2, help="Seconds between status checks.")]
LogLinesOpt = Annotated[int, typer.Option(min=1, help="Log lines of each failed task to print.")]


@app.command()
@handled
def trigger(
    ctx: typer.Context,
    dag_id: Annotated[str, typer.Argument(help="The DAG to run, e.g. llm_finetune.")],
    conf: Annotated[str | None, typer.Option(help='Run conf as a JSON object, e.g. \'{"epochs": 2}\'.')] = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", metavar="KEY=VALUE", help="key=value added to the conf "
                                                    "(value parsed as JSON if it is JSON); repeatable.")] = None,
    task: Annotated[str | None, typer.Option(help="The Tuneship task the run is for (conf key `task`).")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the run to finish.")] = True,
    unpause: Annotated[bool, typer.Option("--unpause", help="Unpause the DAG first if it is paused (a paused DAG's "
                                                "run never starts, so otherwise that is an error).")] = False,
    timeout: TimeoutOpt = 3600,
    poll: PollOpt = 5.0,
    log_lines: LogLinesOpt = 20,
    as_json: JsonOpt = False,
) -> None:
    """Trigger DAG_ID with a conf; print the run id, then (with --wait) progress until it ends.

    Exits 0 when the run succeeds, 1 when it fails (with each failed task's id and the last lines of its log), 4 on --timeout.
    """
    body = parse_conf(conf, param or [], task)
    api = _airflow(_endpoints(ctx))
    try:
        dag = api.dag(dag_id)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 404:
            err(f"error: Airflow at {api.base_url} has no DAG {dag_id!r} (not parsed yet, or an import error: "
                "see Browse > DAG import errors in the UI)")
            raise typer.Exit(EXIT_SERVICE) from None
        raise
    if dag.get("is_paused"):
        if not unpause:
            err(f"error: DAG {dag_id} is paused, so a run would never start; unpause it in the UI or pass --unpause")
            raise typer.Exit(EXIT_SERVICE)
        api.unpause(dag_id)
        progress(f"unpaused {dag_id}")
    run_id = api.trigger(dag_id, body)
    progress(f"triggered {dag_id}: {run_id}  {_run_url(api, dag_id, run_id)}")
    if not as_json:
        typer.echo(run_id)
    if not wait:
        if as_json:
            out_json({"dag_id": dag_id, "run_id": run_id, "state": "queued", "url": _run_url(api, dag_id, run_id)})
        return
    _wait(api, dag_id, run_id, timeout, poll, log_lines, as_json)


@runs_app.command("wait")
@handled
def runs_wait(
    ctx: typer.Context,
    dag_id: Annotated[str, typer.Argument(help="The DAG of the run.")],
    run_id: Annotated[str, typer.Argument(help="The run id `tuneship trigger` printed.")],
    timeout: TimeoutOpt = 3600,
    poll: PollOpt = 5.0,
    log_lines: LogLinesOpt = 20,
    as_json: JsonOpt = False,
) -> None:
    """Wait for a run to end, with progress; exit codes as for `trigger --wait`."""
    _wait(_airflow(_endpoints(ctx)), dag_id, run_id, timeout, poll, log_lines, as_json)


# -- serving ---------------------------------------------------------------------------------
def _route_line(role: str, route: dict[str, Any] | None) -> str:
    if not route:
        return f"{role:10s} -"
    reg = route.get("registered_model") or route["model"]
    return (f"{role:10s} {route['colour']:8s} triton {route['model']:14s} {reg} v{route.get('version') or '?'}"
            f"  deployed {route.get('deployed_at') or '?'}")


@app.command()
@handled
def status(ctx: typer.Context, model: ModelOpt = None, as_json: JsonOpt = False) -> None:
    """What the gateway serves: live, shadow (candidate), and the colour kept for rollback,
    for each served model (or the one --model names)."""
    ep = _endpoints(ctx)
    with _gateway(ep) as gw:
        names = [model] if model else (list(gw.version().get("served_models") or {}) or [None])
    found: dict[str | None, tuple[dict[str, Any], dict[str, Any]]] = {}
    for name in names:
        with _gateway(ep, name) as gw:
            found[name] = (gw.routes(), gw.version())
    if as_json:
        if len(found) == 1:
            routes, version = next(iter(found.values()))
            out_json({"gateway": ep.gateway_url, "served_model": routes["served_model"],
                      "routes": routes, "version": version})
        else:
            out_json({"gateway": ep.gateway_url,
                      "models": {r["served_model"]: {"routes": r, "version": v} for r, v in found.values()}})
        return
    for i, (routes, _version) in enumerate(found.values()):
        if i:
            typer.echo("")
        typer.echo(f"gateway    {ep.gateway_url}  (served model {routes['served_model']!r}, "
                   f"generation {routes['generation']})")
        typer.echo(_route_line("live", routes.get("live")))
        typer.echo(_route_line("shadow", routes.get("shadow")))
        if routes.get("shadow"):
            typer.echo(f"{'':10s} mirror {routes['mirror_sample'] * 100:.0f}% of traffic, canary "
                       f"{routes['canary_weight']}% answered by it")
        typer.echo(_route_line("rollback", routes.get("previous")))


@app.command()
@handled
def rollback(
    ctx: typer.Context,
    model: ModelOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask; required when stdin is not a terminal.")] = False,
    force: Annotated[bool, typer.Option(help="Switch even if Triton does not report the previous model ready.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Put the colour kept for rollback back live (the live one becomes the rollback colour),
    for one served model; the others' traffic is untouched."""
    ep = _endpoints(ctx)
    with _gateway(ep, model) as gw:
        routes = gw.routes()
        if not routes.get("previous"):
            err(f"error: nothing to roll back to: the gateway keeps no previous colour for "
                f"served model {routes['served_model']!r}")
            raise typer.Exit(EXIT_SERVICE)
        err(f"served model {routes['served_model']!r}")
        err(_route_line("live", routes.get("live")))
        err(_route_line("back to", routes["previous"]))
        if not yes:
            if not sys.stdin.isatty():
                err("error: not a terminal; pass --yes to roll back without a question")
                raise typer.Exit(EXIT_USAGE)
            typer.confirm("Roll back?", abort=True)
        new = gw.rollback(force=force)
    if as_json:
        out_json(new)
    else:
        typer.echo(_route_line("live", new.get("live")))
        typer.echo(_route_line("rollback", new.get("previous")))


# -- client keys -----------------------------------------------------------------------------
def _key_line(k: dict[str, Any]) -> str:
    return (f"{k['id']}  {k['name']:20s} rpm={k['rpm'] or 'unlimited'} burst={k.get('burst') or k['rpm'] or '-'}"
            f"  {'revoked' if k['disabled'] else 'active'}  created {k.get('created_at')}")


@keys_app.command("list")
@handled
def keys_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Key ids, names, limits and state (never the keys, never their digests)."""
    with _gateway(_endpoints(ctx)) as gw:
        keys = gw.keys()
    if as_json:
        out_json(keys)
        return
    for k in keys:
        typer.echo(_key_line(k))


@keys_app.command("create")
@handled
def keys_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option(help="Who the key is for (shown in listings and metrics).")],
    rpm: Annotated[int | None, typer.Option(min=0, help="Requests per minute; 0 = unlimited. "
                                            "Default: the gateway's (600).")] = None,
    burst: Annotated[int | None, typer.Option(min=1, help="Bucket size (default: rpm).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a key and print it once on stdout; it is not stored anywhere in clear."""
    with _gateway(_endpoints(ctx)) as gw:
        rec = gw.create_key(name, rpm, burst)
    if as_json:
        out_json(rec)
        return
    err(f"created key {rec['id']} ({rec['name']}, rpm={rec['rpm'] or 'unlimited'}); it is shown only this once:")
    typer.echo(rec["key"])


@keys_app.command("revoke")
@handled
def keys_revoke(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(help="The key's id (8 hex digits, from `keys list`).")],
    as_json: JsonOpt = False,
) -> None:
    """Disable a key: requests with it get 401 from the next request on."""
    with _gateway(_endpoints(ctx)) as gw:
        rec = gw.revoke_key(key_id)
    if as_json:
        out_json(rec)
    else:
        err(f"revoked {rec['id']} ({rec['name']})")


# -- tasks -----------------------------------------------------------------------------------
@tasks_app.command("list")
def tasks_list(as_json: JsonOpt = False) -> None:
    """Every task: its served and registered model, base model, prompt format, suites."""
    from tuneship.tasks import TaskError, load_tasks

    try:
        tasks = load_tasks()
    except TaskError as exc:
        err(f"error: {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    rows = {name: {"file": str(t.path), "served_model": t.served_model, "registered_model": t.registered_model,
                   "base_model": t.base_model, "recipe": t.recipe, "prompt_format": t.prompt_format,
                   "suites": t.eval.suites, "smoke": t.eval.smoke, "landing": str(t.landing())}
            for name, t in tasks.items()}
    if as_json:
        out_json(rows)
        return
    for name, r in rows.items():
        typer.echo(f"{name}: model {r['served_model']} -> {r['registered_model']}, base {r['base_model']} "
                   f"({r['prompt_format']}), suites {', '.join(r['suites'])} + {r['smoke']}, data {r['landing']}")


@tasks_app.command("check")
def tasks_check(
    files: Annotated[list[Path] | None, typer.Argument(help="Task, suite or recipe files (default: every task).")] = None,
    tokenizer: Annotated[bool, typer.Option("--tokenizer", help="Also load each task's tokenizer and check it "
                                                                 "renders the task's prompts (slower).")] = False,
) -> None:
    """Validate task files with everything they name (suites, recipe, functions, names unique
    across tasks), and eval suites and recipes given on their own; exit 2 on the first
    broken file, naming the file and the key. Used by the pre-commit hook and CI."""
    from tuneship.evaluate import SuiteError, load_suite
    from tuneship.tasks import TaskError, load_task_file, load_tasks, tokenizer_problems
    from tuneship.train.recipe import RecipeError, load_recipe

    problems: list[str] = []
    try:
        tasks = load_tasks()  # every task: names must not clash, whatever file changed
    except TaskError as exc:
        err(f"error: {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    checked = dict(tasks)
    for f in files or []:
        try:
            if f.parent.name == "tasks" and f.suffix in (".yaml", ".yml"):
                checked.setdefault(f.stem, load_task_file(f))
            elif f.parent.name == "eval_suites":
                load_suite(f)
            elif f.parent.name == "recipes":
                load_recipe(f)
        except (TaskError, SuiteError, RecipeError) as exc:
            problems.append(str(exc))
    if tokenizer:
        from transformers import AutoTokenizer

        from tuneship.basemodel import resolve_base_ref

        for task in checked.values():
            target = resolve_base_ref(task.base_model)[0]
            found = tokenizer_problems(task, AutoTokenizer.from_pretrained(target))
            problems += [f"{task.path}: key 'base_model' ({task.base_model}): {p}" for p in found]
    for p in problems:
        err(f"error: {p}")
    if problems:
        raise typer.Exit(EXIT_USAGE)
    err(f"ok: {len(checked)} task(s): {', '.join(sorted(checked))}")


# -- edge ------------------------------------------------------------------------------------
@app.command("edge-package")
def edge_package(
    task: Annotated[str, typer.Option(help="The task whose version to package.")],
    version: Annotated[int, typer.Option(min=1, help="The registered model version (compiled by llm_finetune).")],
    out: Annotated[Path, typer.Option(file_okay=False, help="The package directory (replaced whole).")],
    precision: Annotated[str, typer.Option(help="The precision the compiled build must have.")] = "int4",
    archive: Annotated[bool, typer.Option("--archive", help="Also write OUT.tar.gz beside it.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Package a version's compiled build for a device that has ONNX Runtime GenAI and nothing
    else (no Triton, no Tuneship): model, tokenizer, a standalone run.py and a MANIFEST.json
    with every file's sha256. Prints the package's path. Exit 2 when the version has no
    compiled build at that precision or cannot be packaged faithfully."""
    from tuneship.edge import EdgeError, package_version
    from tuneship.tasks import TaskError, load_task

    try:
        manifest = package_version(load_task(task), version, out, precision=precision, archive=archive)
    except (TaskError, EdgeError, ValueError) as exc:
        err(f"error: {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    if as_json:
        out_json(manifest)
        return
    err(f"{task} v{version} ({manifest['precision']}): {len(manifest['files'])} files, {manifest['bytes']:,} bytes; "
        f"answers checked equal to the served model's on {manifest['checked']['prompts']} prompts")
    typer.echo(manifest["path"])


# -- configuration ---------------------------------------------------------------------------
@app.command("config")
@handled
def show_config(ctx: typer.Context) -> None:
    """Show the endpoints and which credentials the other commands would use (secrets hidden)."""
    out_json(_endpoints(ctx).describe())


def main() -> None:
    """Console-script entry point (`tuneship`)."""
    app()
