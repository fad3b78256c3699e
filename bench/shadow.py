"""The anytime-valid shadow verdict (`tuneship.sequential`, issue 14) on replayed traffic:
candidates that are equal to live, better, worse on one slice, slower, and failing
intermittently, each replayed as many independent shadow windows, polled every `--poll`
requests, decided by the same rules and the same vectorized code a window uses.

Also what one poll of a real window costs after 1,000 and after 100,000 requests (the watch
reads only what arrived since the previous poll; re-reading the window grows with it).

What it shows: the verdicts each kind of candidate gets, how many requests each needs to be
decided (median and 90th percentile), and the false-alarm rate: equal candidates rolled back
(and, for the worse ones, promoted), with its Wilson interval, against the declared alpha.
The baseline is the fixed-interval rule polled just as often: a 95 % Wilson interval of the
error rate recomputed on every poll, which does not keep its error rate under repeated looks.

Traffic (per request; live and candidate answer the same request): live errors 0.2 %,
format valid 97 % of its answers, latency lognormal (median 400 ms, sigma 0.5: p95 ~ 910 ms),
candidate and live latencies correlated 0.5 through the request.

    python -m bench.shadow [--streams 1000] [--equal-streams 2000] [--poll 50]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from bench import emit
from tuneship.sequential import Policy, Rule, combine, make_cs, status_of
from tuneship.stats import wilson


def say(msg: str) -> None:
    print(f"[shadow] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Model:
    """How one side answers a request."""

    error_rate: float = 0.002
    format_rate: float = 0.97
    latency_scale: float = 1.0  # times live's latency distribution
    slice_share: float = 0.0  # a share of requests on which every answer is malformed
    burst_rate: float = 0.0  # long-run error rate added in bursts
    burst_len: int = 30  # requests a burst lasts


LIVE = Model()
SCENARIOS: dict[str, Model] = {
    "equal": LIVE,
    "better": Model(error_rate=0.001, format_rate=0.99, latency_scale=0.85),
    "worse_slice": Model(slice_share=0.2),
    "slower": Model(latency_scale=1.5),
    "intermittent": Model(burst_rate=0.03),
    "intermittent_12h": Model(burst_rate=0.03),  # the same, with a 12 h minimum before an early promote
}
MIN_SECONDS = {"intermittent_12h": 12 * 3600.0}
# what each scenario should get; the others count as wrong decisions
EXPECTED = {"equal": "promote", "better": "promote", "worse_slice": "rollback", "slower": "rollback",
            "intermittent": "rollback", "intermittent_12h": "rollback"}

RULES = (
    Rule("error_rate", "rate", "at_most", 0.01),
    Rule("p95_ms", "quantile", "at_most", 2000.0),
    Rule("p95_ratio", "quantile_ratio", "at_most", 1.25),
    Rule("format_diff", "diff", "at_least", -0.05),
)
MEDIAN_MS, SIGMA, RHO = 400.0, 0.5, 0.5


def _errors(model: Model, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    err = rng.random(shape) < model.error_rate
    if model.burst_rate > 0:  # a burst starts at a request and fails the next burst_len ones
        start_p = 1 - (1 - model.burst_rate) ** (1 / model.burst_len)
        starts = np.cumsum(rng.random(shape) < start_p, axis=1)
        lagged = np.concatenate([np.zeros((shape[0], model.burst_len), dtype=starts.dtype), starts], axis=1)
        err |= (starts - lagged[:, : shape[1]]) > 0
    return err


def simulate(candidate: Model, *, streams: int, window_requests: int, poll: int = 50, rate_per_s: float = 0.1,
             policy: Policy | None = None, rules: tuple[Rule, ...] = RULES, seed: int = 0) -> dict[str, np.ndarray]:
    """Replay `streams` independent shadow windows; returns each one's verdict code (0 none,
    1 promote, -1 rollback, 2 hold), the requests seen when it was decided, and the
    baseline's (fixed Wilson interval of the error rate polled as often) rollback flags."""
    policy = policy or Policy()
    rng = np.random.default_rng(seed)
    shape = (streams,)
    alpha = policy.alpha_per_metric(len(rules))
    cs = {r.name: make_cs(r, alpha, t_opt=policy.t_opt, shape=shape) for r in rules}
    cand_err, live_err = _errors(candidate, rng, (streams, window_requests)), _errors(LIVE, rng, (streams, window_requests))
    slice_ = rng.random((streams, window_requests)) < candidate.slice_share
    verdict = np.zeros(streams, dtype=np.int64)
    decided_at = np.full(streams, -1, dtype=np.int64)
    baseline_rollback = np.zeros(streams, dtype=bool)
    errors_so_far = np.zeros(streams)
    z = 1.959963984540054
    for start in range(0, window_requests, poll):
        end = min(start + poll, window_requests)
        k = end - start
        ce, le, sl = cand_err[:, start:end], live_err[:, start:end], slice_[:, start:end]
        shared = rng.standard_normal((streams, k))
        own_c, own_l = rng.standard_normal((streams, k)), rng.standard_normal((streams, k))
        lat_l = MEDIAN_MS * np.exp(SIGMA * (RHO * shared + np.sqrt(1 - RHO**2) * own_l))
        lat_c = candidate.latency_scale * MEDIAN_MS * np.exp(SIGMA * (RHO * shared + np.sqrt(1 - RHO**2) * own_c))
        lat_c, lat_l = np.where(ce, np.nan, lat_c), np.where(le, np.nan, lat_l)
        fmt_c = (rng.random((streams, k)) < candidate.format_rate) & ~sl
        fmt_l = rng.random((streams, k)) < LIVE.format_rate
        both_ok = ~ce & ~le
        obs = {
            "rate": ce.astype(float),
            "quantile": lat_c,
            "diff": np.where(both_ok, fmt_c.astype(float) - fmt_l.astype(float), np.nan),
        }
        statuses = []
        for r in rules:
            c = cs[r.name]
            if r.kind == "quantile_ratio":
                c.update(lat_c, lat_l)
            else:
                c.update(obs[r.kind])
            statuses.append(status_of(*c.interval(), r.direction, r.threshold, c.current_interval()))
        over = end >= window_requests
        code = combine(np.array(statuses), requests=end, elapsed_s=end / rate_per_s, window_over=over, policy=policy)
        new = (verdict == 0) & (code != 0)
        verdict[new], decided_at[new] = code[new], end
        errors_so_far += ce.sum(axis=1)
        w_low = (errors_so_far + z * z / 2) / (end + z * z) - z / (end + z * z) * np.sqrt(
            errors_so_far * (end - errors_so_far) / end + z * z / 4)
        baseline_rollback |= (end >= policy.min_requests) & (w_low > rules[0].threshold)
        if (verdict != 0).all() and baseline_rollback.all():
            break
    return {"verdict": verdict, "decided_at": decided_at, "baseline_rollback": baseline_rollback}


