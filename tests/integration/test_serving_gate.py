"""The serving gate on the real tritonserver: compiled models measured side by side through
Triton's generate endpoint, their Python backend processes' memory read from this host.

Three models are served, as the colours of a task `srv`: `srv_green` (live: the tiny test
model, compiled), `srv_blue` (a real model on a wider architecture, 8 layers of 512 instead
of 2 of 96, compiled the same way: a slower, bigger candidate) and `same` (srv_blue's package
again). The equal candidate (`same` against `srv_blue`, about 0.1 s a request: the tiny
model's 5 ms requests are mostly timer and scheduler jitter at p95) passes; the wide one is
refused against the tiny one by the p95, tokens/s and memory gates, each with its figures,
and through the release stage it is unloaded with one alert while the live colour keeps
serving.
"""

from __future__ import annotations

import shutil

import pytest
from ml_fixtures import base_model, build_tiny, dataset, read_jsonl, shared_dir
from triton_server import start_triton

from tuneship import serving_gate
from tuneship.tasks import ServingSpec

WIDE = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 8,
        "corpus_docs": 200, "pretrain_steps": 2}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tuneship.compile import compile_for_triton

    repo = tmp_path_factory.mktemp("serving-repo")
    compile_for_triton(str(base_model(tmp_path_factory)), None, repo, "srv_green", deployment={"version": "1"})
    wide = build_tiny(shared_dir(tmp_path_factory) / "tiny-wide", seed=0, spec=WIDE)
    compile_for_triton(str(wide), None, repo, "srv_blue", deployment={"version": "2"})
    shutil.copytree(repo / "srv_blue", repo / "same")
    cfg = repo / "same" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('name: "srv_blue"', 'name: "same"'))
    server = start_triton(repo, tmp_path_factory.mktemp("log") / "triton.log")
    try:
        from tuneship.triton_control import TritonControl

        control = TritonControl(server.url)
        prompts = [r["prompt"] for r in read_jsonl(dataset(tmp_path_factory) / "eval.jsonl")]
        for model in ("srv_green", "same", "srv_blue"):
            control.load(model)
            control.warm_up(model, prompts[:2])
        yield server, prompts
    finally:
        server.stop()


SPEC = ServingSpec(requests=30, max_p95_ratio=1.5, min_tokens_per_s_ratio=0.67, max_memory_ratio=1.25,
                   price_per_hour=0.0864, max_cost_per_1k_tokens=0.05)


def test_an_equal_candidate_passes_with_every_figure_measured(served):
    server, prompts = served

    def measure_round(k: int) -> dict:
        return serving_gate.measure(server.url, ["same", "srv_blue"], prompts, 12, requests=30, seed=k,
                                    first=30 * k, log=print)

    # the decision as llm_release makes it: rounds while a gate is undecided
    readings, result = serving_gate.gate(SPEC, measure_round, "same", "srv_blue", seed=1, log=print)
    print(result["summary"])
    for r in readings.values():
        assert len(r.latency_ms) == 30 * result["rounds"] and all(ms > 0 for ms in r.latency_ms)
        assert sum(r.tokens) > 30  # Triton's own token counts, not a guess
        assert r.processes == 2 and r.memory_mb is not None and r.memory_mb > 50  # two instances' stubs
    assert result["passed"], result["summary"]
    assert [r["metric"] for r in result["rows"]] == ["p95_ms", "tokens_per_s", "peak_memory_mb", "cost_per_1k_tokens"]
    ratio = next(r for r in result["rows"] if r["metric"] == "tokens_per_s")
    assert ratio["diff_low"] <= ratio["diff"] <= ratio["diff_high"] and ratio["diff_low"] > 0.67
    cand = result["candidate"]
    assert cand["cost_per_1k_tokens"] == pytest.approx(0.0864 / 3600 / cand["tokens_per_s"] * 1000)


