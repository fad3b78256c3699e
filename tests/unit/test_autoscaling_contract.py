"""Contract tests for the serving tier's autoscaling (issue 13), which needs a cluster to run.

serving/k8s/autoscaling-hpa.yaml scales the gateway on CPU and Triton on its average queue time
per request; serving/k8s/autoscaling-adapter.yaml is the prometheus-adapter rule that makes that
queue time a per-pod custom metric out of Triton's own counters. Checked here:

- every manifest passes the strict validator the other manifests pass (`validate_manifest`);
- each HPA scales a Deployment that exists in serving/k8s, in its own namespace, and a CPU
  utilisation target has the CPU requests it is measured against;
- the metric the Triton HPA asks for is exactly the one the adapter rule exposes (its name
  worked out the way the adapter does: `name.matches` on the series, `as` expanded as Go's
  regexp.Expand), attached to pods, and the adapter config has only keys its strict loader takes;
- the rule's metricsQuery, expanded as the adapter expands it, is valid PromQL to the real
  `promtool check rules`, and computes the per-request queue time on synthetic Triton counters
  (`promtool test rules`).

Each check is also shown to reject a broken input. promtool comes from Debian's `prometheus`
package (`make promtool`); without it these tests fail, they never skip.
"""

from __future__ import annotations

import copy
import re
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from promtool import promtool, run_promtool

from tuneship.runners import SpecInvalid, load_manifests, validate_manifest

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "serving" / "k8s"
HPA_FILE = K8S / "autoscaling-hpa.yaml"
ADAPTER_FILE = K8S / "autoscaling-adapter.yaml"
AUTOSCALING_FILES = sorted(K8S.glob("autoscaling-*.yaml"))

NAMESPACE = "tuneship-serving"
TRITON_PODS = ("tuneship-triton-7d9f8-abcde", "tuneship-triton-7d9f8-fghij", "tuneship-triton-7d9f8-klmno")

# prometheus-adapter's config structs (pkg/config/config.go); its loader is yaml.UnmarshalStrict.
_ADAPTER_KEYS = {"rules", "resourceRules", "externalRules"}
_RULE_KEYS = {"seriesQuery", "seriesFilters", "resources", "name", "metricsQuery"}
_RESOURCES_KEYS = {"template", "overrides", "namespaced"}
_NAME_KEYS = {"matches", "as"}
_FILTER_KEYS = {"is", "isNot"}
_TEMPLATE_FIELDS = re.compile(r"<<\s*\.(\w+)\s*>>")


# --------------------------------------------------------------------------- helpers


def deployments() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Deployment declared under serving/k8s, by (namespace, name)."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_manifests(path):
            if doc.get("kind") == "Deployment":
                meta = doc["metadata"]
                found[(meta.get("namespace", "default"), meta["name"])] = doc
    return found


def hpas() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in load_manifests(HPA_FILE)
            if d["kind"] == "HorizontalPodAutoscaler"}


def adapter_config() -> dict[str, Any]:
    (cm,) = [d for d in load_manifests(ADAPTER_FILE) if d["kind"] == "ConfigMap"]
    return yaml.safe_load(cm["data"]["config.yaml"])


def go_expand(template: str, match: re.Match[str]) -> str:
    """`template` expanded as Go's regexp.Expand does (the adapter's `name.as`): `$1`, `${1}`,
    `$name`, `${name}`, `$$`; `$name` takes the longest run of word characters (so `$1_x` is the
    group named `1_x`), and an unknown or unmatched group expands to nothing."""
    out, i = [], 0
    while i < len(template):
        c = template[i]
        i += 1
        if c != "$":
            out.append(c)
            continue
        if template.startswith("$", i):
            out.append("$")
            i += 1
            continue
        m = re.compile(r"\{([A-Za-z0-9_]+)\}" if template.startswith("{", i) else r"([A-Za-z0-9_]+)").match(template, i)
        if not m:
            out.append("$")
            continue
        i = m.end()
        name = m.group(1)
        try:
            group = int(name) if name.isdigit() else name
            out.append(match.group(group) or "")
        except IndexError:  # an unknown name or an out-of-range number: Go expands it to ""
            pass
    return "".join(out)


