"""The drift check's one streaming pass over a window (`monitor.scan_window`): the same profile
and verdicts as the computation over the joined records (`read_inference_log`) on a small log,
and memory that does not grow with the number of requests."""

from __future__ import annotations

import gc
import json
import tracemalloc
from pathlib import Path

import pytest

from tuneship import drift, monitor
from tuneship.inference_log import (
    format_ts,
    iter_requests,
    parse_ts,
    partition_file,
    read_inference_log,
)
from tuneship.profile import TextProfiler, compare_profiles, text_profile
from tuneship.tasks import load_task

MODEL = "triage"
T0 = parse_ts("2026-11-30T10:00:00+00:00").timestamp()


def write_log(root: Path, prompts: list[str], *, start: float, step: float, version: str = "3", model: str = MODEL,
              replica: str = "gw0", answer=lambda i: f" category=billing priority={'high' if i % 3 else 'low'}",
              extra=None, shadow: bool = True, confidence=None) -> None:
    """Request lines as the gateway writes them (one file per hour), with their shadow lines;
    `extra(i, ts, request_id)` may return more lines to write after request i; `confidence(i)`
    the model's confidence the live answer carries (None: none)."""
    files: dict[Path, object] = {}
    try:
        for i, prompt in enumerate(prompts):
            ts = parse_ts(start + i * step)
            path = partition_file(root, ts, replica, model)
            f = files.get(path)
            if f is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                f = files[path] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed below
            rid = f"{replica}-{start}-{i}"
            live = {"colour": "blue", "version": version, "model": f"{model}_blue", "completion": answer(i),
                    "latency_ms": 310.5, "status": 200}
            if confidence is not None and (c := confidence(i)) is not None:
                live["confidence"] = c
            f.write(json.dumps({"kind": "request", "ts": format_ts(ts), "request_id": rid, "replica": replica,
                                "endpoint": "/v1/completions", "served_model": model, "model": model,
                                "role": "live", "key_id": "k1", "prompt": prompt, "max_tokens": 32, "live": live,
                                "shadow": {"colour": "green", "version": "4", "model": f"{model}_green",
                                           "status": "pending"},
                                "prompt_tokens": 40, "completion_tokens": 6}) + "\n")
            if shadow:
                f.write(json.dumps({"kind": "shadow", "ts": format_ts(ts), "request_id": rid, "served_model": model,
                                    "replica": replica, "completed_at": format_ts(ts),
                                    "shadow": {**live, "colour": "green", "version": "4"}}) + "\n")
            for line in (extra(i, ts, rid) if extra else ()):
                f.write(line + "\n")
    finally:
        for f in files.values():
            f.close()


def small_log(root: Path) -> tuple[float, float]:
    """A window's worth of triage traffic (two replicas, half of it drifted, some answers by
    another version, failures, feedback, a torn line) plus requests outside the window and
    another served model's. Returns the window (since, until)."""
    traffic = load_task("triage").resolve(load_task("triage").demo.traffic)

    def extra(i: int, ts, rid: str) -> list[str]:
        lines = []
        if i % 7 == 0:  # a failed live answer: not a prompt the drift check profiles
            lines.append(json.dumps({"kind": "request", "ts": format_ts(ts), "request_id": rid + "-err",
                                     "served_model": MODEL, "prompt": "never profiled",
                                     "live": {"colour": "blue", "version": "3", "completion": None, "status": 502},
                                     "shadow": None}))
        if i % 5 == 0:
            lines.append(json.dumps({"kind": "feedback", "ts": format_ts(ts), "feedback_id": f"f{rid}",
                                     "request_id": rid, "served_model": MODEL, "key_id": "k1", "rating": 4,
                                     "task_success": True, "comment": None}))
        if i == 11:
            lines.append('{"kind": "request", "ts": "2026-11-30T10:')  # a torn line
        return lines

    write_log(root, traffic(120, seed=5), start=T0 + 600, step=7.0, extra=extra)
    write_log(root, traffic(90, seed=6, drift=1.0), start=T0 + 601.3, step=11.0, replica="gw1",
              answer=lambda i: " category=technical priority=high")
    write_log(root, traffic(40, seed=7), start=T0 + 900.7, step=13.0, version="2", replica="gw2")  # not the champion
    write_log(root, traffic(50, seed=8, drift=1.0), start=T0 - 3600, step=5.0)  # before the window
    write_log(root, traffic(50, seed=9, drift=1.0), start=T0 + 3 * 3600, step=5.0)  # after it
    write_log(root, traffic(60, seed=10, drift=1.0), start=T0 + 600, step=5.0, model="faq")  # another model
    return T0, T0 + 2 * 3600


