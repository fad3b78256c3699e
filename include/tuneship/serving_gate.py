"""The serving gate: the candidate measured as it will be served, against the live model, in
the same run, before any traffic reaches it.

`llm_release` runs it after smoke and before the shadow window. The candidate's compiled
artifact is already loaded in the idle Triton colour; the live colour (the champion) is loaded
beside it in the same server. The same requests (the task's eval-split prompts, rendered as
its clients send them) go to both, one at a time, in a random order per request, so load on
the machine that comes and goes (another task training, live traffic) falls on both sides
alike. Per request: the latency and the completion tokens Triton reports; per model: the peak
resident memory of its Triton processes (the Python backend's stubs, one per instance, which
hold the ONNX Runtime GenAI model) sampled during the measurement.

Figures (`tuneship.stats`): p95 latency (Harrell-Davis, with a bootstrap interval), tokens/s
(completion tokens over request time, one request at a time), peak memory (one reading, no
interval), and cost per 1k generated tokens from a declared instance price:
price_per_hour / (3600 * tokens/s) * 1000, so its interval is the tokens/s interval turned
over. That is the cost of an instance serving one request at a time (an upper bound for one
that serves several at once).

Gates (the task file's `serving`): against the live model, the ratio of the p95s and of the
tokens/s, paired on the same requests (Wilcox & Erceg-Hurn's bootstrap), and of the peak
memory; absolute ceilings on cost and memory. They decide as the evaluation gates do: pass
when the whole interval is on the right side, fail when all of it is on the wrong side,
inconclusive (counted as a fail) in between. With nothing live (a first release) only the
absolute gates apply; the figures are recorded either way. A gate the first requests leave
undecided gets more (`gate`: up to `max_rounds` rounds of `requests`, each look's interval
widened by Bonferroni so that looking again does not raise the error rate).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneship import stats

QUANTILE = 0.95
MEMORY_POLL_S = 0.05
STUB = "triton_python_backend_stub"


@dataclass
class Reading:
    """One model's measurement: per request its latency and completion tokens (request i of
    every model in one measurement is the same prompt), and the peak memory of its processes."""

    model: str
    latency_ms: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    memory_mb: float | None = None  # None: Triton's processes are not visible from this host
    processes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def extend(self, more: Reading) -> None:
        """Add a later round's requests; the peak memory is the higher of the two."""
        self.latency_ms += more.latency_ms
        self.tokens += more.tokens
        peaks = [m for m in (self.memory_mb, more.memory_mb) if m is not None]
        self.memory_mb = max(peaks) if peaks else None
        self.processes = max(self.processes, more.processes)


def server_process(url: str) -> Any:
    """The tritonserver process listening on `url`'s port on this host, or None."""
    import psutil

    port = int(url.rsplit(":", 1)[1])
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] != "tritonserver":
            continue
        try:
            if any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
                   for c in proc.net_connections(kind="tcp")):
                return proc
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    return None


def model_processes(server: Any, model: str) -> list[Any]:
    """The Python backend stubs serving `model` under `server` (one per instance): their first
    argument is the model's `<repository>/<model>/<version>/model.py`."""
    import psutil

    found = []
    for child in server.children(recursive=True):
        try:
            args = child.cmdline()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if args and Path(args[0]).name == STUB and len(args) > 1 and Path(args[1]).parent.parent.name == model:
            found.append(child)
    return found


