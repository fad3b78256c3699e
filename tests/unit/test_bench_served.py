"""bench/served.py's cheap parts: AIPerf's JSON export parsed, the gateway/Triton goal, the
datasets and Triton body it writes, and its `aiperf profile` command line (checked against the
pinned AIPerf's own --help when .venv-aiperf is installed)."""

from __future__ import annotations

import json

import jinja2
import pytest

from bench import served

# The shape of AIPerf 0.13's profile_export_aiperf.json: metric tags at the top level.
EXPORT = {
    "schema_version": "1.1",
    "aiperf_version": "0.13.0",
    "was_cancelled": False,
    "error_summary": [],
    "output_token_throughput": {"unit": "tokens/sec", "avg": 123.456},
    "time_to_first_token": {"unit": "ms", "avg": 60.0, "p50": 52.04, "p95": 80.1},
    "inter_token_latency": {"unit": "ms", "avg": 0.6, "p50": 0.551},
    "request_latency": {"unit": "ms", "avg": 100.0, "p50": 90.0, "p95": 150.25},
    "output_sequence_length": {"unit": "tokens", "avg": 9.5},
    "request_throughput": {"unit": "requests/sec", "avg": 10.2},
    "request_count": {"unit": "requests", "avg": 79.0},
    "error_request_count": {"unit": "requests", "avg": 1.0},
    "benchmark_duration": {"unit": "sec", "avg": 7.8},
}


def test_parse_export_reads_the_figures():
    got = served.parse_export(EXPORT)
    assert got["output_tokens_per_s"] == 123.456
    assert got["ttft_p50_ms"] == 52.04
    assert got["itl_p50_ms"] == 0.551
    assert got["request_latency_p95_ms"] == 150.25
    assert got["output_tokens_mean"] == 9.5
    assert (got["requests_ok"], got["requests_failed"]) == (79, 1)
    assert "cancelled" not in got and "errors" not in got


def test_parse_export_missing_metrics_and_no_errors():
    data = {k: v for k, v in EXPORT.items() if k not in ("error_request_count", "inter_token_latency")}
    data["was_cancelled"] = True
    got = served.parse_export(data)
    assert got["requests_failed"] == 0
    assert got["itl_p50_ms"] is None
    assert got["cancelled"] is True


def _cell(tps, ok=16, failed=0, ttft=50.0, p95=200.0):
    return {"output_tokens_per_s": tps, "requests_ok": ok, "requests_failed": failed,
            "ttft_p50_ms": ttft, "request_latency_p95_ms": p95}


def test_ratio_goal_met_and_added_latency():
    r = served.ratios({"triton": _cell(100.0), "gateway": _cell(96.0, ttft=52.5, p95=210.0)})
    assert r["tokens_per_s_ratio"] == 0.96 and r["goal_met"] is True
    assert r["added_ttft_p50_ms"] == 2.5 and r["added_request_latency_p95_ms"] == 10.0


def test_ratio_goal_not_met_below_goal_or_with_failures():
    assert served.ratios({"triton": _cell(100.0), "gateway": _cell(94.9)})["goal_met"] is False
    # faster, but a request failed on either path: not met
    assert served.ratios({"triton": _cell(100.0), "gateway": _cell(99.0, failed=1)})["goal_met"] is False
    assert served.ratios({"triton": _cell(100.0, failed=1), "gateway": _cell(99.0)})["goal_met"] is False
    # nothing measured
    r = served.ratios({"triton": _cell(None), "gateway": _cell(99.0)})
    assert r["tokens_per_s_ratio"] is None and r["goal_met"] is False
    assert served.ratios({})["goal_met"] is False


def test_rounds_alternate_which_path_goes_first():
    assert served.round_order(1) == [(1, "triton"), (1, "gateway")]
    assert served.round_order(3) == [(1, "triton"), (1, "gateway"), (2, "gateway"), (2, "triton"),
                                     (3, "triton"), (3, "gateway")]