def test_scan_is_the_joined_records_computation_on_a_small_log(tmp_path: Path):
    since, until = small_log(tmp_path)
    records = read_inference_log(tmp_path, since=since, until=until, model=MODEL)
    ok = [r for r in records if monitor.is_ok(r.get("live") or {})]
    prompts = [r["prompt"] for r in ok]
    answers = [r["live"]["completion"] or "" for r in ok if str(r["live"]["version"]) == "3"]
    assert len(prompts) == 250 and len(answers) == 210 and len(records) == 250 + 18  # 18 failed

    scan = monitor.scan_window(MODEL, since=since, until=until, sample_size=4096, version="3", root=tmp_path)
    assert scan.requests == 250 and scan.answers_seen == 210
    assert scan.profile == text_profile(prompts)  # the same profile, so the same score
    assert scan.prompts == prompts  # all of them (under the sample size), in time order like the records
    assert sorted(scan.answers) == sorted(answers) and len(scan.answers) == len(answers)

    reference = text_profile(load_task("triage").resolve(load_task("triage").demo.traffic)(400, seed=1))
    report = monitor.drift_report(reference, scan.profile, threshold=0.25, min_requests=30)
    assert report["score"] == compare_profiles(reference, text_profile(prompts))["score"] > 0.25 and report["drifted"]
    assert monitor.drift_report(reference, scan.profile, threshold=0.25, min_requests=251)["status"] == "insufficient"

    # the two-sample tests: identical verdicts from the scan's samples and from the records
    task = load_task("triage")
    first = monitor.scan_window(MODEL, since=since - 3600, until=since, sample_size=4096, version="3",
                                with_prompts=False, root=tmp_path)
    assert first.profile is None and first.prompts == [] and first.answers_seen == 50
    before = read_inference_log(tmp_path, since=since - 3600, until=since, model=MODEL)
    assert len(before) == 50
    emb = drift.embedder()
    ref_emb = emb.embed(drift.sample([r["prompt"] for r in before], 40, seed=0))
    kwargs = {"conforms": task.conforms, "parse": task.parser, "fields": task.answers.fields,
              "declined": drift.refusal_detector(task), "permutations": 200}
    direct, _ = drift.drift_check(reference_embeddings=ref_emb, current_embeddings=emb.embed(prompts),
                                  reference_answers=[r["live"]["completion"] for r in before
                                                     if monitor.is_ok(r["live"]) and r["live"]["version"] == "3"],
                                  current_answers=answers, **kwargs)
    streamed, _ = drift.drift_check(reference_embeddings=ref_emb, current_embeddings=emb.embed(scan.prompts),
                                    reference_answers=first.answers, current_answers=scan.answers, **kwargs)
    for verdict in (direct, streamed):
        verdict["embedding"].pop("seconds")
    assert streamed == direct
    assert streamed["drifted"] and {"prompt_embedding", "label:category"} <= set(streamed["drifted_features"])