class _MemoryWatch:
    """Samples the summed resident memory of each model's processes every MEMORY_POLL_S
    seconds while the requests run; keeps the peak."""

    def __init__(self, procs: dict[str, list[Any]]) -> None:
        self.procs = procs
        self.peak = {m: 0 for m in procs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serving-memory", daemon=True)

    def _sample(self) -> None:
        import psutil

        for model, procs in self.procs.items():
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak[model] = max(self.peak[model], total)

    def _run(self) -> None:
        while not self._stop.wait(MEMORY_POLL_S):
            self._sample()

    def __enter__(self) -> _MemoryWatch:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def measure(url: str, models: Sequence[str], prompts: Sequence[str], max_new_tokens: int, *, requests: int,
            seed: int = 0, first: int = 0, warmup: int = 2, timeout: float = 120.0,
            log: Callable[[str], None] = print) -> dict[str, Reading]:
    """`requests` prompts (cycling through `prompts` from the `first`-th) each sent to every model in `models`,
    one request at a time, the models' order shuffled per request (seeded), through Triton's
    `generate` endpoint at `url` (host:port), after `warmup` unmeasured requests to each (a
    model's first requests of a new shape pay for allocations the rest do not). A failed
    request raises RuntimeError naming the model, the request and Triton's answer."""
    import httpx

    if not prompts:
        raise ValueError("the serving measurement needs at least one prompt")
    readings = {m: Reading(m) for m in models}
    server = server_process(url)
    procs = {m: model_processes(server, m) for m in models} if server is not None else {}
    rng = random.Random(seed)
    order = list(models)

    def send(c: httpx.Client, model: str, prompt: str, i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        try:
            r = c.post(f"/v2/models/{model}/generate", json={"PROMPT": prompt, "MAX_TOKENS": max_new_tokens})
            body = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise RuntimeError(f"serving request {i}/{requests} to {model} failed: {type(exc).__name__}: {exc}") from exc
        if r.status_code != 200 or "error" in body:
            raise RuntimeError(f"serving request {i}/{requests} to {model} failed: HTTP {r.status_code} "
                               f"{str(body.get('error', body))[:300]}")
        return (time.perf_counter() - t0) * 1000, int(body.get("COMPLETION_TOKENS", 0))

    started = time.monotonic()
    with httpx.Client(base_url=f"http://{url}", timeout=timeout) as c, _MemoryWatch(procs) as watch:
        for model in models:
            for i in range(warmup):
                send(c, model, prompts[(first + i) % len(prompts)], 0)
        for i in range(1, requests + 1):
            prompt = prompts[(first + i - 1) % len(prompts)]
            rng.shuffle(order)
            for model in order:
                ms, tokens = send(c, model, prompt, i)
                readings[model].latency_ms.append(round(ms, 3))
                readings[model].tokens.append(tokens)
            if i % 10 == 0 or i == requests:
                log(f"serving measurement: {i}/{requests} requests to each of {', '.join(models)} "
                    f"({time.monotonic() - started:.0f} s)")
    for m, reading in readings.items():
        if procs.get(m):
            reading.memory_mb = round(watch.peak[m] / 2**20, 1)
            reading.processes = len(procs[m])
    return readings


def figures(reading: Reading, price_per_hour: float | None, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """One model's serving figures with their intervals."""
    lat, tok = reading.latency_ms, reading.tokens
    tps = sum(tok) / (sum(lat) / 1000)
    tps_low, tps_high = stats.rate_interval(tok, [t / 1000 for t in lat], level, seed)
    p95_low, p95_high = stats.quantile_interval(lat, QUANTILE, level, seed)
    out = {"model": reading.model, "requests": len(lat), "p50_ms": stats.hd_quantile(lat, 0.5),
           "p95_ms": stats.hd_quantile(lat, QUANTILE), "p95_ms_low": p95_low, "p95_ms_high": p95_high,
           "tokens_per_s": tps, "tokens_per_s_low": tps_low, "tokens_per_s_high": tps_high,
           "completion_tokens": sum(tok), "peak_memory_mb": reading.memory_mb, "processes": reading.processes,
           "cost_per_1k_tokens": None, "cost_per_1k_tokens_low": None, "cost_per_1k_tokens_high": None}
    if price_per_hour is not None:
        out.update(cost_per_1k_tokens=cost_per_1k_tokens(price_per_hour, tps),
                   cost_per_1k_tokens_low=cost_per_1k_tokens(price_per_hour, tps_high),
                   cost_per_1k_tokens_high=cost_per_1k_tokens(price_per_hour, tps_low))
    return out


def cost_per_1k_tokens(price_per_hour: float | None, tokens_per_s: float) -> float | None:
    """USD per 1k generated tokens of an instance at `price_per_hour` that generates
    `tokens_per_s` (None: no price declared, or nothing generated)."""
    if price_per_hour is None or tokens_per_s <= 0:
        return None
    return price_per_hour / 3600 / tokens_per_s * 1000


def _row(metric: str, unit: str, rule: str, threshold: float, value: Any, low: Any, high: Any, n: int,
         higher_is_better: bool, verdict: str, reason: str = "", reference: Any = None,
         ratio: stats.Ratio | None = None) -> dict[str, Any]:
    """A gate row in the evaluation gates' shape (`tuneship.evaluate.gate_rows`); for a ratio
    rule, `diff` is the candidate / live ratio with its interval."""
    return {"suite": "serving", "metric": metric, "unit": unit, "rule": rule, "threshold": threshold,
            "value": value, "low": low, "high": high, "n": n, "reference": reference,
            "diff": ratio.ratio if ratio else None, "diff_low": ratio.low if ratio else None,
            "diff_high": ratio.high if ratio else None, "p_value": ratio.p_value if ratio else None,
            "verdict": verdict, "reason": reason, "higher_is_better": higher_is_better}


NO_MEMORY = ("configuration error: peak memory is read from Triton's processes, which are not visible from this "
             "host (a remote Triton); remove the task's memory gates (serving.max_memory_mb, "
             "serving.max_memory_ratio) where Triton runs elsewhere")


def decide(spec: Any, candidate: Reading, live: Reading | None, *, level: float = 0.95,
           seed: int = 0) -> dict[str, Any]:
    """Apply a task's serving gates (`spec`: tasks.ServingSpec) to the candidate's reading and
    the live model's (None: nothing live). Returns the figures of both, one gate row each
    (`rows`), `passed` and a one-line-per-gate `summary`."""
    from tuneship.evaluate import Statistics, decide_on_interval

    st = Statistics(confidence=level)
    cand = figures(candidate, spec.price_per_hour, level, seed)
    ref = figures(live, spec.price_per_hour, level, seed) if live is not None else None
    n = len(candidate.latency_ms)
    rows = []

    def interval_gate(metric: str, unit: str, rule: str, threshold: float, value: float, low: float, high: float,
                      higher: bool, **kw: Any) -> None:
        floor = rule.endswith(">=")
        verdict, _, why = decide_on_interval(low, high, threshold, floor, st)
        rows.append(_row(metric, unit, rule, threshold, value, low, high, n, higher, verdict, why, **kw))

    if live is not None and ref is not None:
        if len(live.latency_ms) != n:
            raise ValueError(f"the readings differ in requests: {n} vs {len(live.latency_ms)}")
        if spec.max_p95_ratio is not None:
            r = stats.paired_quantile_ratio(candidate.latency_ms, live.latency_ms, QUANTILE, level, seed)
            interval_gate("p95_ms", "ms", "ratio <=", spec.max_p95_ratio, cand["p95_ms"], r.low, r.high, False,
                          reference=ref["p95_ms"], ratio=r)
            rows[-1].update(low=cand["p95_ms_low"], high=cand["p95_ms_high"])
        if spec.min_tokens_per_s_ratio is not None:
            r = stats.paired_rate_ratio(candidate.tokens, [t / 1000 for t in candidate.latency_ms], live.tokens,
                                        [t / 1000 for t in live.latency_ms], level, seed)
            interval_gate("tokens_per_s", "tokens/s", "ratio >=", spec.min_tokens_per_s_ratio, cand["tokens_per_s"],
                          r.low, r.high, True, reference=ref["tokens_per_s"], ratio=r)
            rows[-1].update(low=cand["tokens_per_s_low"], high=cand["tokens_per_s_high"])
        if spec.max_memory_ratio is not None:
            if candidate.memory_mb is None or live.memory_mb is None:
                rows.append(_row("peak_memory_mb", "MB", "ratio <=", spec.max_memory_ratio, candidate.memory_mb,
                                 None, None, n, False, "unreachable", NO_MEMORY, reference=live.memory_mb))
            else:
                q = candidate.memory_mb / live.memory_mb
                r = stats.Ratio(n, q, q, q, 1.0)
                verdict = "pass" if q <= spec.max_memory_ratio else "fail"
                rows.append(_row("peak_memory_mb", "MB", "ratio <=", spec.max_memory_ratio, candidate.memory_mb,
                                 None, None, n, False, verdict, "one reading of each (no interval)",
                                 reference=live.memory_mb, ratio=r))
    if spec.max_cost_per_1k_tokens is not None:
        if cand["cost_per_1k_tokens"] is None:
            rows.append(_row("cost_per_1k_tokens", "USD", "<=", spec.max_cost_per_1k_tokens, None, None, None, n,
                             False, "fail", "no token was generated: no cost per token"))
        else:
            interval_gate("cost_per_1k_tokens", "USD", "<=", spec.max_cost_per_1k_tokens, cand["cost_per_1k_tokens"],
                          cand["cost_per_1k_tokens_low"], cand["cost_per_1k_tokens_high"], False,
                          reference=ref["cost_per_1k_tokens"] if ref else None)
    if spec.max_memory_mb is not None:
        if candidate.memory_mb is None:
            rows.append(_row("peak_memory_mb", "MB", "<=", spec.max_memory_mb, None, None, None, n, False,
                             "unreachable", NO_MEMORY))
        else:
            ok = candidate.memory_mb <= spec.max_memory_mb
            rows.append(_row("peak_memory_mb", "MB", "<=", spec.max_memory_mb, candidate.memory_mb, None, None, n,
                             False, "pass" if ok else "fail", "one reading (no interval)",
                             reference=live.memory_mb if live else None))
    passed = all(r["verdict"] == "pass" for r in rows)
    return {"passed": passed, "candidate": cand, "live": ref, "requests": n, "confidence": level,
            "rows": rows, "summary": "\n".join(line(r) for r in rows) or "no serving gate declared"}


def gate(spec: Any, measure_round: Callable[[int], dict[str, Reading]], candidate: str, live: str | None, *,
         confidence: float = 0.95, seed: int = 0,
         log: Callable[[str], None] = print) -> tuple[dict[str, Reading], dict[str, Any]]:
    """Measure in rounds (`measure_round(k)`: round k's readings, k = 1, 2, ...) until every
    gate is decided or `spec.max_rounds` rounds are in. Looking after every round is paid for
    with Bonferroni: each look's intervals are at 1 - (1 - confidence) / max_rounds, so the
    chance of a wrong decision at any look stays within 1 - confidence. A gate still
    inconclusive after the last round counts as failed."""
    level = 1 - (1 - confidence) / spec.max_rounds
    readings: dict[str, Reading] = {}
    for k in range(1, spec.max_rounds + 1):
        for m, more in measure_round(k).items():
            readings.setdefault(m, Reading(m)).extend(more)
        result = decide(spec, readings[candidate], readings[live] if live else None, level=level, seed=seed)
        result["rounds"] = k
        open_gates = [r["metric"] for r in result["rows"] if r["verdict"] == "inconclusive"]
        if not open_gates:
            break
        if k < spec.max_rounds:
            log(f"serving gate: {', '.join(open_gates)} not decided after {k * spec.requests} requests; "
                f"measuring {spec.requests} more")
    return readings, result


def line(r: dict[str, Any]) -> str:
    """One serving gate as a line of text (Slack, the refusal, the log)."""
    unit = f" {r['unit']}" if r["unit"] != "USD" else " USD"
    value = "-" if r["value"] is None else f"{r['value']:.4g}{unit}"
    if r["rule"].startswith("ratio"):
        versus = f"live {r['reference']:.4g}{unit}" if r["reference"] is not None else "live -"
        ratio = "-" if r["diff"] is None else (
            f"x{r['diff']:.3f}" + (f" [x{r['diff_low']:.3f}, x{r['diff_high']:.3f}]" if r["diff_low"] != r["diff_high"]
                                   else ""))
        text = f"{r['verdict'].upper()} {r['metric']} {r['rule']} {r['threshold']:g} of live: {value} vs {versus}, {ratio}"
    else:
        bounds = f" [{r['low']:.4g}, {r['high']:.4g}]" if r["low"] is not None else ""
        text = f"{r['verdict'].upper()} {r['metric']} {r['rule']} {r['threshold']:g}{unit}: {value}{bounds}"
    return text + (f" (n={r['n']}): {r['reason']}" if r["reason"] else f" (n={r['n']})")


def plot_latency(readings: dict[str, Reading], path: Path, title: str) -> Path | None:
    """Each model's latencies as an empirical CDF, its p95 marked: the picture behind the
    p95 gate (where the candidate's tail sits against the live model's)."""
    readings = {k: v for k, v in readings.items() if v.latency_ms}
    if not readings:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for (label, r), colour in zip(readings.items(), ("#0969da", "#8250df"), strict=False):
        x = np.sort(r.latency_ms)
        ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", color=colour, label=label)
        p95 = stats.hd_quantile(x, QUANTILE)
        ax.axvline(p95, color=colour, linestyle="--", linewidth=1)
        ax.annotate(f"p95 {p95:.0f} ms", (p95, 0.05), textcoords="offset points", xytext=(3, 0), fontsize=8,
                    color=colour)
    ax.set_xlabel("request latency, ms (one request at a time)")
    ax.set_ylabel("share of requests")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
