"""Gateway overhead: added latency and throughput against calling Triton directly.

Triton (the real binary, as the tests start it) serves the echo model of the gateway tests
(tests/fixtures/triton_models/echo_llm: Python backend, no computation) as llm_blue and
llm_green, so what differs between the two paths is the gateway alone. The gateway is
`python -m serving.gateway` as the tests run it, with a client key enforced (unlimited rpm)
and the inference log on. The same prompts go

    direct   POST triton /v2/models/llm_blue/infer   the KServe v2 JSON body the gateway sends
    gateway  POST gateway /v1/completions            the OpenAI body, Bearer key

from a closed-loop client in this process (aiohttp on uvloop: `concurrency` keep-alive
connections, each sending its next request when the last one is answered) for `--seconds`
per run. Modes run in alternating rounds (direct, gateway, gateway with mirroring, direct,
...) so drift on a shared machine hits them alike; latencies are pooled over the rounds.
Mirroring on: llm_green is the shadow and every request is offered to it (mirror_sample 1),
so Triton gets a second copy of each request off the live path.

Figures per concurrency: median and p99 latency and requests/s of each mode; added latency
= gateway percentile - direct percentile; throughput ratio = gateway / direct; CPU time per
request of the gateway process, Triton (with its backend stubs) and this client. Goal (issue
5): <= 1 ms added at the median, <= 3 ms at p99, >= 90 % of direct throughput.

    python -m bench.gateway [--concurrency 1,16] [--seconds 6] [--rounds 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.tree import cpu_seconds, tree
from tuneship import config, tritonserver

GOAL = {"p50_added_ms": 1.0, "p99_added_ms": 3.0, "throughput_ratio": 0.90}
MODES = ("direct", "gateway", "gateway_mirror")
ECHO_MODEL = config.REPO_ROOT / "tests" / "fixtures" / "triton_models" / "echo_llm"
MAX_TOKENS = 16
CHECK_EVERY = 97  # parse and check one response in this many (parsing is client CPU, not the gateway's)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts(n: int = 256) -> list[str]:
    issues = ("I was charged twice", "my parcel has not arrived", "I want to return these shoes",
              "I cannot log in to my account", "the app crashes on start", "where is my refund")
    return [f"Ticket: order {i}: {issues[i % len(issues)]}, no rush\nTriage:" for i in range(n)]


def _bodies() -> dict[str, list[bytes]]:
    """The same prompts as the direct (KServe v2) and the gateway (OpenAI) request bodies."""
    from serving.gateway.triton import OUTPUTS

    direct, gateway = [], []
    for p in _prompts():
        direct.append(json.dumps({
            "inputs": [{"name": "PROMPT", "shape": [1], "datatype": "BYTES", "data": [p]},
                       {"name": "MAX_TOKENS", "shape": [1], "datatype": "INT32", "data": [MAX_TOKENS]}],
            "outputs": [{"name": n, "parameters": {"binary_data": False}} for n in OUTPUTS],
        }).encode())
        gateway.append(json.dumps({"model": "tuneship", "prompt": p, "max_tokens": MAX_TOKENS}).encode())
    return {"direct": direct, "gateway": gateway}


def _answer(mode: str, body: bytes) -> str:
    data = json.loads(body)
    if mode == "direct":
        return next(o["data"][0] for o in data["outputs"] if o["name"] == "COMPLETION")
    return data["choices"][0]["text"]


def _pct(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


# ---------------------------------------------------------------- the client


async def _drive(url: str, bodies: list[bytes], headers: dict[str, str], concurrency: int,
                 seconds: float, mode: str, marker: str) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one(body: bytes) -> tuple[int, bytes]:
            async with session.post(url, data=body, headers=headers) as r:
                return r.status, await r.read()

        # Open the connections before the clock starts.
        await asyncio.gather(*(one(bodies[i % len(bodies)]) for i in range(concurrency)))
        start = time.perf_counter()
        deadline = start + seconds

        async def worker(i: int) -> None:
            n = i
            while True:
                t0 = time.perf_counter()
                if t0 >= deadline:
                    return
                try:
                    status, data = await one(bodies[n % len(bodies)])
                except (aiohttp.ClientError, TimeoutError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    errors.append(f"HTTP {status}: {data[:200]!r}")
                elif n % CHECK_EVERY == 0 and marker not in _answer(mode, data):
                    errors.append(f"unexpected answer: {data[:200]!r}")
                n += concurrency

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"latencies": latencies, "errors": errors, "elapsed": elapsed}


def _run_client(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# ---------------------------------------------------------------- the servers


ECHO_MODELS = ("llm_blue", "llm_green")


@contextlib.contextmanager
def servers(workdir: Path, access_log: bool = False, echo_models: tuple[str, ...] = ECHO_MODELS
            ) -> Iterator[dict[str, Any]]:
    """Triton (with the echo test model loaded as each of `echo_models`) and one gateway, on
    free loopback ports; the caller routes the gateway."""
    if not tritonserver.is_installed():
        tritonserver.install()
    repo = workdir / "models"
    repo.mkdir(parents=True, exist_ok=True)
    for name in echo_models:
        shutil.copytree(ECHO_MODEL, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    server = tritonserver.TritonServer(repository=repo, http_port=_free_port(), grpc_port=_free_port(),
                                       metrics_port=_free_port(), log_path=workdir / "triton.log")
    gateway: subprocess.Popen | None = None
    server.start(timeout=60)
    try:
        for name in echo_models:
            r = httpx.post(f"http://{server.url}/v2/repository/models/{name}/load", timeout=120)
            if r.status_code != 200:
                raise RuntimeError(f"Triton could not load {name}: {r.text}")

        home = workdir / "home"
        from serving.gateway.keys import KeyStore

        _, key = KeyStore(home / "gateway" / "api_keys.json").create("bench", rpm=0)
        token = secrets.token_urlsafe(24)
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNESHIP_", "OPENAI_"))}
        env.update(TUNESHIP_HOME=str(home), TUNESHIP_TRITON_URL=server.url, TUNESHIP_GATEWAY_REPLICA_ID="bench",
                   TUNESHIP_GATEWAY_ADMIN_TOKEN=token)
        cmd = [sys.executable, "-m", "serving.gateway", "--port", str(port),
               *(["--log-level", "info", "--access-log"] if access_log else ["--log-level", "warning"])]
        with open(workdir / "gateway.log", "ab") as log:
            gateway = subprocess.Popen(cmd, cwd=config.REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if gateway.poll() is not None:
                raise RuntimeError(f"the gateway exited with {gateway.returncode}; see {workdir / 'gateway.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health/live", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway did not come up; see {workdir / 'gateway.log'}")
            time.sleep(0.1)
        yield {"triton": server, "triton_url": f"http://{server.url}", "gateway": gateway, "gateway_url": url,
               "key": key, "admin": {"Authorization": f"Bearer {token}"}}
    finally:
        if gateway is not None and gateway.poll() is None:
            gateway.terminate()
            try:
                gateway.wait(timeout=20)
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait()
        server.stop()


def _routes(s: dict[str, Any], mirror: bool) -> None:
    def route(colour: str) -> dict[str, Any]:
        return {"colour": colour, "model": f"llm_{colour}", "version": "1"}

    body = {"live": route("blue"), "shadow": route("green") if mirror else None, "mirror_sample": 1.0}
    r = httpx.put(f"{s['gateway_url']}/admin/routes", json=body, headers=s["admin"], timeout=30)
    if r.status_code != 200:
        raise RuntimeError(f"PUT /admin/routes: {r.status_code} {r.text}")


def _gateway_metric(s: dict[str, Any], name: str) -> float:
    total = 0.0
    for line in httpx.get(f"{s['gateway_url']}/metrics", timeout=30).text.splitlines():
        if line.startswith((name + "{", name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _quiesce(s: dict[str, Any], timeout: float = 30.0) -> None:
    """Wait for the shadow copies still queued from a mirrored run, so they do not load the next one."""
    deadline = time.monotonic() + timeout
    while _gateway_metric(s, "tuneship_gateway_shadow_queue_depth") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)


# ---------------------------------------------------------------- driver


def _one_run(s: dict[str, Any], mode: str, concurrency: int, seconds: float, bodies: dict[str, list[bytes]]) -> dict[str, Any]:
    if mode == "direct":
        url, headers, payload = f"{s['triton_url']}/v2/models/llm_blue/infer", {}, bodies["direct"]
    else:
        url, payload = f"{s['gateway_url']}/v1/completions", bodies["gateway"]
        headers = {"Authorization": f"Bearer {s['key']}"}
    headers["Content-Type"] = "application/json"
    gw_procs, triton_procs = tree(s["gateway"].pid), tree(s["triton"].proc.pid)
    me = psutil.Process()
    shadow0 = {k: _gateway_metric(s, f"tuneship_gateway_shadow_{k}_total") for k in ("sent", "dropped", "failed")}
    cpu0 = (cpu_seconds(gw_procs), cpu_seconds(triton_procs), cpu_seconds([me]))
    out = _run_client(_drive(url, payload, headers, concurrency, seconds, mode, "[llm_blue]"))
    cpu1 = (cpu_seconds(gw_procs), cpu_seconds(triton_procs), cpu_seconds([me]))
    out["cpu_s"] = {k: b - a for k, a, b in zip(("gateway", "triton", "client"), cpu0, cpu1, strict=True)}
    out["shadow"] = {k: _gateway_metric(s, f"tuneship_gateway_shadow_{k}_total") - v for k, v in shadow0.items()}
    return out


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    lat = sorted(x for r in runs for x in r["latencies"])
    n = len(lat)
    elapsed = sum(r["elapsed"] for r in runs)
    errors = [e for r in runs for e in r["errors"]]
    cpu = {k: sum(r["cpu_s"][k] for r in runs) for k in ("gateway", "triton", "client")}
    out = {
        "requests": n,
        "errors": len(errors),
        "first_errors": errors[:5],
        "rps": n / elapsed if elapsed else 0.0,
        "p50_ms": _pct(lat, 50) * 1000,
        "p90_ms": _pct(lat, 90) * 1000,
        "p99_ms": _pct(lat, 99) * 1000,
        "mean_ms": sum(lat) / n * 1000 if n else float("nan"),
        "cpu_ms_per_request": {k: v / n * 1000 if n else float("nan") for k, v in cpu.items()},
        "rounds_rps": [len(r["latencies"]) / r["elapsed"] for r in runs],
    }
    shadow = {k: sum(r["shadow"][k] for r in runs) for k in ("sent", "dropped", "failed")}
    if any(shadow.values()):
        out["shadow"] = shadow
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,16",
                    help="comma-separated client concurrencies; the goal is judged at each (default 1,16)")
    ap.add_argument("--seconds", type=float, default=6.0, help="length of one run (default 6)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of every mode (default 3)")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per mode first (default 2)")
    ap.add_argument("--access-log", action="store_true", help="run the gateway at log level info (access log on)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    bodies = _bodies()

    results: dict[str, Any] = {
        "model": "echo_llm (Triton Python backend) as llm_blue / llm_green",
        "client": "aiohttp on uvloop, closed loop, keep-alive, same process as the driver",
        "gateway": f"python -m serving.gateway, 1 process, client key enforced, inference log on, "
                   f"log level {'info (access log)' if args.access_log else 'warning'}",
        "cpus": os.cpu_count(), "seconds": args.seconds, "rounds": args.rounds, "goal": dict(GOAL),
        "concurrency": {},
    }
    t_start = time.monotonic()
    bench_root = config.home() / "bench"
    bench_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gateway-", dir=bench_root) as wd, servers(Path(wd), args.access_log) as s:
        print(f"[gateway] triton {s['triton_url']}, gateway {s['gateway_url']}; "
              f"{args.rounds} rounds x {len(MODES)} modes x {args.seconds:.0f} s at concurrency {concurrencies}",
              flush=True)
        for c in concurrencies:
            per_mode: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
            for m in MODES:  # warm-up: connection pools, Triton's model, the gateway's code paths
                _routes(s, mirror=m == "gateway_mirror")
                _one_run(s, m, c, args.warmup, bodies)
                _quiesce(s)
            for _ in range(args.rounds):
                for m in MODES:
                    _routes(s, mirror=m == "gateway_mirror")
                    per_mode[m].append(_one_run(s, m, c, args.seconds, bodies))
                    _quiesce(s)
            summary = {m: _summarise(runs) for m, runs in per_mode.items()}
            d = summary["direct"]
            for m, label in (("gateway", "mirror_off"), ("gateway_mirror", "mirror_on")):
                g = summary[m]
                added = {"p50_ms": g["p50_ms"] - d["p50_ms"], "p99_ms": g["p99_ms"] - d["p99_ms"]}
                ratio = g["rps"] / d["rps"] if d["rps"] else 0.0
                met = (added["p50_ms"] <= GOAL["p50_added_ms"] and added["p99_ms"] <= GOAL["p99_added_ms"]
                       and ratio >= GOAL["throughput_ratio"] and g["errors"] == 0 and d["errors"] == 0)
                summary[label] = {"added_p50_ms": added["p50_ms"], "added_p99_ms": added["p99_ms"],
                                  "throughput_ratio": ratio, "goal_met": met}
            results["concurrency"][str(c)] = summary
            _print(c, summary)
    met = all(v[label]["goal_met"] for v in results["concurrency"].values() for label in ("mirror_off", "mirror_on"))
    results["goal"]["met"] = met
    results["wall_s"] = round(time.monotonic() - t_start, 1)
    print(f"[gateway] goal (<= {GOAL['p50_added_ms']:g} ms added at the median, <= {GOAL['p99_added_ms']:g} ms "
          f"at p99, >= {GOAL['throughput_ratio']:.0%} of direct throughput, no errors) "
          f"{'met' if met else 'NOT met'}; {results['wall_s']:.0f} s", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, sort_keys=True))
    return 0


def _print(c: int, summary: dict[str, Any]) -> None:
    for m in MODES:
        r = summary[m]
        cpu = r["cpu_ms_per_request"]
        extra = f", shadow {r['shadow']}" if "shadow" in r else ""
        print(f"[gateway] c={c:<3} {m:<15} {r['requests']:>7,} req  {r['rps']:>7,.0f} req/s  "
              f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  errors {r['errors']}  "
              f"cpu/req gw {cpu['gateway']:.2f} triton {cpu['triton']:.2f} client {cpu['client']:.2f} ms{extra}",
              flush=True)
    for label in ("mirror_off", "mirror_on"):
        v = summary[label]
        print(f"[gateway] c={c:<3} {label:<15} added p50 {v['added_p50_ms']:+.2f} ms, p99 {v['added_p99_ms']:+.2f} ms, "
              f"throughput {v['throughput_ratio']:.0%} of direct: goal {'met' if v['goal_met'] else 'NOT met'}",
              flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