def test_samples_are_seeded_bounded_and_free_of_the_read_order(tmp_path: Path):
    since, until = small_log(tmp_path)
    a = monitor.scan_window(MODEL, since=since, until=until, sample_size=32, version="3", root=tmp_path)
    assert len(a.prompts) == 32 and len(a.answers) == 32 and a.requests == 250 and a.answers_seen == 210
    assert a == monitor.scan_window(MODEL, since=since, until=until, sample_size=32, version="3", root=tmp_path)
    # the same requests offered in another order (replica files the other way round) give the same sample
    lines = list(iter_requests(tmp_path, since, until, MODEL))
    res, back = drift.Reservoir(32, seed=monitor.SAMPLE_SEED), drift.Reservoir(32, seed=monitor.SAMPLE_SEED)
    for ts, line in lines:
        if line.live.status == 200:
            res.offer(line.request_id, line.prompt, ts.timestamp())
    for ts, line in reversed(lines):
        if line.live.status == 200:
            back.offer(line.request_id, line.prompt, ts.timestamp())
    assert res.items() == back.items() == a.prompts
    assert drift.Reservoir(32, seed=7).key("r1") != drift.Reservoir(32, seed=8).key("r1")
    with pytest.raises(ValueError, match="positive"):
        drift.Reservoir(0)


def test_sample_keeps_the_items_uniform():
    """Each of 100 items lands in a 10-item sample about 1 time in 10 over 2,000 seeds."""
    hits = [0] * 100
    for seed in range(2000):
        for i in drift.sample(range(100), 10, seed=seed):
            hits[i] += 1
    assert min(hits) > 140 and max(hits) < 260  # binomial(2000, 0.1): mean 200, sd 13.4


def _peak_scan(root: Path, until: float) -> tuple[int, monitor.WindowScan]:
    gc.collect()
    tracemalloc.start()
    try:
        scan = monitor.scan_window(MODEL, since=T0, until=until, sample_size=256, version="3", root=root)
        return tracemalloc.get_traced_memory()[1], scan
    finally:
        tracemalloc.stop()


def test_the_scan_holds_the_same_memory_for_10k_and_200k_requests(tmp_path: Path):
    pool = load_task("triage").resolve(load_task("triage").demo.traffic)(2000, seed=3, drift=0.3)
    n = 200_000
    # every answer carries a confidence, every other one gets its user's verdict: more than the
    # calibration join holds (16 x 256), in both windows, so it thins them to stay flat
    write_log(tmp_path, [pool[i % len(pool)] for i in range(n)], start=T0, step=0.015, shadow=False,  # 50 min
              confidence=lambda i: 0.5 + (i % 100) / 250,
              extra=lambda i, ts, rid: [feedback_line(rid, ts, "k1", i % 4 == 0)] if i % 2 == 0 else [])
    _peak_scan(tmp_path, T0 + 1_000 * 0.015)  # first use imports and caches: not the scan's state
    small, scan_small = _peak_scan(tmp_path, T0 + 10_000 * 0.015)
    large, scan_large = _peak_scan(tmp_path, T0 + n * 0.015)
    assert scan_small.requests == 10_000 and scan_large.requests == n
    assert len(scan_large.prompts) == len(scan_large.answers) == 256
    assert scan_large.profile["row_count"] == n and sum(scan_large.profile["length"]["counts"]) == n
    # the small window's first pass also holds the verdicts of the hour after it (requests it does
    # not hold), so fewer of its own are left after thinning
    assert len(scan_large.calibration) == 256 and 100 < len(scan_small.calibration) <= 256
    assert 256 < scan_large.calibration_seen <= 16 * 256
    # twenty times the requests, the same peak (reading the joined records holds every one of them)
    assert large < 1.25 * small, (small, large)


def test_the_profiler_keeps_a_flat_number_of_parts():
    profiler = TextProfiler()
    for i in range(TextProfiler._COMPACT_EVERY ** 2 * 3):
        profiler.add_texts([f"ticket {i % 50} about billing"])
        assert len(profiler._parts) + len(profiler._summed_parts) < 2 * TextProfiler._COMPACT_EVERY
    assert profiler.result() == text_profile([f"ticket {i % 50} about billing"
                                              for i in range(TextProfiler._COMPACT_EVERY ** 2 * 3)])


def feedback_line(rid: str, ts, key_id: str | None, success: bool | None, *, after_s: float = 5.0,
                  rating: int | None = None) -> str:
    """A feedback line as the gateway writes it, `after_s` after its answer."""
    return json.dumps({"kind": "feedback", "ts": format_ts(parse_ts(ts.timestamp() + after_s)),
                       "feedback_id": f"fb-{rid}-{after_s}", "request_id": rid, "replica": "gw0",
                       "served_model": MODEL, "key_id": key_id, "rating": rating, "task_success": success,
                       "comment": None})


