"""The drift check over a large window of the inference log (issue 14): its one streaming pass
(`tuneship.monitor.scan_window`: the prompts' text profile, seeded samples) with the profile
score and the two-sample tests after it, against Evidently's text-descriptor, text and
embeddings drift (`DataDriftPreset`) on the same logged requests.

The data: `--requests` logged requests (default 1,000,000) from the triage task's traffic
generator (`traffic_prompts`), written in the inference log's layout (docs/CONTRACTS.md:
`served_model=<name>/dt=/hour=/<replica>.jsonl`, the gateway's request lines, two replicas,
24 h), once without drift and once with a planted share `--drift` of drifted prompts, after
a first hour of the champion's answers (the answers' reference). The training reference:
5,000 undrifted prompts (their profile and a 256-prompt embedding sample).

Each check runs in its own process (wall seconds and the peak RSS of the process tree,
`bench.tree`): ours in this environment, Evidently in `.venv-evidently`
(bench/requirements-evidently.txt; `make bench` installs it). Evidently loads the window with
pandas as its users do, computes descriptors (text length, word count, sentence count,
non-letter share) and runs `DataDriftPreset` on the prompt column and the descriptors, plus
`EmbeddingsDrift` (its default classifier method, drift when its ROC AUC > 0.55) on the
same 256 + 256 embeddings our check tests (computed here, so Evidently's time leaves out the
embedding model; ours includes it).
Evidently is measured at `--evidently-sizes` windows (default 10k, 100k and 1M),
each stopped after `--evidently-timeout` seconds; ours at the same sizes. Verdicts: ours is
the check's decision (profile score >= the task's threshold, or a drifted feature of the
tests); Evidently's, dataset drift (the preset's test: at least half its columns drifted) or
embeddings drift.

    python -m bench.drift [--requests 1000000] [--drift 0.3] [--evidently-sizes 10000,100000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import emit

MODEL = "triage"
VERSION = "7"
T0 = 1_795_000_000.0  # the window's start (2026-11-18T...Z); the answers' reference hour before it
SPAN_S = 24 * 3600.0  # the full window: 24 hours
REFERENCE_N = 5_000
FIRST_N = 5_000  # the champion's first hour (its answers' reference)
CHUNK = 100_000  # prompts generated (and written) at a time
REPO = Path(__file__).resolve().parents[1]
EVIDENTLY_PYTHON = REPO / ".venv-evidently" / "bin" / "python"
ANSWERS = [f" category={c} priority={p}" for c in ("billing", "shipping", "returns", "account", "technical")
           for p in ("low", "normal", "high")]


def say(msg: str) -> None:
    print(f"[drift] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data


def write_window(root: Path, n: int, drift_share: float, seed: int) -> float:
    """`FIRST_N` requests in the hour before T0, then `n` over `SPAN_S` from T0, as the gateway
    logs them; answers drawn from one fixed distribution (no answer drift). Returns the
    seconds between two requests of the window."""
    import random

    from tuneship.inference_log import format_ts, parse_ts, partition_file
    from tuneship.tasks import load_task

    task = load_task("triage")
    traffic = task.resolve(task.demo.traffic)
    rng = random.Random(f"answers-{seed}")
    step = SPAN_S / n
    files: dict[Path, Any] = {}

    def write(i: int, at: float, prompt: str) -> None:
        ts = parse_ts(at)
        replica = f"gw{i % 2}"
        path = partition_file(root, ts, replica, MODEL)
        f = files.get(path)
        if f is None:
            for old in [q for q in files if q.parent != path.parent]:  # hours come in order: close finished ones
                files.pop(old).close()
            path.parent.mkdir(parents=True, exist_ok=True)
            f = files[path] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed above/below
        f.write(json.dumps({
            "kind": "request", "ts": format_ts(ts), "request_id": f"{seed}-{i}", "client_request_id": None,
            "replica": replica, "endpoint": "/v1/completions", "served_model": MODEL, "model": MODEL,
            "role": "live", "key_id": "team-a", "prompt": prompt, "max_tokens": 24,
            "live": {"colour": "blue", "version": VERSION, "model": f"{MODEL}_blue",
                     "completion": rng.choice(ANSWERS), "latency_ms": round(rng.lognormvariate(5.9, 0.4), 3),
                     "status": 200},
            "shadow": None, "prompt_tokens": len(prompt) // 4, "completion_tokens": 6}) + "\n")

    try:
        for i, prompt in enumerate(traffic(FIRST_N, seed=seed + 1)):
            write(-1 - i, T0 - 3600 + i * 3600 / FIRST_N, prompt)
        for lo in range(0, n, CHUNK):
            size = min(CHUNK, n - lo)
            for j, prompt in enumerate(traffic(size, seed=seed * 1000 + lo // CHUNK, drift=drift_share)):
                write(lo + j, T0 + (lo + j) * step, prompt)
    finally:
        for f in files.values():
            f.close()
    return step


def reference(ref_dir: Path) -> None:
    """The training reference both checks compare with: prompts, their profile, embeddings."""
    import numpy as np

    from tuneship import drift
    from tuneship.profile import text_profile
    from tuneship.tasks import load_task

    task = load_task("triage")
    prompts = task.resolve(task.demo.traffic)(REFERENCE_N, seed=0)
    ref_dir.mkdir(parents=True, exist_ok=True)
    (ref_dir / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (ref_dir / "profile.json").write_text(json.dumps(text_profile(prompts)))
    emb = drift.embedding_sample(prompts, n=task.drift.tests.sample_size, seed=0)["embeddings"]
    np.save(ref_dir / "embeddings.npy", emb)


# ---------------------------------------------------------------- the two checks (child processes)


def ours(root: Path, until: float, ref_dir: Path) -> dict[str, Any]:
    """The drift check as `tuneship.stages.check_drift` runs it, without the registry: one
    streaming pass, the profile score, the tests (embeddings MMD, answers)."""
    start = time.perf_counter()
    import numpy as np

    from tuneship import drift, monitor
    from tuneship.tasks import load_task

    task = load_task("triage")
    spec = task.drift.tests
    window = monitor.scan_window(MODEL, since=T0, until=until, sample_size=spec.sample_size, version=VERSION,
                                 root=root)
    scanned = time.perf_counter()
    report = monitor.drift_report(json.loads((ref_dir / "profile.json").read_text()), window.profile,
                                  threshold=task.drift.threshold, min_requests=task.drift.min_requests)
    first = monitor.scan_window(MODEL, since=T0 - 3600, until=T0, sample_size=spec.sample_size, version=VERSION,
                                with_prompts=False, root=root)
    current = drift.embedder().embed(window.prompts)
    verdict, _ = drift.drift_check(reference_embeddings=np.load(ref_dir / "embeddings.npy"),
                                   current_embeddings=current, reference_answers=first.answers,
                                   current_answers=window.answers, conforms=task.conforms, parse=task.parser,
                                   fields=task.answers.fields, declined=drift.refusal_detector(task),
                                   permutations=spec.permutations, method=spec.method, alpha=spec.alpha,
                                   min_effect=spec.min_effect)
    return {"requests": window.requests, "score": report["score"], "profile_drifted": report["drifted"],
            "tests_drifted": verdict["drifted_features"],
            "drifted": bool(report["drifted"] or verdict["drifted"]),
            "scan_s": round(scanned - start, 2), "check_s": round(time.perf_counter() - start, 2)}


def evidently(root: Path, until: float, ref_dir: Path, emb_path: Path) -> dict[str, Any]:
    """Evidently 0.7 on the same window: the log loaded with pandas (request lines the live
    colour answered, ts in the window), descriptors, `DataDriftPreset` on the prompt and its
    descriptors, and embeddings drift on the given embedding samples."""
    start = time.perf_counter()
    import numpy as np
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.descriptors import (
        NonLetterCharacterPercentage,
        SentenceCount,
        TextLength,
        WordCount,
    )
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import ModelDriftMethod
    from evidently.metrics import EmbeddingsDrift
    from evidently.presets import DataDriftPreset

    lo, hi = pd.Timestamp(T0, unit="s", tz="UTC"), pd.Timestamp(until, unit="s", tz="UTC")
    frames = []
    for path in sorted((root / f"served_model={MODEL}").glob("dt=*/hour=*/*.jsonl")):
        hour = pd.Timestamp(f"{path.parent.parent.name[3:]}T{path.parent.name[5:]}:00:00", tz="UTC")
        if hour + pd.Timedelta(hours=1) <= lo or hour >= hi:  # only the window's hour files, as ours reads
            continue
        df = pd.read_json(path, lines=True, dtype=False)
        df = df[df["kind"] == "request"]
        ts = pd.to_datetime(df["ts"], utc=True, format="ISO8601")
        ok = df["live"].map(lambda d: isinstance(d, dict) and d.get("status") == 200)
        df = df[(ts >= lo) & (ts < hi) & ok]
        if len(df):
            frames.append(df[["prompt"]])
    current = pd.concat(frames, ignore_index=True)
    ref = pd.read_json(ref_dir / "prompts.jsonl", lines=True, dtype=False)
    loaded = time.perf_counter()

    def dataset(df: Any) -> Any:
        return Dataset.from_pandas(df, data_definition=DataDefinition(text_columns=["prompt"]), descriptors=[
            TextLength("prompt", alias="length"), WordCount("prompt", alias="words"),
            SentenceCount("prompt", alias="sentences"), NonLetterCharacterPercentage("prompt", alias="non_letter")])

    text = Report([DataDriftPreset()], include_tests=True).run(dataset(current), dataset(ref)).dict()
    ref_emb, cur_emb = np.load(ref_dir / "embeddings.npy"), np.load(emb_path)
    cols = [f"e{i}" for i in range(ref_emb.shape[1])]
    emb_def = DataDefinition(numerical_columns=cols, embeddings={"prompt_embedding": cols})
    method = ModelDriftMethod()  # Evidently's default: a classifier's ROC AUC against its threshold (0.55)
    emb = Report([EmbeddingsDrift(embeddings_name="prompt_embedding", drift_method=method)]).run(
        Dataset.from_pandas(pd.DataFrame(cur_emb, columns=cols), data_definition=emb_def),
        Dataset.from_pandas(pd.DataFrame(ref_emb, columns=cols), data_definition=emb_def)).dict()
    auc = float(emb["metrics"][0]["value"])
    failed = [t["name"] for t in text["tests"] if str(t["status"]).endswith("FAIL")]
    dataset_drift = any(name.startswith("Share of Drifted Columns") for name in failed)
    return {"requests": len(current), "failed_tests": failed, "dataset_drift": dataset_drift,
            "embedding_auc": round(auc, 4), "embedding_drift": auc > method.threshold,
            "drifted": bool(dataset_drift or auc > method.threshold),
            "load_s": round(loaded - start, 2), "check_s": round(time.perf_counter() - start, 2)}


def child(args: argparse.Namespace) -> int:
    fn = ours if args.child == "ours" else evidently
    extra = (Path(args.embeddings),) if args.child == "evidently" else ()
    print(json.dumps(fn(Path(args.root), args.until, Path(args.ref_dir), *extra)), flush=True)
    return 0


# ---------------------------------------------------------------- the parent


def measured(cmd: list[str], timeout: float | None) -> dict[str, Any]:
    """Run one check in its own process: its JSON line, wall seconds, peak tree RSS; a
    `timeout` stops it (then `timed_out`)."""
    from bench.tree import PeakRss

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    with PeakRss(proc.pid, interval=0.1) as peak:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return {"timed_out": True, "wall_s": round(time.perf_counter() - start, 1),
                    "peak_rss_mb": round(peak.peak / 2**20, 1)}
    if proc.returncode != 0:
        return {"error": f"exited {proc.returncode}", "wall_s": round(time.perf_counter() - start, 1)}
    result = json.loads(out.strip().splitlines()[-1])
    result.update(wall_s=round(time.perf_counter() - start, 2), peak_rss_mb=round(peak.peak / 2**20, 1))
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    import numpy as np

    from tuneship import config, drift, monitor

    n = args.requests
    sizes = sorted({min(int(s), n) for s in args.evidently_sizes.split(",") if s} | {n})
    have_evidently = EVIDENTLY_PYTHON.exists()
    if not have_evidently:
        say(f"{EVIDENTLY_PYTHON} is missing (make bench installs it): Evidently is not measured")
    base = config.home() / "bench"
    base.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=base, prefix="drift-") as tmp:
        ref_dir = Path(tmp) / "reference"
        reference(ref_dir)
        for name, share, seed in (("no_drift", 0.0, 1), ("planted_drift", args.drift, 2)):
            root = Path(tmp) / name
            t = time.perf_counter()
            step = write_window(root, n, share, seed)
            size_mb = sum(p.stat().st_size for p in root.rglob("*.jsonl")) / 2**20
            say(f"{name}: {n:,} requests written ({size_mb:,.0f} MiB) in {time.perf_counter() - t:.0f} s")
            for size in sizes:
                until = T0 + size * step
                row: dict[str, Any] = {"scenario": name, "drift_share": share, "requests": size,
                                       "log_mib": round(size_mb * size / n, 1)}
                row["ours"] = measured([sys.executable, "-m", "bench.drift", "--child", "ours", "--root", str(root),
                                        "--until", repr(until), "--ref-dir", str(ref_dir)], None)
                say(f"{name} @ {size:,}: ours {row['ours']}")
                if have_evidently and (size in {min(int(s), n) for s in args.evidently_sizes.split(",") if s}):
                    # the embeddings Evidently tests: those of the sample our check embeds
                    sample = monitor.scan_window(MODEL, since=T0, until=until, sample_size=256,
                                                 version=VERSION, root=root).prompts
                    emb_path = Path(tmp) / f"{name}-{size}.npy"
                    np.save(emb_path, drift.embedder().embed(sample))
                    row["evidently"] = measured(
                        [str(EVIDENTLY_PYTHON), "-m", "bench.drift", "--child", "evidently", "--root", str(root),
                         "--until", repr(until), "--ref-dir", str(ref_dir), "--embeddings", str(emb_path)],
                        args.evidently_timeout)
                    say(f"{name} @ {size:,}: evidently {row['evidently']}")
                    ev = row["evidently"]
                    if "check_s" in ev:
                        row["speedup_wall"] = round(ev["wall_s"] / row["ours"]["wall_s"], 1)
                        row["memory_ratio"] = round(ev["peak_rss_mb"] / row["ours"]["peak_rss_mb"], 1)
                        row["same_verdict"] = ev["drifted"] == row["ours"]["drifted"]
                rows.append(row)
    return {"bench": "drift", "requests": n, "planted_drift_share": args.drift,
            "evidently_sizes": sizes if have_evidently else [], "evidently_timeout_s": args.evidently_timeout,
            "cpus": os.cpu_count(), "rows": rows}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.drift", description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1_000_000, help="logged requests in each window")
    ap.add_argument("--drift", type=float, default=0.3, help="the planted share of drifted prompts")
    ap.add_argument("--evidently-sizes", default="10000,100000,1000000",
                    help="window sizes Evidently is measured at (comma-separated; capped at --requests)")
    ap.add_argument("--evidently-timeout", type=float, default=1800.0, help="seconds before an Evidently run stops")
    ap.add_argument("--out")
    ap.add_argument("--child", choices=("ours", "evidently"), help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--until", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--ref-dir", help=argparse.SUPPRESS)
    ap.add_argument("--embeddings", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    if args.requests < 1_000:
        ap.error("--requests must be at least 1000")
    if not 0.0 < args.drift <= 1.0:
        ap.error("--drift must be in (0, 1]")
    emit(run(args), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