def test_combine_rounds_sums_requests_and_takes_medians():
    rounds = [served.parse_export(EXPORT),
              served.parse_export({**EXPORT, "output_token_throughput": {"avg": 100.0},
                                   "error_request_count": None}),
              served.parse_export({**EXPORT, "output_token_throughput": {"avg": 90.0}})]
    for i, r in enumerate(rounds):
        r["cpu_s"] = {"triton": 1.0 + i, "gateway": 0.5}
    got = served.combine(rounds)
    assert got["cpu_s"] == {"triton": 6.0, "gateway": 1.5}
    assert got["output_tokens_per_s"] == 100.0
    assert (got["requests_ok"], got["requests_failed"]) == (237, 2)
    assert got["duration_s"] == round(3 * 7.8, 3)
    assert served.combine(rounds[:1]) == rounds[0]


def test_dataset_lines_are_single_turn_entries():
    lines = served.dataset_lines(["a \"quoted\"\nprompt", "b"], 32).splitlines()
    assert [json.loads(line) for line in lines] == [
        {"text": "a \"quoted\"\nprompt", "output_length": 32}, {"text": "b", "output_length": 32}]


def test_triton_template_renders_the_generate_body():
    """AIPerf renders the template with autoescape on: the prompt must still arrive verbatim."""
    prompt = '<|im_start|>user\nSay "hi" & <bye>\'s<|im_end|>\n<|im_start|>assistant\n'
    tpl = jinja2.Environment(autoescape=True).from_string(served.TRITON_TEMPLATE)
    body = json.loads(tpl.render(text=prompt, max_tokens=32, stream=True))
    assert body == {"PROMPT": prompt, "MAX_TOKENS": 32, "STREAM": True}


def _command(mode, **kw):
    base = {"aiperf": "aiperf", "mode": mode, "url": "http://127.0.0.1:1", "model": "m", "tokenizer": "/tok",
            "input_file": "/in.jsonl", "concurrency": 8, "requests": 32, "artifact_dir": "/out"}
    return served.aiperf_command(**{**base, **kw})


def test_aiperf_command_per_mode():
    gw = _command("gateway", api_key="sk-x")
    assert gw[:2] == ["aiperf", "profile"]
    assert gw[gw.index("--endpoint-type") + 1] == "chat" and "--streaming" in gw
    assert gw[gw.index("--api-key") + 1] == "sk-x"
    assert gw[gw.index("--concurrency") + 1] == "8" and gw[gw.index("--request-count") + 1] == "32"
    tr = _command("triton", template_file="/t.j2", endpoint="/v2/models/llm_fp32/generate_stream")
    assert tr[tr.index("--endpoint-type") + 1] == "template" and "--api-key" not in tr
    assert tr[tr.index("--custom-endpoint") + 1] == "/v2/models/llm_fp32/generate_stream"
    extras = [tr[i + 1] for i, a in enumerate(tr) if a == "--extra-inputs"]
    assert extras == ["payload_template:/t.j2", "response_field:COMPLETION"]
    with pytest.raises(ValueError):
        _command("triton")
    with pytest.raises(ValueError):
        _command("grpc")


def test_commands_are_checked_against_the_installed_aiperfs_help():
    """`make bench` refuses to start when the pinned AIPerf would not take an option or a
    choice the bench passes (bench/served.py checks `aiperf profile --help` first)."""
    cmds = [_command("gateway", api_key="k"), _command("triton", template_file="/t", endpoint="/e")]
    flags = sorted({a for c in cmds for a in c if a.startswith("--")})
    help_text = " ".join(flags) + " choices: [chat, template, single-turn, sequential, none, simple]"
    assert served.unknown_flags(cmds, help_text) == []
    older = help_text.replace("--dataset-sampling-strategy", "--sampling")
    assert served.unknown_flags(cmds, older) == ["--dataset-sampling-strategy"]
    assert served.unknown_flags(cmds, help_text.replace("template,", "")) == ["--endpoint-type template"]