def series_name(series_query: str) -> str | None:
    """The one metric name a seriesQuery selects (`name{...}` or `{__name__="name",...}`)."""
    m = re.fullmatch(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{.*\})?\s*", series_query)
    if m:
        return m.group(1)
    m = re.search(r"__name__\s*=\s*\"([a-zA-Z_:][a-zA-Z0-9_:]*)\"", series_query)
    return m.group(1) if m else None


def adapter_config_problems(cfg: Any) -> list[str]:
    """Keys the adapter's strict loader refuses, and rules it cannot name or query."""
    if not isinstance(cfg, dict):
        return ["config.yaml is not a mapping"]
    problems = [f"unknown top-level key {k!r}" for k in set(cfg) - _ADAPTER_KEYS]
    for i, rule in enumerate((cfg.get("rules") or []) + (cfg.get("externalRules") or [])):
        where = f"rule {i}"
        problems += [f"{where}: unknown key {k!r}" for k in set(rule) - _RULE_KEYS]
        problems += [f"{where}.resources: unknown key {k!r}"
                     for k in set(rule.get("resources") or {}) - _RESOURCES_KEYS]
        problems += [f"{where}.name: unknown key {k!r}" for k in set(rule.get("name") or {}) - _NAME_KEYS]
        for f in rule.get("seriesFilters") or []:
            problems += [f"{where}.seriesFilters: unknown key {k!r}" for k in set(f) - _FILTER_KEYS]
        for label, res in ((rule.get("resources") or {}).get("overrides") or {}).items():
            problems += [f"{where}.resources.overrides.{label}: unknown key {k!r}"
                         for k in set(res) - {"group", "resource"}]
        if not rule.get("seriesQuery"):
            problems.append(f"{where}: no seriesQuery")
        name = rule.get("name") or {}
        if not name.get("as") and re.compile(name.get("matches") or ".*").groups > 1:
            problems.append(f"{where}.name: several capture groups and no `as`")
        unknown = set(_TEMPLATE_FIELDS.findall(rule.get("metricsQuery") or "")) - {
            "Series", "LabelMatchers", "GroupBy"}
        problems += [f"{where}.metricsQuery: template field .{f} is not expanded by this check"
                     for f in sorted(unknown)]
    return problems