def summarize(name: str, result: dict[str, np.ndarray], alpha: float) -> dict[str, Any]:
    v, at = result["verdict"], result["decided_at"]
    n = len(v)
    counts = {label: int((v == code).sum()) for code, label in ((1, "promote"), (-1, "rollback"), (2, "hold"),
                                                                (0, "undecided"))}
    expected = EXPECTED[name]
    decided = at[v == (1 if expected == "promote" else -1)]
    wrong_code = -1 if expected == "promote" else 1  # the error that matters for this scenario
    wrong = int((v == wrong_code).sum())
    lo, hi = wilson(wrong, n)
    out = {"scenario": name, "streams": n, "verdicts": counts, "expected": expected,
           "requests_to_expected": {"median": float(np.median(decided)) if len(decided) else None,
                                    "p90": float(np.percentile(decided, 90)) if len(decided) else None},
           "wrong_decision": "rollback" if expected == "promote" else "promote",
           "wrong_rate": wrong / n, "wrong_rate_wilson95": [lo, hi], "alpha": alpha}
    if name == "equal":
        b = int(result["baseline_rollback"].sum())
        out["baseline_fixed_wilson_false_rollback"] = {"rate": b / n, "wilson95": list(wilson(b, n))}
    return out


def _write_log(root: Any, start: float, n: int, offset: int = 0, per_hour: int = 0) -> None:
    """n mirrored requests (request line, then the candidate's shadow line) from `start`,
    `per_hour` of them per hour of log (0: all in the first hour)."""
    import json

    from tuneship.inference_log import format_ts, parse_ts, partition_file

    files: dict[Any, Any] = {}
    try:
        for i in range(offset, offset + n):
            at = start + (i * 3600.0 / per_hour if per_hour else i * 1e-3)
            ts = parse_ts(at)
            path = partition_file(root, ts, "gw0", "bench")
            f = files.get(path)
            if f is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                f = files[path] = open(path, "a")  # noqa: SIM115 - closed below
            live = {"colour": "blue", "version": "1", "completion": "category=billing priority=low",
                    "latency_ms": 400.0, "status": 200}
            f.write(json.dumps({"kind": "request", "ts": format_ts(ts), "request_id": f"r{i}", "served_model": "bench",
                                "prompt": "Ticket: my parcel is late\nTriage:", "live": live,
                                "shadow": {"colour": "green", "version": "2", "status": "pending"}}) + "\n")
            f.write(json.dumps({"kind": "shadow", "ts": format_ts(ts), "request_id": f"r{i}", "served_model": "bench",
                                "shadow": {**live, "colour": "green", "version": "2"}}) + "\n")
    finally:
        for f in files.values():
            f.close()


