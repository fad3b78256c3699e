"""The served paths of SmolLM2-135M-Instruct, measured with NVIDIA AIPerf: straight to Triton
and through the gateway, at each compiled precision and client concurrency.

bench/compile.py times eager PyTorch and each precision called in-process; this bench puts
the same compiled packages behind the real servers and measures them with the field's own
client for OpenAI-compatible endpoints, so the figures read like everyone else's:

1. the Triton package at each precision (--precisions, default fp32,int8,int4) is built once
   by `compile_for_triton` into TUNESHIP_HOME/bench/served/triton-<precision>/llm_<precision>
   and reused while the base model's weights, the Triton model code and the config template
   are unchanged (the instance count is re-rendered into config.pbtxt on reuse);
2. one real tritonserver and one real gateway (`bench.gateway`'s server set-up: free loopback
   ports, a client key enforced, the inference log on; no echo models) serve it; the
   precision's model is loaded alone and routed live with the
   model's own chat template in the route's metadata, as `llm_release` routes a release;
3. AIPerf (`aiperf profile`, from its own environment .venv-aiperf: `make bench` installs it)
   runs per concurrency (--concurrency, default 1,8) a fixed number of requests (--requests,
   default 16,32), the same chat questions as bench/compile.py, sent in the same order:
     gateway  POST /v1/chat/completions, `--endpoint-type chat --streaming`: the OpenAI body
              (messages; the gateway renders the chat template);
     triton   POST /v2/models/llm_<precision>/generate_stream, `--endpoint-type template
              --streaming`: a Jinja body {PROMPT, MAX_TOKENS, STREAM} holding the prompt the
              gateway renders (its own `chat_prompt`), each server-sent event's COMPLETION
              read as the next piece (`response_field`);
   both with the base model's tokenizer (a local path: output tokens are counted by AIPerf
   from the text, the same way on both paths) and max tokens --max-tokens (the model still
   stops at eos or a newline: the actual output length is reported);
4. from each run's profile_export_aiperf.json: output tokens/s, time to first token p50,
   inter-token latency p50, request latency p50/p95, output length, requests ok / failed;
   per run the CPU seconds of Triton's process tree, the gateway's and AIPerf's own; while a
   precision is measured, the peak resident memory of Triton's process tree (tritonserver
   and its Python backend stubs, sampled every 0.1 s).

Goal (issue 13): through the gateway at least 95% of direct Triton's output tokens/s, per
precision and concurrency. One answer per path is compared first (a greedy model: both paths
must say the same). The machine is shared and AIPerf runs on the same cores (2 here): the
load average at start and end is recorded, and --rounds N runs each path N times per cell,
alternating which goes first (figures: the median over rounds; each round's ratio is kept).
AIPerf's own exports of the latest run stay in TUNESHIP_HOME/bench/served/aiperf-last.

    python -m bench served   or   python -m bench.served [--precisions fp32,int8] [--concurrency 1,8]
        [--requests 16,32] [--rounds 1] [--max-tokens 32] [--instances 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench import emit
from bench.compile import QUESTIONS
from bench.gateway import servers
from bench.tree import PeakRss, cpu_seconds, tree
from tuneship import config

NAME = "smollm2-135m-instruct"
GOAL_RATIO = 0.95
MODES = ("triton", "gateway")
SERVED_MODEL = "tuneship"  # the gateway's served model name (its default)
AIPERF = config.REPO_ROOT / ".venv-aiperf" / "bin" / "aiperf"
EXPORT_FILE = "profile_export_aiperf.json"  # AIPerf 0.13's summary export
# Triton's generate_stream body; AIPerf's template endpoint renders it per request (`text`:
# the dataset entry, `max_tokens`: its output_length, `stream`: --streaming).
TRITON_TEMPLATE = '{"PROMPT": {{ text|tojson }}, "MAX_TOKENS": {{ max_tokens|int }}, "STREAM": {{ stream|tojson }}}'
TRITON_RESPONSE_FIELD = "COMPLETION"
# Metrics kept from the export: (AIPerf tag, statistic) -> our name.
FIGURES = {
    ("output_token_throughput", "avg"): "output_tokens_per_s",
    ("time_to_first_token", "p50"): "ttft_p50_ms",
    ("time_to_first_token", "p95"): "ttft_p95_ms",
    ("inter_token_latency", "p50"): "itl_p50_ms",
    ("request_latency", "p50"): "request_latency_p50_ms",
    ("request_latency", "p95"): "request_latency_p95_ms",
    ("output_sequence_length", "avg"): "output_tokens_mean",
    ("request_throughput", "avg"): "requests_per_s",
    ("request_count", "avg"): "requests_ok",
    ("error_request_count", "avg"): "requests_failed",
    ("benchmark_duration", "avg"): "duration_s",
}


def say(msg: str) -> None:
    print(f"[served] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- AIPerf: command and export


def aiperf_command(*, aiperf: Path | str, mode: str, url: str, model: str, tokenizer: Path | str,
                   input_file: Path | str, concurrency: int, requests: int, artifact_dir: Path | str,
                   warmup: int = 2, api_key: str | None = None, template_file: Path | str | None = None,
                   endpoint: str | None = None) -> list[str]:
    """`aiperf profile` for one cell: `mode` "gateway" (OpenAI chat, streaming) or "triton"
    (template endpoint on Triton's generate_stream, streaming). Sequential sampling of the
    input file and a fixed seed: every cell sends the same prompts in the same order. One
    worker and one record processor: the client shares this machine's few cores with the
    servers it measures; server-metrics scraping, GPU telemetry, plots and the UI are off."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    cmd = [str(aiperf), "profile", "--model", model, "--url", url, "--streaming",
           "--tokenizer", str(tokenizer),
           "--input-file", str(input_file), "--custom-dataset-type", "single_turn",
           "--dataset-sampling-strategy", "sequential", "--random-seed", "0",
           "--concurrency", str(concurrency), "--request-count", str(requests),
           "--warmup-request-count", str(warmup),
           "--output-artifact-dir", str(artifact_dir),
           "--ui-type", "none", "--no-server-metrics", "--no-gpu-telemetry", "--no-auto-plot",
           "--workers-max", "1", "--record-processor-service-count", "1"]
    if mode == "gateway":
        cmd += ["--endpoint-type", "chat"]
        if api_key:
            cmd += ["--api-key", api_key]
    else:
        if template_file is None or endpoint is None:
            raise ValueError("the triton mode needs template_file and endpoint")
        cmd += ["--endpoint-type", "template", "--custom-endpoint", endpoint,
                "--extra-inputs", f"payload_template:{template_file}",
                "--extra-inputs", f"response_field:{TRITON_RESPONSE_FIELD}"]
    return cmd