def test_a_slower_bigger_candidate_is_refused_by_latency_throughput_and_memory(served):
    server, prompts = served
    readings = serving_gate.measure(server.url, ["srv_blue", "srv_green"], prompts, 12, requests=30, seed=2, log=print)
    result = serving_gate.decide(SPEC, readings["srv_blue"], readings["srv_green"], seed=2)
    print(result["summary"])
    verdicts = {r["metric"] + (" ratio" if r["rule"].startswith("ratio") else ""): r["verdict"] for r in result["rows"]}
    assert not result["passed"]
    # decided, not merely inconclusive: the whole interval is past each margin
    assert verdicts["p95_ms ratio"] == "fail" and verdicts["tokens_per_s ratio"] == "fail", result["summary"]
    assert verdicts["peak_memory_mb ratio"] == "fail", result["summary"]
    assert verdicts["cost_per_1k_tokens"] == "pass"  # cheap enough in absolute terms: each gate judges its own
    p95 = next(r for r in result["rows"] if r["metric"] == "p95_ms")
    assert p95["diff_low"] > 1.5 and p95["value"] > p95["reference"]
    assert "FAIL p95_ms ratio <= 1.5 of live" in result["summary"]


def test_memory_gates_cannot_pass_unseen_and_absolute_gates_judge_a_first_release(served):
    server, prompts = served
    readings = serving_gate.measure(server.url, ["srv_blue"], prompts, 8, requests=20, seed=3, log=print)
    tight = SPEC.model_copy(update={"max_cost_per_1k_tokens": 1e-6, "max_memory_mb": 1.0})
    result = serving_gate.decide(tight, readings["srv_blue"], None)
    assert {r["metric"]: r["verdict"] for r in result["rows"]} == {"cost_per_1k_tokens": "fail",
                                                                   "peak_memory_mb": "fail"}
    assert result["live"] is None  # nothing live: no ratio gate, figures recorded all the same
    # a Triton whose processes this host cannot see (here: a reading without memory) cannot pass them
    readings["srv_blue"].memory_mb = None
    unseen = serving_gate.decide(SPEC.model_copy(update={"max_memory_mb": 4096.0}), readings["srv_blue"], None)
    row = next(r for r in unseen["rows"] if r["metric"] == "peak_memory_mb")
    assert row["verdict"] == "unreachable" and "not visible from this host" in row["reason"] and not unseen["passed"]


def test_the_release_stage_refuses_the_slower_candidate_unloads_it_and_says_so_once(served, tmp_path, monkeypatch):
    """`serving_candidate` as llm_release's serving_gate task runs it: measured against the live
    colour, figures on the version's MLflow run, the candidate unloaded, one Slack alert with
    the failing gates, live still serving."""
    from tuneship import registry
    from tuneship.notify import read_sink
    from tuneship.stages import Refusal, serving_candidate
    from tuneship.tasks import load_task
    from tuneship.triton_control import TritonControl

    server, _ = served
    monkeypatch.setenv("TUNESHIP_HOME", str(tmp_path / "home"))
    task = load_task("triage").model_copy(update={"name": "srv", "registered_model": "tuneship-serving-test"})
    versions = []
    for key in ("serving-v1", "serving-v2"):
        run_id = registry.start_run(key, run_name=key)
        versions.append(registry.register(run_id, key, tags={"base_model": "tiny"}, name=task.registered_model).version)
    control = TritonControl(server.url)
    plan = {"version": versions[1], "previous_colour": "green", "previous_version": versions[0], "dataset_version": None}
    sent = len(read_sink())
    with pytest.raises(Refusal, match="serving gates failed") as refused:
        serving_candidate(task, "srv_blue", plan, triton=control)
    assert "FAIL p95_ms ratio <= 1.5 of live" in str(refused.value)
    assert not control.is_ready("srv_blue") and control.is_ready("srv_green")
    (alert,) = read_sink()[sent:]
    assert alert["level"] == "error" and "failed its serving gates against srv_green" in alert["text"]
    assert "live traffic untouched" in alert["text"] and "FAIL tokens_per_s" in alert["text"]
    mv = registry.get_version(versions[1], task.registered_model)
    assert mv.tags["serving"] == "failed" and float(mv.tags["serving_p95_ms"]) > 0
    run = registry.client().get_run(mv.run_id)
    assert run.data.metrics["serving_p95_ms_ratio_low"] > 1.5
    assert {"serving_tokens_per_s", "serving_peak_memory_mb", "serving_cost_per_1k_tokens"} <= set(run.data.metrics)
    control.load("srv_blue")  # as the module's other tests found it
