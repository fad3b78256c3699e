"""The release's online windows, decided as early as the data allows (issue 14).

A shadow window (the candidate answers copies of live traffic) and the post-switch window
(the new live version's own answers) are watched by a `WindowWatch`: on every poll it reads
only the inference-log lines written since the last poll (`LogTail`: a byte offset per
file, so a poll costs what arrived since the previous one, not what the window holds),
turns each request the watched version answered into observations, and feeds them to the
anytime-valid confidence sequences of `tuneship.sequential`. Its state (offsets, requests
still waiting for their shadow answer, each metric's running sums) is a small JSON document
the deferrable trigger writes beside the task's monitor state after every poll, so a
restarted triggerer resumes where it stopped.

What is measured comes from the task alone (its answer check, its parser, its suites'
declared refusal detector), never from a task's name:

* `error_rate` (rate, at most `max_error_rate`): answers that were not HTTP 200;
* `p95_ms` (Howard-Ramdas quantile sequence, at most `max_p95_ms`): successful answers' latency;
* `format_rate` (rate, at least `min_format_rate`): successful answers the task's check accepts;
* when live answered the same request (a shadow, not a first release):
  `format_vs_live` (paired difference candidate - live of format validity, at least
  `-max_format_drop`), `refusal_vs_live` (paired difference of declared refusals, at most
  `max_refusal_increase`, only with a detector), `p95_ratio` (candidate p95 / live p95, at
  most `max_p95_ratio`, when declared), `answer_similarity` (mean cosine similarity of the
  candidate's and live's answers to the same request, embedded with all-MiniLM-L6-v2, at least
  `min_answer_similarity`, when declared).

Agreement of the parsed answers with live and the answers' semantic similarity are measured
and reported on every paired request: without labels neither can say which side is right,
so they gate only where the task declares how close to live a candidate must stay.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tuneship.monitor import FEEDBACK_TTL_S, is_ok
from tuneship.sequential import Policy, Rule, SequentialRelease

# A request whose shadow answer has not arrived after this long is given up on (the replica
# stopped before the mirror answered); a shadow line whose request line never came likewise.
PENDING_TTL_S = 900.0


# ------------------------------------------------------------------ reading only what is new


class LogTail:
    """New complete lines of one served model's partition of the inference log.

    Offsets are kept per hour file; hours older than the newest one seen minus one are
    dropped from the state and never listed again (a shadow line lands in its request's hour
    file, at most a mirror timeout after it). A torn last line is left for the next poll."""

    def __init__(self, root: Path | str, served_model: str, since: float, offsets: Mapping[str, int] | None = None,
                 floor_hour: str | None = None) -> None:
        from tuneship.inference_log import model_root

        self.base = model_root(root, served_model)
        self.since = float(since)
        self.offsets: dict[str, int] = dict(offsets or {})
        start = datetime.fromtimestamp(self.since, tz=UTC).replace(minute=0, second=0, microsecond=0)
        self.floor_hour = floor_hour or start.strftime("%Y-%m-%dT%H")
        self.bytes_read = 0  # this poll's

    def _hours(self) -> list[tuple[str, Path]]:
        floor_day = self.floor_hour[:10]
        out = []
        try:
            days = sorted(d for d in os.listdir(self.base) if d.startswith("dt=") and d[3:] >= floor_day)
        except FileNotFoundError:
            return []
        for day in days:
            try:
                hours = sorted(h for h in os.listdir(self.base / day) if h.startswith("hour="))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for hour in hours:
                key = f"{day[3:]}T{hour[5:]}"
                if key >= self.floor_hour:
                    out.append((key, self.base / day / hour))
        return out

    def read(self) -> list[dict[str, Any]]:
        lines: list[dict[str, Any]] = []
        self.bytes_read = 0
        hours = self._hours()
        for _, directory in hours:
            for path in sorted(directory.glob("*.jsonl")):
                rel = str(path.relative_to(self.base))
                offset = self.offsets.get(rel, 0)
                try:
                    if path.stat().st_size <= offset:
                        continue
                    with open(path, "rb") as f:
                        f.seek(offset)
                        chunk = f.read()
                except FileNotFoundError:
                    continue
                end = chunk.rfind(b"\n") + 1  # complete lines only
                if end == 0:
                    continue
                self.offsets[rel] = offset + end
                self.bytes_read += end
                for raw in chunk[:end].splitlines():
                    try:
                        obj = json.loads(raw)
                    except ValueError:
                        continue
                    if isinstance(obj, dict) and "request_id" in obj:
                        lines.append(obj)
        if hours:  # keep the newest hour and the one before it; older ones are finished
            newest = datetime.strptime(hours[-1][0], "%Y-%m-%dT%H").replace(tzinfo=UTC)
            floor = max(self.floor_hour, (newest - timedelta(hours=1)).strftime("%Y-%m-%dT%H"))
            if floor != self.floor_hour:
                self.floor_hour = floor
                cut = f"dt={floor[:10]}/hour={floor[11:]}"
                self.offsets = {k: v for k, v in self.offsets.items() if k[: len(cut)] >= cut}
        return lines

    def to_state(self) -> dict[str, Any]:
        return {"offsets": self.offsets, "floor_hour": self.floor_hour, "since": self.since}


# ------------------------------------------------------------------ rules from the task's release


@dataclass(frozen=True)
class Checks:
    """The task's answer check, parser and declared refusal detector (`tuneship.tasks.Task`)."""

    conforms: Callable[[str], Any]
    parse: Callable[[str], Mapping[str, Any]]
    declined: Callable[[str], bool] | None = None
    # pairs of answers -> one similarity in [0, 1] per pair; None: not measured
    similarity: Callable[[list[str], list[str]], list[float]] | None = None

    @classmethod
    def of(cls, task: Any) -> Checks:
        from tuneship.drift import packaged_model_dir, refusal_detector

        try:
            packaged_model_dir()
            similarity = pair_similarity
        except RuntimeError:  # the sentence-embedding wheel is not installed: not measured
            similarity = None
        return cls(task.conforms, task.parser, refusal_detector(task), similarity)