CHOICE_FLAGS = ("--endpoint-type", "--custom-dataset-type", "--dataset-sampling-strategy", "--ui-type")


def unknown_flags(cmds: list[list[str]], help_text: str) -> list[str]:
    """What in `cmds` the installed `aiperf profile --help` does not list: an option, or a
    value of a choice option that is not among its choices (empty: all known)."""
    known = set(re.findall(r"--[a-z][a-z0-9-]+", help_text))
    bad = []
    for cmd in cmds:
        bad += [a for a in cmd if a.startswith("--") and a not in known]
        for flag in CHOICE_FLAGS:
            if flag in cmd:
                value = cmd[cmd.index(flag) + 1].replace("_", "-")
                if not re.search(rf"[\s,\[:]{re.escape(value)}[,\]\s]", help_text):
                    bad.append(f"{flag} {value}")
    return sorted(set(bad))


def check_flags(aiperf: str, cmds: list[list[str]]) -> None:
    """Refuse to start when the pinned AIPerf would not understand a command (before any
    model is built or served)."""
    env = {**os.environ, "COLUMNS": "300", "NO_COLOR": "1"}
    help_text = subprocess.run([aiperf, "profile", "--help"], capture_output=True, text=True, env=env,
                               timeout=300).stdout
    if bad := unknown_flags(cmds, help_text):
        raise SystemExit(f"[served] {aiperf} profile does not take {bad}: bench/requirements-aiperf.txt pins "
                         "another AIPerf than bench/served.py was written for")