def poll_cost(windows: tuple[int, ...] = (1_000, 100_000), new: int = 100, per_hour: int = 1_400) -> list[dict]:
    """What one poll costs once `n` requests are in the window and `new` more arrive: the
    watch (`tuneship.shadow`, reads what is new) against re-reading the window
    (`read_inference_log` since its start, what the triggers did before). 1,400 requests an
    hour is 100,000 in 72 h."""
    import tempfile
    from pathlib import Path

    from tuneship import shadow
    from tuneship.inference_log import read_inference_log

    checks = shadow.Checks(conforms=lambda t: t.startswith("category="), parse=lambda t: {"answer": t})
    release = {"max_error_rate": 0.01, "max_p95_ms": 2000.0, "min_format_rate": 0.9, "max_format_drop": 0.05}
    rows = []
    for n in windows:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            start = time.time() - (n / per_hour + 1) * 3600
            _write_log(root, start, n, per_hour=per_hour)
            w = shadow.WindowWatch.start(mode="shadow", version="2", since=start,
                                         rules=shadow.shadow_rules(release, with_live=True, checks=checks),
                                         policy=Policy(window_seconds=72 * 3600.0), root=root, served_model="bench",
                                         checks=checks)
            w.poll(time.time())  # catch up with the window
            _write_log(root, time.time() - 1, new, offset=n)
            t = time.perf_counter()
            report = w.poll(time.time())
            watch_s = time.perf_counter() - t
            t = time.perf_counter()
            records = read_inference_log(root, since=start, model="bench")
            reread_s = time.perf_counter() - t
            assert report["requests"] == n + new == len(records)
            rows.append({"window_requests": n, "new_requests": new, "watch_poll_s": watch_s,
                         "watch_bytes_read": report["bytes_read"], "reread_poll_s": reread_s,
                         "speedup": reread_s / watch_s})
            say(f"poll after {n:,} requests, {new} new: watch {watch_s * 1000:.1f} ms "
                f"({report['bytes_read']:,} bytes), re-reading the window {reread_s * 1000:.0f} ms")
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'scenario':<13}{'promote':>8}{'rollback':>9}{'hold':>6}{'median n':>10}{'p90 n':>8}  wrong-way rate [95% Wilson]"
    lines = [head]
    for r in rows:
        c, q = r["verdicts"], r["requests_to_expected"]
        lo, hi = r["wrong_rate_wilson95"]
        lines.append(f"{r['scenario']:<13}{c['promote']:>8}{c['rollback']:>9}{c['hold'] + c['undecided']:>6}"
                     f"{q['median'] or float('nan'):>10.0f}{q['p90'] or float('nan'):>8.0f}  "
                     f"{r['wrong_decision']} {r['wrong_rate']:.4f} [{lo:.4f}, {hi:.4f}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.shadow", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=500, help="windows per scenario")
    ap.add_argument("--equal-streams", type=int, default=2000, help="windows of the equal candidate")
    ap.add_argument("--poll", type=int, default=50, help="requests between polls")
    ap.add_argument("--rate", type=float, default=0.1, help="requests per second (72 h: 25,920 requests)")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    policy = replace(Policy(), alpha=args.alpha)
    window = int(policy.window_seconds * args.rate)
    rows, t0 = [], time.perf_counter()
    for i, (name, model) in enumerate(SCENARIOS.items()):
        t = time.perf_counter()
        n = args.equal_streams if name == "equal" else args.streams
        pol = replace(policy, min_seconds=MIN_SECONDS.get(name, policy.min_seconds))
        res = simulate(model, streams=n, window_requests=window, poll=args.poll, rate_per_s=args.rate,
                       policy=pol, seed=1000 + i)
        rows.append(summarize(name, res, policy.alpha))
        say(f"{name}: {n} windows in {time.perf_counter() - t:.1f}s")
    print(table(rows), file=sys.stderr)
    out = {"bench": "shadow", "policy": asdict(policy), "rules": [asdict(r) for r in RULES],
           "live": asdict(LIVE), "scenarios": {k: asdict(v) for k, v in SCENARIOS.items()},
           "window_requests": window, "poll_requests": args.poll, "rate_per_s": args.rate,
           "results": rows, "wall_s": round(time.perf_counter() - t0, 1),
           "false_alarm_within_alpha": rows[0]["wrong_rate"] <= policy.alpha,
           "poll_cost": poll_cost()}
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