def pair_similarity(a: list[str], b: list[str]) -> list[float]:
    """Cosine similarity of each pair of answers' all-MiniLM-L6-v2 embeddings (one model per
    process, loaded on first use), clipped to [0, 1]: unrelated answers score near 0, the same
    fact in other words about 0.8, identical answers 1."""
    import numpy as np

    from tuneship.drift import embedder

    if not a:
        return []
    emb = embedder().embed([*a, *b])  # L2-normalised rows
    sims = np.einsum("ij,ij->i", emb[: len(a)], emb[len(a):])
    return [float(x) for x in np.clip(sims, 0.0, 1.0)]


def _opt(value: Any) -> float | None:
    if value is None or str(value).strip() in ("", "None", "null"):
        return None
    return float(value)


def policy_of(release: Mapping[str, Any], window_seconds: float) -> Policy:
    """The declared decision rule from a release's settings (task file + Params; rendered
    templates are strings)."""
    on_open = str(release.get("on_open", "hold"))
    if on_open not in ("rollback", "hold", "estimates"):
        raise ValueError(f"release.on_open must be rollback, hold or estimates, got {on_open!r}")
    return Policy(alpha=float(release.get("alpha", 0.05)), min_requests=int(float(release.get("min_requests", 20))),
                  min_seconds=float(release.get("min_seconds", 3600.0)), window_seconds=float(window_seconds),
                  on_open=on_open)  # type: ignore[arg-type]


def shadow_rules(release: Mapping[str, Any], *, with_live: bool, checks: Checks) -> list[Rule]:
    rules = [Rule("error_rate", "rate", "at_most", float(release.get("max_error_rate", 0.01))),
             Rule("p95_ms", "quantile", "at_most", float(release.get("max_p95_ms", 2000.0))),
             Rule("format_rate", "rate", "at_least", float(release.get("min_format_rate", 0.9)))]
    if with_live:
        if (drop := _opt(release.get("max_format_drop", 0.05))) is not None:
            rules.append(Rule("format_vs_live", "diff", "at_least", -drop))
        if checks.declined is not None and (more := _opt(release.get("max_refusal_increase", 0.05))) is not None:
            rules.append(Rule("refusal_vs_live", "diff", "at_most", more))
        if (ratio := _opt(release.get("max_p95_ratio"))) is not None:
            rules.append(Rule("p95_ratio", "quantile_ratio", "at_most", ratio))
        if checks.similarity is not None and (floor := _opt(release.get("min_answer_similarity"))) is not None:
            rules.append(Rule("answer_similarity", "rate", "at_least", floor))
    return rules