def parse_export(data: dict[str, Any]) -> dict[str, Any]:
    """Our figures from AIPerf's profile_export_aiperf.json (metric tags at the top level,
    each {unit, avg, p50, p95, ...}); a metric AIPerf did not report reads None, and a run
    with no failures reports no error_request_count (0 here)."""
    out: dict[str, Any] = {}
    for (tag, stat), name in FIGURES.items():
        metric = data.get(tag)
        value = metric.get(stat) if isinstance(metric, dict) else None
        out[name] = None if value is None else round(float(value), 3)
    for name in ("requests_ok", "requests_failed"):
        out[name] = int(out[name] or 0)
    if data.get("was_cancelled"):
        out["cancelled"] = True
    if data.get("error_summary"):
        out["errors"] = data["error_summary"][:5]
    return out


def ratios(cells: dict[str, dict[str, Any]], goal: float = GOAL_RATIO) -> dict[str, Any]:
    """Gateway against direct Triton for one precision and concurrency: tokens/s ratio (the
    goal), and the TTFT and p95 latency the gateway adds. Not met when either path failed a
    request or measured nothing."""
    t, g = cells.get("triton") or {}, cells.get("gateway") or {}
    tps_t, tps_g = t.get("output_tokens_per_s"), g.get("output_tokens_per_s")
    ratio = tps_g / tps_t if tps_t and tps_g is not None else None
    added = {k: (round(g[k] - t[k], 3) if g.get(k) is not None and t.get(k) is not None else None)
             for k in ("ttft_p50_ms", "request_latency_p95_ms")}
    clean = all(c.get("requests_failed", 1) == 0 and c.get("requests_ok", 0) > 0 for c in (t, g))
    return {"tokens_per_s_ratio": None if ratio is None else round(ratio, 3),
            "added_ttft_p50_ms": added["ttft_p50_ms"], "added_request_latency_p95_ms": added["request_latency_p95_ms"],
            "goal": goal, "goal_met": bool(ratio is not None and ratio >= goal and clean)}