def exposed_metrics(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Custom-metrics API name -> rule, for each `rules` entry: the series its seriesQuery
    selects, kept if `seriesFilters` and `name.matches` keep it, renamed by `name.as` (defaulting
    as the adapter does: `$0` without a capture group, `$1` with one)."""
    exposed = {}
    for rule in cfg.get("rules") or []:
        series = series_name(rule["seriesQuery"])
        if series is None:
            continue  # a regex over names: the exposed names depend on what Prometheus holds
        name = rule.get("name") or {}
        matcher = re.compile(name.get("matches") or ".*")
        filters = rule.get("seriesFilters") or []
        if any(("is" in f and not re.search(f["is"], series))
               or ("isNot" in f and re.search(f["isNot"], series)) for f in filters):
            continue
        m = matcher.search(series)
        if not m:
            continue
        as_ = name.get("as") or ("$0" if matcher.groups == 0 else "$1")
        exposed[go_expand(as_, m)] = rule
    return exposed


def _resource_labels(rule: dict[str, Any]) -> dict[str, str]:
    """Kubernetes resource (singular, core group) -> the Prometheus label the rule maps it from."""
    labels = {}
    for label, res in ((rule.get("resources") or {}).get("overrides") or {}).items():
        if not res.get("group"):
            labels[res["resource"].removesuffix("s")] = label
    return labels


def hpa_problems(hpa: dict[str, Any], deps: dict[tuple[str, str], dict[str, Any]],
                 exposed: dict[str, dict[str, Any]]) -> list[str]:
    """What would leave this HPA unable to scale: a target that is not a Deployment declared
    in serving/k8s (same namespace), min above max, a CPU utilisation target on containers
    without CPU requests, a pods metric the adapter does not expose on pods."""
    name = hpa["metadata"]["name"]
    ns = hpa["metadata"].get("namespace", "default")
    spec = hpa["spec"]
    ref = spec["scaleTargetRef"]
    problems = []
    dep = deps.get((ns, ref["name"]))
    if ref.get("kind") != "Deployment" or ref.get("apiVersion") != "apps/v1":
        problems.append(f"{name}: scaleTargetRef is {ref.get('apiVersion')} {ref.get('kind')}, "
                        "not apps/v1 Deployment")
    if dep is None:
        problems.append(f"{name}: scaleTargetRef names Deployment {ns}/{ref['name']}, which no "
                        "manifest in serving/k8s declares")
    if spec.get("minReplicas", 1) > spec["maxReplicas"]:
        problems.append(f"{name}: minReplicas {spec['minReplicas']} > maxReplicas {spec['maxReplicas']}")
    for metric in spec.get("metrics") or []:
        if metric["type"] == "Resource" and metric["resource"]["target"]["type"] == "Utilization":
            res = metric["resource"]["name"]
            containers = ((dep or {}).get("spec", {}).get("template", {}).get("spec", {})
                          .get("containers") or [])
            for c in containers:
                if res not in ((c.get("resources") or {}).get("requests") or {}):
                    problems.append(f"{name}: {res} utilisation target, but container "
                                    f"{c['name']} of {ref['name']} requests no {res}")
        elif metric["type"] == "Pods":
            wanted = metric["pods"]["metric"]["name"]
            rule = exposed.get(wanted)
            if rule is None:
                problems.append(f"{name}: pods metric {wanted!r} is not one the adapter exposes "
                                f"({sorted(exposed)})")
            elif "pod" not in _resource_labels(rule) or "namespace" not in _resource_labels(rule):
                problems.append(f"{name}: the adapter rule for {wanted!r} maps no label to pods "
                                "and namespaces, so the pods metric has no value per pod")
    return problems


def expand_metrics_query(rule: dict[str, Any], pods: tuple[str, ...], namespace: str) -> str:
    """The query the adapter sends Prometheus when the HPA asks for `pods` in `namespace`
    (docs/config.md, "Querying"; pkg/naming/metrics_query.go Build): .Series, .LabelMatchers
    (namespace first, then the pods: `=` for one, `=~` joined by `|` for several), .GroupBy."""
    labels = _resource_labels(rule)
    op = "=~" if len(pods) > 1 else "="
    fields = {
        "Series": series_name(rule["seriesQuery"]),
        "LabelMatchers": f'{labels["namespace"]}="{namespace}",{labels["pod"]}{op}"{"|".join(pods)}"',
        "GroupBy": labels["pod"],
    }
    return _TEMPLATE_FIELDS.sub(lambda m: fields[m.group(1)], rule["metricsQuery"]).strip()


def write_rule_file(path: Path, record: str, expr: str) -> Path:
    path.write_text(yaml.safe_dump(
        {"groups": [{"name": "tuneship-adapter", "rules": [{"record": record, "expr": expr}]}]},
        sort_keys=False, width=1000))
    return path


def check_rules(path: Path) -> subprocess.CompletedProcess[str]:
    return run_promtool("check", "rules", str(path))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def triton_rule() -> dict[str, Any]:
    hpa = hpas()["tuneship-triton"]
    (metric,) = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    return exposed_metrics(adapter_config())[metric["pods"]["metric"]["name"]]


@pytest.fixture(scope="module")
def expanded_query(triton_rule) -> str:
    return expand_metrics_query(triton_rule, TRITON_PODS, NAMESPACE)


# --------------------------------------------------------------------------- manifests


def test_autoscaling_files_are_the_expected_ones():
    assert AUTOSCALING_FILES == [ADAPTER_FILE, HPA_FILE]


@pytest.mark.parametrize("path", AUTOSCALING_FILES, ids=lambda p: p.name)
def test_autoscaling_manifests_validate(path):
    docs = load_manifests(path)
    assert docs
    for doc in docs:
        validate_manifest(doc, k8s_version="1.31")


def test_validator_rejects_a_broken_hpa():
    hpa = copy.deepcopy(hpas()["tuneship-triton"])
    hpa["spec"]["metrics"][0]["pods"]["target"]["averageValu"] = "100m"  # unknown field
    with pytest.raises(SpecInvalid, match="averageValu"):
        validate_manifest(hpa)
    hpa = copy.deepcopy(hpas()["tuneship-triton"])
    hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] = "100ms"  # schema: "a string"
    with pytest.raises(SpecInvalid, match="not a Kubernetes quantity"):
        validate_manifest(hpa)


def test_every_serving_deployment_has_an_hpa_and_each_hpa_can_scale():
    deps, exposed = deployments(), exposed_metrics(adapter_config())
    found = hpas()
    targets = {(h["metadata"]["namespace"], h["spec"]["scaleTargetRef"]["name"]) for h in found.values()}
    assert targets == {(NAMESPACE, "tuneship-gateway"), (NAMESPACE, "tuneship-triton")}
    for hpa in found.values():
        assert hpa_problems(hpa, deps, exposed) == []


def test_gateway_scales_on_cpu_and_triton_on_queue_time():
    found = hpas()
    (gw,) = found["tuneship-gateway"]["spec"]["metrics"]
    assert gw["type"] == "Resource" and gw["resource"]["name"] == "cpu"
    assert gw["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    triton = found["tuneship-triton"]["spec"]
    (q,) = triton["metrics"]
    assert q["pods"]["metric"]["name"] == "triton_queue_seconds_per_request"
    assert q["pods"]["target"] == {"type": "AverageValue", "averageValue": "100m"}
    # One GPU per replica: maxReplicas is the GPU budget; scale-down slower than scale-up.
    dep = deployments()[(NAMESPACE, "tuneship-triton")]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] in ("1", 1)
    assert 1 <= triton["minReplicas"] <= triton["maxReplicas"] <= 8
    for spec in (triton, found["tuneship-gateway"]["spec"]):
        b = spec["behavior"]
        assert b["scaleDown"]["stabilizationWindowSeconds"] > b["scaleUp"]["stabilizationWindowSeconds"]


@pytest.mark.parametrize("breakage, match", [
    (lambda h, d: h["tuneship-gateway"]["spec"]["scaleTargetRef"].update(name="tuneship-gatewy"),
     "no manifest in serving/k8s declares"),
    (lambda h, d: h["tuneship-triton"]["metadata"].update(namespace="default"),
     "no manifest in serving/k8s declares"),
    (lambda h, d: h["tuneship-triton"]["spec"]["scaleTargetRef"].update(kind="StatefulSet"),
     "not apps/v1 Deployment"),
    (lambda h, d: h["tuneship-triton"]["spec"].update(minReplicas=5),
     "minReplicas 5 > maxReplicas"),
    (lambda h, d: h["tuneship-triton"]["spec"]["metrics"][0]["pods"]["metric"].update(
        name="triton_queue_time_per_request"), "not one the adapter exposes"),
    (lambda h, d: d[(NAMESPACE, "tuneship-gateway")]["spec"]["template"]["spec"]["containers"][0]
     ["resources"]["requests"].pop("cpu"), "requests no cpu"),
], ids=["missing-deployment", "wrong-namespace", "not-a-deployment", "min-above-max",
        "metric-not-exposed", "no-cpu-request"])
def test_hpa_check_rejects(breakage, match):
    found, deps = copy.deepcopy(hpas()), copy.deepcopy(deployments())
    breakage(found, deps)
    problems = [p for hpa in found.values()
                for p in hpa_problems(hpa, deps, exposed_metrics(adapter_config()))]
    assert any(match in p for p in problems), problems


# --------------------------------------------------------------------------- adapter rule


def test_adapter_config_is_what_its_strict_loader_takes():
    cfg = adapter_config()
    assert adapter_config_problems(cfg) == []
    (rule,) = cfg["rules"]
    assert series_name(rule["seriesQuery"]) == "nv_inference_queue_duration_us"
    assert "nv_inference_request_success" in rule["metricsQuery"]
    assert exposed_metrics(cfg) == {"triton_queue_seconds_per_request": rule}


def test_adapter_checks_reject():
    cfg = adapter_config()
    broken = copy.deepcopy(cfg)
    broken["rules"][0]["name"]["match"] = broken["rules"][0]["name"].pop("matches")  # typo
    assert adapter_config_problems(broken) == ["rule 0.name: unknown key 'match'"]
    # A rename on the adapter's side: the HPA's metric is no longer exposed.
    renamed = copy.deepcopy(cfg)
    renamed["rules"][0]["name"]["as"] = "triton_queue_us_per_request"
    problems = hpa_problems(hpas()["tuneship-triton"], deployments(), exposed_metrics(renamed))
    assert any("not one the adapter exposes" in p for p in problems), problems
    # A rule whose name.matches does not match the series exposes nothing.
    unmatched = copy.deepcopy(cfg)
    unmatched["rules"][0]["name"]["matches"] = "^nv_inference_request_duration_us$"
    assert exposed_metrics(unmatched) == {}
    # Attached to namespaces only: no value per pod.
    no_pods = copy.deepcopy(cfg)
    del no_pods["rules"][0]["resources"]["overrides"]["pod"]
    problems = hpa_problems(hpas()["tuneship-triton"], deployments(), exposed_metrics(no_pods))
    assert any("maps no label to pods" in p for p in problems), problems


def test_go_expand_matches_go_semantics():
    m = re.search(r"^(.*)_total$", "http_requests_total")
    assert go_expand("${1}_per_second", m) == "http_requests_per_second"
    assert go_expand("$1_per_second", m) == ""  # Go reads the group name `1_per_second`
    assert go_expand("$0", m) == "http_requests_total"
    assert go_expand("cost$$", m) == "cost$"


# --------------------------------------------------------------------------- PromQL


def test_promtool_missing_fails_with_the_make_target(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pytest.fail.Exception, match="make promtool"):
        promtool()


def test_expanded_query_is_what_the_adapter_sends(expanded_query):
    assert "<<" not in expanded_query
    assert "rate(nv_inference_queue_duration_us{" in expanded_query
    assert f'namespace="{NAMESPACE}",pod=~"{"|".join(TRITON_PODS)}"' in expanded_query
    assert "max by (pod)" in expanded_query


def test_metrics_query_is_valid_promql(tmp_path, expanded_query):
    proc = check_rules(write_rule_file(tmp_path / "rules.yaml",
                                       "tuneship:triton_queue_seconds_per_request", expanded_query))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 1 rules found" in proc.stdout


@pytest.mark.parametrize("breakage", [
    lambda q: q.replace("[2m]", "[2m", 1),                   # unclosed range
    lambda q: q.replace("max by", "maximum by", 1),           # no such aggregation
    lambda q: q.replace("[2m]", "", 1),                       # rate() of an instant vector
], ids=["syntax", "unknown-aggregation", "type-error"])
def test_promtool_rejects_broken_promql(tmp_path, expanded_query, breakage):
    proc = check_rules(write_rule_file(tmp_path / "rules.yaml",
                                       "tuneship:triton_queue_seconds_per_request",
                                       breakage(expanded_query)))
    assert proc.returncode != 0
    assert "could not parse expression" in proc.stdout + proc.stderr


# Synthetic Triton counters, one sample every 15 s for 10 minutes, as Prometheus stores them
# after the scrape job's relabelling (namespace, pod) on top of Triton's labels (model, version).
#   pod a: triage_blue_trtllm gets 2 requests per 15 s, each waiting 50 ms (100,000 µs per 15 s);
#          its ensemble triage_blue counts the same requests with no queue of its own (pooling
#          the two would read 25 ms); faq_green_trtllm is loaded and idle.
#   pod b: triage_blue_trtllm gets 1 request per 15 s, each waiting 300 ms; Triton restarted
#          at 8m45s (both counters reset inside the 2m window).
#   pod c: models loaded, no request at all: reads 0 (not NaN from 0/0, which the adapter
#          cannot turn into a quantity).
#   another namespace's Triton, queueing badly: not asked for, must not show up.
def _series(pod: str, model: str, queue: str, success: str, namespace: str = NAMESPACE) -> list[dict]:
    labels = f'namespace="{namespace}",pod="{pod}",model="{model}",version="1"'
    return [{"series": f"nv_inference_queue_duration_us{{{labels}}}", "values": queue},
            {"series": f"nv_inference_request_success{{{labels}}}", "values": success}]


A, B, C = TRITON_PODS
INPUT_SERIES = (
    _series(A, "triage_blue_trtllm", "0+100000x40", "0+2x40")
    + _series(A, "triage_blue", "0+0x40", "0+2x40")
    + _series(A, "faq_green_trtllm", "0+0x40", "0+0x40")
    + _series(B, "triage_blue_trtllm", "0+300000x34 0+300000x5", "0+1x34 0+1x5")
    + _series(C, "faq_green_trtllm", "0+0x40", "0+0x40")
    + _series("tuneship-triton-other", "triage_blue_trtllm", "0+9000000x40", "0+1x40",
              namespace="elsewhere")
)
# Seconds of queue per request, per pod: what the HPA averages and holds to 100m.
EXPECTED = {A: 0.05, B: 0.3, C: 0.0}


def _unit_test_file(tmp_path: Path, expr: str, expected: dict[str, float]) -> Path:
    rules = write_rule_file(tmp_path / "rules.yaml", "tuneship:triton_queue_seconds_per_request", expr)
    test = {
        "rule_files": [rules.name],
        "evaluation_interval": "15s",
        "tests": [{
            "interval": "15s",
            "input_series": INPUT_SERIES,
            "promql_expr_test": [{
                "expr": expr,
                "eval_time": "10m",
                "exp_samples": [{"labels": f'{{pod="{pod}"}}', "value": v} for pod, v in expected.items()],
            }, {
                # The recording rule promtool checked evaluates to the same per-pod values.
                "expr": "tuneship:triton_queue_seconds_per_request",
                "eval_time": "10m",
                "exp_samples": [
                    {"labels": f'tuneship:triton_queue_seconds_per_request{{pod="{pod}"}}', "value": v}
                    for pod, v in expected.items()],
            }],
        }],
    }
    path = tmp_path / "queue_time_test.yaml"
    path.write_text(yaml.safe_dump(test, sort_keys=False, width=1000))
    return path


def test_metrics_query_computes_queue_seconds_per_request(tmp_path, expanded_query):
    proc = run_promtool("test", "rules", str(_unit_test_file(tmp_path, expanded_query, EXPECTED)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_unit_test_bites(tmp_path, expanded_query):
    # Pooling every model of a pod (sum over models, no max) halves pod a: 25 ms, not 50 ms.
    pods = "|".join(TRITON_PODS)
    pooled = textwrap.dedent(f"""
        sum by (pod) (rate(nv_inference_queue_duration_us{{namespace="{NAMESPACE}",pod=~"{pods}"}}[2m]))
        / clamp_min(sum by (pod) (rate(nv_inference_request_success{{namespace="{NAMESPACE}",pod=~"{pods}"}}[2m])), 1e-9)
        / 1e6""").strip()
    proc = run_promtool("test", "rules", str(_unit_test_file(tmp_path, pooled, EXPECTED)))
    assert proc.returncode != 0
    assert f'got: {{pod="{A}"}} 2.5E-02' in proc.stdout + proc.stderr
    # Without clamp_min the idle pod reads 0/0 = NaN.
    unclamped = re.sub(r"clamp_min\(\s*(.*?),\s*1e-9\s*\)", r"\1", expanded_query, flags=re.S)
    assert "clamp_min" not in unclamped
    proc = run_promtool("test", "rules", str(_unit_test_file(tmp_path, unclamped, EXPECTED)))
    assert proc.returncode != 0
    assert f'{{pod="{C}"}} NaN' in proc.stdout + proc.stderr
    # And the real query reads seconds, not the microseconds Triton counts in.
    micro = {pod: v * 1e6 for pod, v in EXPECTED.items()}
    proc = run_promtool("test", "rules", str(_unit_test_file(tmp_path, expanded_query, micro)))
    assert proc.returncode != 0
    assert f'got: {{pod="{A}"}} 5E-02' in proc.stdout + proc.stderr
