"""The `tuneship` command without services: --help everywhere, configuration errors that name
the field, conf parsing, and the example CI workflow (schema-valid, and every `tuneship` line
in it parses with the real CLI). Commands against Airflow and the gateway:
tests/integration/test_cli_live.py."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.main import get_command

from tuneship.cli import app
from tuneship.cli.app import parse_conf
from tuneship.runwatch import log_tail

REPO = Path(__file__).resolve().parents[2]
TUNESHIP = str(Path(sys.executable).parent / "tuneship")
WORKFLOW = REPO / "docs" / "ci" / "github-actions-finetune.yml"


def run(*args: str, env: dict[str, str] | None = None, home: Path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TUNESHIP_")}
    return subprocess.run([TUNESHIP, *args], capture_output=True, text=True, timeout=60,
                          env={**base, "TUNESHIP_HOME": str(home), "XDG_CONFIG_HOME": str(home / "xdg"), **(env or {})})


def is_group(cmd: Any) -> bool:
    # typer 0.29 vendors its own click: duck-type instead of isinstance(click.Group).
    return hasattr(cmd, "list_commands")


def command_paths(cmd: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    if is_group(cmd):
        ctx = cmd.context_class(cmd)
        for name in cmd.list_commands(ctx):
            out += command_paths(cmd.get_command(ctx, name), (*prefix, name))
    return out


def test_every_command_has_help(tmp_path):
    paths = command_paths(get_command(app))
    assert {("trigger",), ("runs", "wait"), ("status",), ("rollback",), ("keys", "create"), ("keys", "list"),
            ("keys", "revoke"), ("config",), ("edge-package",)} <= set(paths)
    for path in paths:
        r = run(*path, "--help", home=tmp_path)
        assert r.returncode == 0, (path, r.stderr)
        assert f"Usage: tuneship {' '.join(path)}".rstrip() in r.stdout, path


def test_config_errors_name_the_file_or_variable_and_field(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('[airflow]\nurl = "not a url"\n')
    r = run("--config", str(cfg), "config", home=tmp_path)
    assert r.returncode == 2 and f"config file {cfg}: field airflow.url" in r.stderr
    cfg.write_text('[gateway]\nadmin_tokn = "x"\n')
    r = run("--config", str(cfg), "config", home=tmp_path)
    assert r.returncode == 2 and "field gateway.admin_tokn: Extra inputs are not permitted" in r.stderr
    cfg.write_text("[airflow\n")
    assert "not valid TOML" in run("--config", str(cfg), "config", home=tmp_path).stderr
    r = run("--config", str(tmp_path / "missing.toml"), "config", home=tmp_path)
    assert r.returncode == 2 and "missing.toml does not exist" in r.stderr
    r = run("config", env={"TUNESHIP_GATEWAY_URL": "ftp://x"}, home=tmp_path)
    assert r.returncode == 2 and "environment variable TUNESHIP_GATEWAY_URL (gateway.url)" in r.stderr
    # Nothing configured and no local stack: the command that needs a credential says which.
    r = run("status", home=tmp_path)
    assert r.returncode == 2 and "TUNESHIP_GATEWAY_ADMIN_TOKEN" in r.stderr
    r = run("trigger", "llm_finetune", home=tmp_path, env={"TUNESHIP_AIRFLOW_URL": "http://127.0.0.1:9"})
    assert r.returncode == 2 and "TUNESHIP_AIRFLOW_TOKEN" in r.stderr


def test_config_file_then_environment(tmp_path):
    cfg = tmp_path / "xdg" / "tuneship" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text('[airflow]\nurl = "https://af.example.com/"\ntoken = "t0k"\n'
                   '[gateway]\nurl = "https://gw.example.com"\nadmin_token = "secret-admin-token"\n')
    r = run("config", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert '"url": "https://af.example.com"' in r.stdout and '"auth": "token"' in r.stdout
    assert "t0k" not in r.stdout and "secret-admin-token" not in r.stdout  # secrets never printed
    r = run("config", home=tmp_path, env={"TUNESHIP_GATEWAY_URL": "http://10.0.0.5:8100"})
    assert '"url": "http://10.0.0.5:8100"' in r.stdout and str(cfg) in r.stdout


def test_parse_conf():
    assert parse_conf('{"a": 1, "b": "x"}', ["b=2", "c=s3://bucket/d", "d=[1, 2]", "e=true", "f="], "triage") == {
        "a": 1, "b": 2, "c": "s3://bucket/d", "d": [1, 2], "e": True, "f": "", "task": "triage"}
    for conf, params in (("[1]", []), ("{", []), (None, ["novalue"]), (None, ["=x"])):
        with pytest.raises(typer.BadParameter):
            parse_conf(conf, params, None)


def test_log_tail_keeps_the_last_non_empty_lines():
    text = "2026-11-30T10:00:00Z INFO starting\n\n2026-11-30T10:00:01Z ERROR Task failed with exception\n" \
           "FileNotFoundError: /data/x: no such directory\n   \nplain line\n"
    assert log_tail(text, 3) == ["2026-11-30T10:00:01Z ERROR Task failed with exception",
                                 "FileNotFoundError: /data/x: no such directory", "plain line"]


def _workflow_commands() -> list[list[str]]:
    doc = yaml.safe_load(WORKFLOW.read_text())
    lines = [line.strip() for job in doc["jobs"].values() for step in job["steps"]
             for line in str(step.get("run", "")).splitlines()]
    cmds = []
    for line in lines:
        if line.startswith("tuneship "):
            argv = shlex.split(re.sub(r"\$\{\{[^}]*\}\}", "X", line))
            cmds.append(argv[1:argv.index(">")] if ">" in argv else argv[1:])
    return cmds


def test_example_ci_workflow_is_valid_and_its_commands_parse():
    r = subprocess.run([str(Path(sys.executable).parent / "check-jsonschema"), "--builtin-schema",
                        "vendor.github-workflows", str(WORKFLOW)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = yaml.safe_load(WORKFLOW.read_text())
    paths = doc[True]["push"]["paths"]  # YAML 1.1 reads the `on` key as True
    assert {"include/tasks/**", "include/tuneship/train/recipes/**", "eval_suites/**"} <= set(paths)

    cmds = _workflow_commands()
    assert any(c[:2] == ["trigger", "llm_finetune"] for c in cmds), cmds
    finetune_params = set(re.findall(r'"(\w+)": Param\(', (REPO / "dags" / "llm_finetune.py").read_text()))
    root = get_command(app)
    for argv in cmds:
        cmd, ctx, rest = root, root.context_class(root, info_name="tuneship"), list(argv)
        while is_group(cmd):
            cmd = cmd.get_command(ctx, rest.pop(0))
            assert cmd is not None, argv
        sub = cmd.make_context(cmd.name, rest, parent=ctx)  # raises UsageError on a bad option or value
        if cmd.name == "trigger":
            assert sub.params["wait"] is True  # the job must wait to fail on a failed run
            keys = {p.partition("=")[0] for p in sub.params["param"] or []}
            assert keys <= finetune_params, keys - finetune_params