def test_calibration_pairs_follow_the_feedback_rules(tmp_path: Path):
    """An answer's confidence is joined to its task-success feedback as a canary counts it:
    the key that made the request, its first verdict, within an hour; a verdict read before
    its request (another replica's file) still joins; another key's, a late one, a rating
    alone and an answer without a confidence do not."""
    n = 200

    def extra(i, ts, rid):
        kind = i % 10
        return {0: [feedback_line(rid, ts, "k1", True)],
                1: [feedback_line(rid, ts, "k2", True)],  # another client's key
                2: [feedback_line(rid, ts, "k1", False), feedback_line(rid, ts, "k1", True, after_s=9)],
                3: [feedback_line(rid, ts, "k1", True, after_s=4000)],  # over an hour late
                4: [feedback_line(rid, ts, "k1", None, rating=5)],  # a rating alone
                6: [feedback_line(rid, ts, "k1", True)]}.get(kind, [])  # its answer has no confidence

    prompts = [f"ticket {i} about a refund" for i in range(n)]
    confidence = lambda i: None if i % 10 == 6 else round(0.5 + i / 1000, 3)  # noqa: E731 - the row's identity
    write_log(tmp_path, prompts, start=T0, step=2.0, replica="gw1", shadow=False, extra=extra, confidence=confidence)
    # verdicts for rows 5, 15, ... in replica gw0's file of the same hour: read before gw1's requests
    early = partition_file(tmp_path, parse_ts(T0), "gw0", MODEL)
    with open(early, "a", encoding="utf-8") as f:
        for i in range(5, n, 10):
            f.write(feedback_line(f"gw1-{T0}-{i}", parse_ts(T0 + i * 2.0), "k1", i % 20 == 5) + "\n")
    assert sorted(p.name for p in early.parent.iterdir()) == ["gw0.jsonl", "gw1.jsonl"]
    scan = monitor.scan_window(MODEL, since=T0, until=T0 + 10_000, sample_size=256, version="3", root=tmp_path)
    want = sorted([(confidence(i), True) for i in range(0, n, 10)] + [(confidence(i), False) for i in range(2, n, 10)]
                  + [(confidence(i), i % 20 == 5) for i in range(5, n, 10)])
    assert sorted(scan.calibration) == want and scan.calibration_seen == len(want) == 60
    # another version's answers give none
    assert monitor.scan_window(MODEL, since=T0, until=T0 + 10_000, sample_size=256, version="4",
                               root=tmp_path).calibration == []


def test_calibration_thins_the_verdicts_it_holds_and_the_sample_stays_the_same(tmp_path: Path):
    """More verdicts than the join may hold (16 x the sample size): the request ids kept are
    thinned by their sampling key, never more than the cap at once, and the sample is still
    the smallest-keyed of all the joinable answers: what it would be with no cap."""
    n, size = 3000, 10
    write_log(tmp_path, [f"ticket {i}" for i in range(n)], start=T0, step=1.0, shadow=False,
              confidence=lambda i: round(i / n, 6),
              extra=lambda i, ts, rid: [feedback_line(rid, ts, "k1", i % 3 == 0)])
    cal = monitor.Calibration(size, monitor.SAMPLE_SEED)
    for i in range(n):
        cal.verdict(f"gw0-{T0}-{i}", T0 + i + 5, "k1", i % 3 == 0)
        assert len(cal.verdicts) <= cal.cap == 160
    assert cal.threshold < 1 << 64
    scan = monitor.scan_window(MODEL, since=T0, until=T0 + n, sample_size=size, version="3", root=tmp_path)
    keys = {i: cal.pairs.key(f"gw0-{T0}-{i}") for i in range(n)}
    smallest = sorted(sorted(keys, key=keys.get)[:size])
    assert scan.calibration == [(round(i / n, 6), i % 3 == 0) for i in smallest]
    assert size < scan.calibration_seen <= 160