def canary_rules(release: Mapping[str, Any]) -> list[Rule]:
    """A canary's own live answers (no paired live answer exists for them), plus users' task
    success on them when the task declares a floor and feedback comes in."""
    rules = [Rule("error_rate", "rate", "at_most", float(release.get("max_error_rate", 0.01))),
             Rule("p95_ms", "quantile", "at_most", float(release.get("max_p95_ms", 2000.0))),
             Rule("format_rate", "rate", "at_least", float(release.get("min_format_rate", 0.9)))]
    if (floor := _opt(release.get("min_task_success"))) is not None:
        rules.append(Rule("task_success", "rate", "at_least", floor))
    return rules


def guard_rules(release: Mapping[str, Any]) -> list[Rule]:
    """The post-switch guard: the new live version's error rate and p95 only."""
    return [Rule("error_rate", "rate", "at_most", float(release.get("max_error_rate", 0.01))),
            Rule("p95_ms", "quantile", "at_most", float(release.get("max_p95_ms", 2000.0)))]


# ------------------------------------------------------------------ the watch


@dataclass
class WindowWatch:
    """One window's watch. `mode`: `shadow` (the candidate's answers in the shadow slot, or in
    live for a first release), `canary` (the candidate's answers to its canary share of live
    traffic, and users' feedback on them) or `live` (the version's live answers: the
    post-switch guard).

    `poll(now)` reads what is new, updates the sequences and returns `decide`'s report plus
    the running counts (`requests`, `errors`, `agreement`, `pending`, `bytes_read`)."""

    mode: str
    version: str
    tail: LogTail
    release: SequentialRelease
    checks: Checks | None  # None: errors and latency only (the post-switch guard)
    since: float
    counts: dict[str, Any] = field(default_factory=lambda: {"requests": 0, "errors": 0, "ok": 0, "conforming": 0,
                                                              "paired": 0, "agree": 0, "expired": 0})
    pending: dict[str, dict[str, Any]] = field(default_factory=dict)  # request id -> live side, waiting
    early: dict[str, dict[str, Any]] = field(default_factory=dict)  # shadow answers before their request
    rated: dict[str, list] = field(default_factory=dict)  # canary request id -> [ts, key id], awaiting feedback

    # -- observations
    def _observe(self, cand: Mapping[str, Any], live: Mapping[str, Any] | None, obs: dict[str, list]) -> None:
        rules = self.release.metrics
        c = self.counts
        c["requests"] += 1
        ok = is_ok(cand)
        c["errors"] += not ok
        obs["error_rate"].append(0.0 if ok else 1.0)
        if not ok:
            return
        c["ok"] += 1
        if cand.get("latency_ms") is not None:
            obs["p95_ms"].append(float(cand["latency_ms"]))
        if self.checks is None:  # the post-switch guard: errors and latency only
            return
        text = cand.get("completion") or ""
        good = bool(self.checks.conforms(text))
        c["conforming"] += good
        if "format_rate" in rules:
            obs["format_rate"].append(1.0 if good else 0.0)
        if live is None or not is_ok(live):
            return
        live_text = live.get("completion") or ""
        c["paired"] += 1
        c["agree"] += self.checks.parse(text) == self.checks.parse(live_text)
        if self.checks.similarity is not None:
            obs.setdefault("_pairs", []).append((text, live_text))
        if "format_vs_live" in rules:
            obs["format_vs_live"].append(float(good) - float(bool(self.checks.conforms(live_text))))
        if "refusal_vs_live" in rules and self.checks.declined is not None:
            obs["refusal_vs_live"].append(float(self.checks.declined(text)) - float(self.checks.declined(live_text)))
        if "p95_ratio" in rules and cand.get("latency_ms") is not None and live.get("latency_ms") is not None:
            obs["p95_ratio"].append((float(cand["latency_ms"]), float(live["latency_ms"])))

    def _ts(self, line: Mapping[str, Any]) -> float | None:
        """The line's ts in epoch seconds; None when unreadable or before the window (compared
        as the log's microsecond datetimes, as `read_inference_log` does)."""
        from tuneship.inference_log import parse_ts

        try:
            ts = parse_ts(line["ts"])
        except (KeyError, ValueError, TypeError):
            return None
        return ts.timestamp() if ts >= parse_ts(self.since) else None

    def _take(self, lines: list[dict[str, Any]], obs: dict[str, list]) -> None:
        v = self.version
        # feedback after the requests of the same poll: another replica's file may hold the
        # request line of a verdict read earlier in this poll
        for line in sorted(lines, key=lambda x: x.get("kind") == "feedback"):
            kind = line.get("kind", "request")
            rid = line["request_id"]
            if kind == "feedback":
                # only the key that made the request may rate it (as `read_inference_log` joins);
                # its first verdict counts, later ones do not move the bound
                waiting = self.rated.get(rid)
                if waiting is not None and waiting[1] == line.get("key_id") and \
                        isinstance(line.get("task_success"), bool) and "task_success" in obs:
                    del self.rated[rid]
                    obs["task_success"].append(1.0 if line["task_success"] else 0.0)
                    self.counts["rated"] = self.counts.get("rated", 0) + 1
                continue
            if kind == "request":
                ts = self._ts(line)
                if ts is None:
                    continue
                live, shadow = line.get("live"), line.get("shadow")
                if self.mode == "canary":
                    if line.get("role") == "canary" and isinstance(live, dict) and str(live.get("version")) == v:
                        self._observe(live, None, obs)
                        if "task_success" in obs:
                            self.rated[rid] = [ts, line.get("key_id")]
                    continue
                if self.mode == "live" or not isinstance(shadow, dict) or str(shadow.get("version")) != v:
                    # a first release's candidate answers in the live slot; the guard watches live
                    if isinstance(live, dict) and str(live.get("version")) == v:
                        self._observe(live, None, obs)
                    continue
                if shadow.get("status") == "dropped":
                    continue  # never sent: not the candidate's answer
                if shadow.get("status") != "pending":
                    self._observe(shadow, live, obs)
                elif (answer := self.early.pop(rid, None)) is not None:
                    self._observe(answer, live, obs)
                else:
                    self.pending[rid] = {"ts": ts, "live": _slim(live)}
            elif kind == "shadow" and self.mode == "shadow":
                sh = line.get("shadow")
                if not isinstance(sh, dict) or str(sh.get("version")) != v or sh.get("status") == "dropped":
                    self.pending.pop(rid, None)
                    continue
                waiting = self.pending.pop(rid, None)
                if waiting is not None:
                    self._observe(sh, waiting["live"], obs)
                else:
                    ts = self._ts(line)
                    if ts is not None:
                        self.early[rid] = {**_slim(sh), "ts": ts}

    def _expire(self, now: float) -> None:
        self.rated = {rid: w for rid, w in self.rated.items() if now - w[0] <= FEEDBACK_TTL_S}
        for store in (self.pending, self.early):
            old = [rid for rid, p in store.items() if now - float(p.get("ts", now)) > PENDING_TTL_S]
            for rid in old:
                del store[rid]
            self.counts["expired"] += len(old)

    def poll(self, now: float, *, window_over: bool = False) -> dict[str, Any]:
        obs: dict[str, list] = {name: [] for name in self.release.metrics}
        before = self.counts["requests"]
        self._take(self.tail.read(), obs)
        self._expire(now)
        if pairs := obs.pop("_pairs", None):  # one batch of embeddings a poll
            sims = self.checks.similarity(*map(list, zip(*pairs, strict=True)))
            self.counts["similarity_sum"] = self.counts.get("similarity_sum", 0.0) + sum(sims)
            self.counts["similarity_n"] = self.counts.get("similarity_n", 0) + len(sims)
            if "answer_similarity" in obs:
                obs["answer_similarity"].extend(sims)
        self.release.update({k: (tuple(zip(*o, strict=True)) if self.release.metrics[k].rule.kind == "quantile_ratio"
                                 else o) for k, o in obs.items() if o},
                            requests=self.counts["requests"] - before)
        report = self.release.decide(now - self.since, window_over=window_over)
        if report["verdict"] in ("hold", "rollback") and window_over and self.release.policy.on_open == "estimates":
            report = by_estimates(report, self.release.policy)
        return finite({**report, "mode": self.mode, "version": self.version, "since": self.since, **self.figures(),
                       "pending": len(self.pending), "bytes_read": self.tail.bytes_read})

    def figures(self) -> dict[str, Any]:
        c = self.counts
        p95 = self.release.metrics.get("p95_ms")
        return {"requests": c["requests"], "errors": c["errors"],
                "error_rate": c["errors"] / c["requests"] if c["requests"] else 0.0,
                "p95_ms": float(p95.cs.estimate) if p95 is not None and p95.cs.n else None,
                "format_rate": c["conforming"] / c["ok"] if c["ok"] else None,
                "agreement_with_live": c["agree"] / c["paired"] if c["paired"] else None,
                "answer_similarity": (c["similarity_sum"] / c["similarity_n"]) if c.get("similarity_n") else None,
                "paired": c["paired"], "expired": c["expired"], "rated": c.get("rated", 0)}

    # -- persistence (what the trigger writes between polls)
    def to_state(self) -> dict[str, Any]:
        return {"mode": self.mode, "version": self.version, "since": self.since, "tail": self.tail.to_state(),
                "release": self.release.to_state(), "counts": self.counts, "pending": self.pending,
                "early": self.early, "rated": self.rated}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], *, root: Path | str, served_model: str,
                   checks: Checks | None) -> WindowWatch:
        t = state["tail"]
        return cls(state["mode"], state["version"], LogTail(root, served_model, t["since"], t["offsets"], t["floor_hour"]),
                   SequentialRelease.from_state(state["release"]), checks, float(state["since"]),
                   dict(state["counts"]), dict(state["pending"]), dict(state["early"]), dict(state.get("rated") or {}))

    @classmethod
    def start(cls, *, mode: str, version: str, since: float, rules: list[Rule], policy: Policy,
              root: Path | str, served_model: str, checks: Checks | None) -> WindowWatch:
        if mode not in ("shadow", "canary", "live"):
            raise ValueError(f"mode must be shadow, canary or live, got {mode!r}")
        return cls(mode, str(version), LogTail(root, served_model, since), SequentialRelease(rules, policy), checks,
                   float(since))