def round_order(rounds: int) -> list[tuple[int, str]]:
    """(round, path) in the order run: the paths alternate which goes first, so drift on a
    shared machine hits both alike."""
    return [(r, m) for r in range(1, rounds + 1) for m in (MODES if r % 2 else MODES[::-1])]


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One path's figures over its rounds: requests summed, every other figure the median
    of the rounds' (one round: that round's figures)."""
    if len(runs) == 1:
        return dict(runs[0])
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r.get(key) for r in runs]
        if key in ("requests_ok", "requests_failed", "aiperf_wall_s", "duration_s"):
            out[key] = round(sum(v or 0 for v in values), 3)
        elif all(isinstance(v, dict) for v in values):  # cpu_s: summed per process
            out[key] = {k: round(sum(v.get(k) or 0 for v in values), 2) for k in values[0]}
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = round(statistics.median(values), 3)
        else:
            out[key] = values
    return out


def dataset_lines(texts: list[str], max_tokens: int) -> str:
    """AIPerf single_turn JSONL: one entry per prompt, its max output tokens fixed."""
    return "".join(json.dumps({"text": t, "output_length": max_tokens}) + "\n" for t in texts)


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_aiperf(cmd: list[str], artifact_dir: Path, timeout: float,
               watch: dict[str, int] | None = None) -> dict[str, Any]:
    """Run one AIPerf cell; its JSON export parsed (raises with AIPerf's output tail if none).
    `watch`: name -> pid of a server whose process tree's CPU seconds over the run are
    recorded (`cpu_s`, with AIPerf's own: its processes are this one's waited-for children)."""
    # Not HF_HUB_OFFLINE (which `make` exports): AIPerf 0.13 then looks a tokenizer up only
    # in the hub cache, by repo id, and rejects a local path; online it loads a local
    # directory with AutoTokenizer and never calls the hub.
    drop = ("VIRTUAL_ENV", "PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    artifact_dir.mkdir(parents=True, exist_ok=True)
    procs = {name: tree(pid) for name, pid in (watch or {}).items()}
    cpu0 = {name: cpu_seconds(p) for name, p in procs.items()}
    client0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=artifact_dir)
    wall = time.perf_counter() - t0
    cpu = {name: round(cpu_seconds(p) - cpu0[name], 2) for name, p in procs.items()}
    cpu["aiperf"] = round(_children_cpu() - client0, 2)  # AIPerf and its services, start-up included
    (artifact_dir / "aiperf.log").write_text(proc.stdout + proc.stderr)
    exports = sorted(artifact_dir.rglob(EXPORT_FILE))
    if not exports:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"AIPerf wrote no {EXPORT_FILE} (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    out = parse_export(json.loads(exports[-1].read_text()))
    out["aiperf_wall_s"] = round(wall, 1)
    out["cpu_s"] = cpu
    out["aiperf_exit"] = proc.returncode
    return out


# ---------------------------------------------------------------- packages


def package_key(hf_dir: Path, precision: str, max_new_tokens: int) -> dict[str, Any]:
    """What a cached package was built from; a different key rebuilds it."""
    from tuneship.basemodel import sha256_file
    from tuneship.compile import TRITON_TEMPLATE_DIR

    manifest = json.loads((hf_dir / "base_model.json").read_text())
    return {"precision": precision, "base_weights_sha256": manifest.get("weights_sha256"),
            "model_py_sha256": sha256_file(TRITON_TEMPLATE_DIR / "model.py"),
            "config_template_sha256": sha256_file(TRITON_TEMPLATE_DIR / "config.pbtxt.tmpl"),
            "max_new_tokens": max_new_tokens}


def ensure_package(work: Path, hf_dir: Path, precision: str, instances: int, max_new_tokens: int) -> dict[str, Any]:
    """The Triton package of the base model at `precision` (model `llm_<precision>`), built
    once under `work` and reused; config.pbtxt re-rendered with `instances`."""
    from tuneship.compile import BUILD_FILES, compile_for_triton, render_config

    repo = work / f"triton-{precision}"
    model = f"llm_{precision}"
    key = package_key(hf_dir, precision, max_new_tokens)
    key_file = repo / "package.json"
    vdir = repo / model / "1"
    built_s = None
    if not (key_file.is_file() and json.loads(key_file.read_text()).get("key") == key and (vdir / "model.onnx").is_file()):
        say(f"compiling {precision} into {repo} (once; reused while the base model and model code are unchanged) ...")
        t0 = time.perf_counter()
        chats = [[{"role": "user", "content": q}] for q in QUESTIONS[:4]]
        compile_for_triton(str(hf_dir), None, repo, model, deployment={"bench": "served"},
                           max_new_tokens=max_new_tokens, instances=instances, precision=precision,
                           parity_prompts=chats[:2],
                           quality_gate=(lambda answers: {"answers": answers(chats, 12)}) if precision != "fp32" else None)
        built_s = round(time.perf_counter() - t0, 1)
        key_file.write_text(json.dumps({"key": key, "built_s": built_s}, indent=2))
    else:
        say(f"reusing the {precision} package in {repo}")
    deployment = json.loads((vdir / "deployment.json").read_text())
    (repo / model / "config.pbtxt").write_text(render_config(model, 1, deployment, instance_count=instances))
    generation = json.loads((vdir / "generation.json").read_text())
    return {"model": model, "dir": repo / model, "generation": generation, "built_s": built_s,
            "artifact_bytes": sum((vdir / n).stat().st_size for n in BUILD_FILES[:2])}


# ---------------------------------------------------------------- servers and memory


def _post(url: str, **kw: Any) -> httpx.Response:
    r = httpx.post(url, timeout=300, **kw)
    if r.status_code != 200:
        raise RuntimeError(f"POST {url}: {r.status_code} {r.text[:500]}")
    return r


def _route(s: dict[str, Any], model: str, generation: dict[str, Any]) -> None:
    """Route the gateway's served model to `model`, with the chat template and BOS the
    package's generation.json carries (what `tuneship.stages.route_for` puts on a release)."""
    metadata = {"prompt_format": "chat", "chat_template": generation.get("chat_template"),
                "bos_token": generation.get("bos_token")}
    body = {"live": {"colour": "blue", "model": model, "version": "1",
                     "metadata": {k: v for k, v in metadata.items() if v is not None}}}
    r = httpx.put(f"{s['gateway_url']}/admin/routes", json=body, headers=s["admin"], timeout=30)
    if r.status_code != 200:
        raise RuntimeError(f"PUT /admin/routes: {r.status_code} {r.text}")


def triton_prompt(question: str, generation: dict[str, Any]) -> str:
    """The PROMPT the gateway sends Triton for a one-message chat: its own rendering."""
    from serving.gateway.chat import ChatTemplate, chat_prompt
    from serving.gateway.settings import GatewaySettings

    fields = GatewaySettings.model_fields
    bos = generation.get("bos_token")
    template = ChatTemplate(generation["chat_template"], fields["chat_bos_token"].default if bos is None else str(bos),
                            fields["chat_eos_token"].default)
    return chat_prompt([{"role": "user", "content": question}], template)


def _same_answer(s: dict[str, Any], model: str, question: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One whole answer from each path: a greedy model must say the same through both."""
    direct = _post(f"{s['triton_url']}/v2/models/{model}/generate",
                   json={"PROMPT": prompt, "MAX_TOKENS": max_tokens}).json()["COMPLETION"]
    gw = _post(f"{s['gateway_url']}/v1/chat/completions", headers={"Authorization": f"Bearer {s['key']}"},
               json={"model": SERVED_MODEL, "max_tokens": max_tokens,
                     "messages": [{"role": "user", "content": question}]}).json()
    text = gw["choices"][0]["message"]["content"]
    return {"question": question, "triton": direct, "gateway": text, "equal": direct == text}


@contextlib.contextmanager
def _model_loaded(s: dict[str, Any], package: dict[str, Any]) -> Iterator[None]:
    repo: Path = s["triton"].repository
    link = repo / package["model"]
    if link.is_symlink() or link.exists():
        link.unlink() if link.is_symlink() else shutil.rmtree(link)
    link.symlink_to(package["dir"], target_is_directory=True)
    _post(f"{s['triton_url']}/v2/repository/models/{package['model']}/load")
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            _post(f"{s['triton_url']}/v2/repository/models/{package['model']}/unload")
        link.unlink()


def _wait_gone(pid: int, before: int, timeout: float = 30) -> None:
    """After an unload: wait for the unloaded model's backend stubs to exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            if len(psutil.Process(pid).children(recursive=True)) <= before:
                return
        time.sleep(0.2)


# ---------------------------------------------------------------- driver


def cpu_per_token(r: dict[str, Any]) -> str:
    """Server CPU per output token over a run, warm-up requests included (an upper bound)."""
    cpu, tokens = r.get("cpu_s") or {}, (r.get("output_tokens_mean") or 0) * r.get("requests_ok", 0)
    if not tokens or "triton" not in cpu:
        return "-"
    return f"{cpu['triton'] / tokens * 1000:.1f}+{cpu.get('gateway', 0) / tokens * 1000:.1f}"


def _print_table(result: dict[str, Any]) -> None:
    head = (f"{'precision':<9} {'c':>2} {'path':<8} {'ok':>4} {'fail':>4} {'tok/s':>7} {'TTFT p50':>9} "
            f"{'ITL p50':>8} {'lat p95':>8} {'out tok':>7}  CPU ms/token triton+gateway")
    print(f"[served] {head}", flush=True)
    for precision, p in result["precisions"].items():
        for c, cell in p["concurrency"].items():
            for m in MODES:
                r = cell[m]

                def f(v: Any, spec: str) -> str:
                    return "-" if v is None else format(v, spec)

                print(f"[served] {precision:<9} {c:>2} {m:<8} {r['requests_ok']:>4} {r['requests_failed']:>4} "
                      f"{f(r['output_tokens_per_s'], '7.1f')} {f(r['ttft_p50_ms'], '6.1f')} ms "
                      f"{f(r['itl_p50_ms'], '5.2f')} ms {f(r['request_latency_p95_ms'], '5.0f')} ms "
                      f"{f(r['output_tokens_mean'], '7.1f')}  {cpu_per_token(r)}", flush=True)
            v = cell["gateway_vs_triton"]
            rounds = f" (rounds: {', '.join(f(x, '.3f') for x in v['per_round'])})" if "per_round" in v else ""
            print(f"[served] {precision:<9} {c:>2} gateway/triton tokens/s {f(v['tokens_per_s_ratio'], '.3f')}{rounds} "
                  f"(goal >= {v['goal']:.2f}: {'met' if v['goal_met'] else 'NOT met'}); added TTFT p50 "
                  f"{f(v['added_ttft_p50_ms'], '+.1f')} ms, p95 latency {f(v['added_request_latency_p95_ms'], '+.0f')} ms",
                  flush=True)
        print(f"[served] {precision:<9} Triton peak RSS {p['triton_peak_rss_mb']} MB, artifact "
              f"{p['artifact_mb']} MB, {p['triton_instances']} instance(s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.served", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precisions", default="fp32,int8,int4", help="comma-separated packages to serve")
    ap.add_argument("--concurrency", default="1,8", help="comma-separated client concurrencies")
    ap.add_argument("--requests", default="16,32", help="requests per cell, one per concurrency (or one for all)")
    ap.add_argument("--max-tokens", type=int, default=32, help="max output tokens per request (eos/newline still stop)")
    ap.add_argument("--warmup", type=int, default=2, help="AIPerf warm-up requests per cell (not counted)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of each path per cell, alternating which goes first (figures: median over rounds)")
    ap.add_argument("--instances", type=int, default=2, help="Triton model instances (compile_for_triton's default)")
    ap.add_argument("--prompts", type=int, default=len(QUESTIONS), help=f"chat questions used (max {len(QUESTIONS)})")
    ap.add_argument("--aiperf", default=str(AIPERF), help="the aiperf executable (default .venv-aiperf/bin/aiperf)")
    ap.add_argument("--cell-timeout", type=float, default=600.0, help="seconds one AIPerf run may take")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    counts = [int(n) for n in args.requests.split(",") if n.strip()]
    if len(counts) == 1:
        counts *= len(concurrencies)
    if len(counts) != len(concurrencies):
        ap.error("--requests takes one count, or one per concurrency")
    if not Path(args.aiperf).is_file():
        say(f"{args.aiperf} is missing: `make bench` installs AIPerf into .venv-aiperf "
            "(or: uv pip install --python .venv-aiperf/bin/python -r bench/requirements-aiperf.txt)")
        return 2
    sample = {"aiperf": args.aiperf, "url": "http://127.0.0.1:1", "model": "m", "tokenizer": "/t", "input_file": "/i",
              "concurrency": 1, "requests": 1, "artifact_dir": "/a"}
    check_flags(args.aiperf, [aiperf_command(mode="gateway", api_key="k", **sample),
                              aiperf_command(mode="triton", template_file="/t", endpoint="/e", **sample)])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tuneship.basemodel import ensure_packaged

    t_start = time.monotonic()
    work = config.home() / "bench" / "served"
    work.mkdir(parents=True, exist_ok=True)
    # The converted base model is shared with bench/compile.py (same models dir).
    os.environ["TUNESHIP_MODELS"] = str(config.home() / "bench" / "compile" / "models")
    hf_dir = ensure_packaged(NAME, log=say)
    questions = QUESTIONS[: args.prompts]
    version = subprocess.run([args.aiperf, "--version"], capture_output=True, text=True).stdout.strip()
    result: dict[str, Any] = {
        "bench": "served", "model": NAME, "client": f"AIPerf {version or '?'} (aiperf profile), streaming",
        "paths": {"triton": "POST /v2/models/llm_<precision>/generate_stream (AIPerf template endpoint)",
                  "gateway": "POST /v1/chat/completions (AIPerf chat endpoint), client key enforced, inference log on"},
        "tokenizer": str(hf_dir), "prompts": len(questions), "max_tokens": args.max_tokens,
        "requests": dict(zip(map(str, concurrencies), counts, strict=True)), "warmup_requests": args.warmup,
        "rounds": args.rounds,
        "ort_threads_per_instance": int(os.environ.get("TUNESHIP_ORT_THREADS", "1")),
        "cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "goal": {"gateway_tokens_per_s_ratio": GOAL_RATIO}, "precisions": {},
    }
    packages = {p: ensure_package(work, hf_dir, p, args.instances, args.max_tokens) for p in args.precisions.split(",")}
    with tempfile.TemporaryDirectory(prefix="served-", dir=work) as wd, servers(Path(wd), echo_models=()) as s:
        triton_pid = s["triton"].proc.pid
        say(f"triton {s['triton_url']}, gateway {s['gateway_url']}")
        artifacts = work / "aiperf-last"  # AIPerf's own exports of the latest run, kept for a look
        shutil.rmtree(artifacts, ignore_errors=True)
        artifacts.mkdir(parents=True)
        template_file = artifacts / "triton_generate_stream.json.j2"
        template_file.write_text(TRITON_TEMPLATE)
        for precision, package in packages.items():
            model, generation = package["model"], package["generation"]
            gw_file, tr_file = artifacts / f"gateway-{precision}.jsonl", artifacts / f"triton-{precision}.jsonl"
            gw_file.write_text(dataset_lines(questions, args.max_tokens))
            tr_file.write_text(dataset_lines([triton_prompt(q, generation) for q in questions], args.max_tokens))
            entry: dict[str, Any] = {"model": model, "triton_instances": args.instances,
                                     "artifact_mb": round(package["artifact_bytes"] / 1e6, 1),
                                     "compile_s": package["built_s"], "concurrency": {}}
            with _model_loaded(s, package), PeakRss(triton_pid) as rss:
                _route(s, model, generation)
                entry["same_answer"] = _same_answer(s, model, questions[0], triton_prompt(questions[0], generation),
                                                    args.max_tokens)
                say(f"{precision}: {model} loaded and routed; one answer through both paths "
                    f"{'identical' if entry['same_answer']['equal'] else 'DIFFERS'}: {entry['same_answer']['gateway']!r}")
                for c, n in zip(concurrencies, counts, strict=True):
                    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
                    for r, mode in round_order(args.rounds):
                        common = {"aiperf": args.aiperf, "mode": mode, "tokenizer": hf_dir, "concurrency": c,
                                  "requests": n, "warmup": args.warmup,
                                  "artifact_dir": artifacts / f"{precision}-c{c}-{mode}-r{r}"}
                        if mode == "triton":
                            cmd = aiperf_command(**common, url=s["triton_url"], model=model, input_file=tr_file,
                                                 template_file=template_file,
                                                 endpoint=f"/v2/models/{model}/generate_stream")
                        else:
                            cmd = aiperf_command(**common, url=s["gateway_url"], model=SERVED_MODEL,
                                                 input_file=gw_file, api_key=s["key"])
                        say(f"{precision} c={c} {mode} round {r}: {n} requests ...")
                        got = run_aiperf(cmd, Path(common["artifact_dir"]), args.cell_timeout,
                                         watch={"triton": triton_pid, "gateway": s["gateway"].pid})
                        runs[mode].append(got)
                        say(f"{precision} c={c} {mode} round {r}: {got['output_tokens_per_s']} tokens/s, "
                            f"{got['requests_ok']} ok, {got['requests_failed']} failed ({got['aiperf_wall_s']} s; "
                            f"CPU s triton {got['cpu_s']['triton']}, gateway {got['cpu_s']['gateway']}, "
                            f"aiperf {got['cpu_s']['aiperf']})")
                    cell: dict[str, Any] = {m: combine(runs[m]) for m in MODES}
                    cell["gateway_vs_triton"] = ratios(cell)
                    if args.rounds > 1:
                        cell["gateway_vs_triton"]["per_round"] = [
                            ratios({"triton": t, "gateway": g})["tokens_per_s_ratio"]
                            for t, g in zip(runs["triton"], runs["gateway"], strict=True)]
                    entry["concurrency"][str(c)] = cell
            entry["triton_peak_rss_mb"] = round(rss.peak / 1e6, 1)
            _wait_gone(triton_pid, 0)
            result["precisions"][precision] = entry
    result["goal"]["met"] = all(cell["gateway_vs_triton"]["goal_met"] for p in result["precisions"].values()
                                for cell in p["concurrency"].values())
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.monotonic() - t_start, 1)
    _print_table(result)
    say(f"goal (gateway >= {GOAL_RATIO:.0%} of direct Triton tokens/s, no failed request) "
        f"{'met' if result['goal']['met'] else 'NOT met'}; {result['wall_s']} s")
    emit(result, str(args.out or config.home() / "bench" / "served.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