def finite(obj: Any) -> Any:
    """The report as strict JSON can carry it (XCom, trigger events): an unbounded side of an
    interval (no bound yet) or an estimate of nothing becomes None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def _slim(resp: Any) -> dict[str, Any] | None:
    """What a waiting request keeps of an answer: enough to score it, nothing else."""
    if not isinstance(resp, dict):
        return None
    return {k: resp.get(k) for k in ("version", "status", "completion", "latency_ms")}


def by_estimates(report: dict[str, Any], policy: Policy) -> dict[str, Any]:
    """`on_open: estimates`: at the window's end, metrics still open are judged by their point
    estimates against their thresholds (one fixed-horizon look, said in the reasons); a
    metric already decided bad stays bad, and fewer than `min_requests` never promotes."""
    if any(m["status"] == "bad" for m in report["metrics"]):
        return report
    met, worse = [], []
    for m in report["metrics"]:
        if m["status"] != "open":
            continue
        est, threshold = m["estimate"], m["threshold"]
        if not m["observations"]:
            worse.append(f"{label(m['name'])}: no observations in the window")
            continue
        fine = est <= threshold if m["direction"] == "at_most" else est >= threshold
        op = "<=" if m["direction"] == "at_most" else ">="
        if fine:
            met.append(f"{label(m['name'])} {est:.4g} {op} {threshold:g}")
        else:
            worse.append(f"{label(m['name'])}: open at the window's end, point estimate {est:.4g} misses "
                         f"{op} {threshold:g}")
    if report["requests"] < policy.min_requests:
        worse.append(f"only {report['requests']} requests in the window (need {policy.min_requests})")
    verdict = "rollback" if worse else "promote"
    reasons = worse or [f"no bound decided in {report['requests']} requests; at the window's end the point "
                        f"estimates (one fixed-horizon look, not a bound) meet every threshold: {', '.join(met)}"]
    return {**report, "verdict": verdict, "reasons": reasons, "decided_by": "estimates at the window's end"}


LABELS = {"error_rate": "error rate", "p95_ms": "p95 latency (ms)", "format_rate": "format rate",
          "task_success": "users' task success",
          "format_vs_live": "format rate vs live", "refusal_vs_live": "refusal rate vs live",
          "p95_ratio": "p95 / live p95", "answer_similarity": "answer similarity to live"}


def label(name: str) -> str:
    return LABELS.get(name, name)


def readable(report: dict[str, Any]) -> list[str]:
    """The report's reasons with each metric's name as people say it."""
    out = []
    for r in report.get("reasons") or []:
        name, sep, rest = r.partition(": ")
        out.append(f"{label(name)}: {rest}" if sep and name in LABELS else r)
    return out


def guard_verdict(report: dict[str, Any], *, min_requests: int, window_over: bool,
                  thresholds: Mapping[str, Any]) -> dict[str, Any]:
    """The post-switch guard's verdict from a `live` watch's report, in the shape
    `tuneship.stages.guard_release` acts on: `breach` as soon as a metric's confidence
    sequence lies wholly on the bad side and `min_requests` answers are in (anytime-valid:
    polling every few seconds does not raise the false-alarm rate above alpha); else
    `watching`, then `healthy`, or `insufficient` when fewer than `min_requests` came in."""
    bad = [m for m in report["metrics"] if m["status"] == "bad"]
    if bad and report["requests"] >= min_requests:  # the declared floor (the bounds need none)
        verdict = "breach"
        reasons = [f"{label(m['name'])}: {m['crossed']} after {m['decided_at_requests']} requests "
                   f"(anytime-valid, alpha {report['alpha_per_metric']:.3g})" for m in bad]
    elif not window_over:
        verdict, reasons = "watching", []
    elif report["requests"] < min_requests:
        verdict = "insufficient"
        reasons = [f"not enough traffic: only {report['requests']} live responses from v{report['version']} "
                   f"since the switch (need {min_requests} to judge)"]
    else:
        verdict, reasons = "healthy", []
    return {"verdict": verdict, "reasons": reasons, "version": report["version"], "requests": report["requests"],
            "errors": report["errors"], "error_rate": report["error_rate"], "p95_ms": report["p95_ms"],
            "thresholds": dict(thresholds), "sequential": {k: report[k] for k in ("metrics", "alpha", "policy")}}


# ------------------------------------------------------------------ where a window's state lives


def state_path(served_model: str, kind: str, version: str, since: float) -> Path:
    """`monitor/windows/<served model>/<kind>-v<version>-<since>.json` under TUNESHIP_HOME."""
    from tuneship import config

    return config.home() / "monitor" / "windows" / served_model / f"{kind}-v{version}-{since:.3f}.json"


def history_path(state: Path | str) -> Path:
    """Where a window's per-poll bounds go, beside its state: `<state>.history.jsonl`."""
    return Path(state).with_suffix(".history.jsonl")


def append_history(state: Path | str, report: dict[str, Any], now: float) -> None:
    """One line per poll that saw new answers (or decided): each metric's estimate, interval,
    threshold and status, so the Deployments page can draw the bounds over the requests. One
    short line a poll; a 72-hour window polled every 15 s stays under a few MB."""
    line = {"at": round(now, 3), "requests": report["requests"], "verdict": report.get("verdict"),
            "metrics": [{k: m.get(k) for k in ("name", "rule", "estimate", "interval", "threshold", "status")}
                        for m in report.get("metrics") or []]}
    with open(history_path(state), "a", encoding="utf-8") as f:
        f.write(json.dumps(finite(line)) + "\n")
