"""Validation throughput and peak memory: Tuneship's validator vs plain Great Expectations.

Both validate the same generated files (1M train rows + 50k eval rows by default, 0.3 % of
them hostile) against the same suite (`include/tuneship/data/suites/training_data.yaml`),
each in its own process, timed from the call to the report (imports excluded), with the
summed RSS of the process tree sampled every 50 ms (workers included).

The baseline is what a team writes with GE 1.x and pandas alone: `pandas.read_json(lines=
True)` of each split, then GE expectations on the raw text columns, thresholds as `mostly`:
types and nulls, blank text, control characters, token bounds as regexes, exact duplicates
(compound uniqueness), PII and injection as regex lists (no libphonenumber, no Luhn, IBAN or SSN checksums), minimum rows, Data
Docs. What it cannot express in reasonable time it skips, so the comparison flatters the
baseline: case/space-folded duplicates, phone validity and checksums, quarantine with reasons, the reference
profile, and leakage (`expect_column_values_to_not_be_in_set` with the 1M train prompts as
its value set took minutes for 50k eval rows).

    python -m bench.validation [--rows 1000000] [--eval-rows 50000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench import datasets
from bench.tree import run_measured


def _data_dir(rows: int, eval_rows: int, parquet: bool = False) -> Path:
    from tuneship import config

    suffix = f"{'-parquet' if parquet else ''}-v{datasets.DATA_VERSION}"
    d = config.home() / "bench" / f"validation-{rows}-{eval_rows}{suffix}"
    marker = d / ".complete"
    if not marker.exists():
        print(f"generating {rows:,} + {eval_rows:,} rows into {d} ...", flush=True)
        datasets.write(d, rows, eval_rows, parquet=parquet)
        marker.touch()
    return d


# ---------------------------------------------------------------- the two contenders


def run_tuneship(data: str, workdir: str) -> dict[str, Any]:
    from tuneship.data import validate_dataset
    from tuneship.data.gx import _gx

    _gx()  # import GE before the clock starts, as the baseline does
    t0 = time.perf_counter()
    report = validate_dataset(data, workdir=workdir)
    seconds = time.perf_counter() - t0
    rows = sum(report.rows.values())
    return {
        "seconds": seconds,
        "rows": rows,
        "accepted": report.accepted,
        "quarantined": report.quarantine_count,
        "failing": {c.name: c.figures.get("failing_rows") for c in report.checks},
    }


# The baseline's phone regex: what a team without libphonenumber writes (Tuneship's own
# detector before suite v3): separators or a leading +, 9-15 digits.
_BASELINE_PHONE = (
    r"(?<![\w+.])(?<!\d[\s-])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])"
    r"\d{3,4}[\s.-]\d{3,4}(?![\w.])(?![\s-]\d)"
    r"|(?<![\w+])\+\d{8,15}\b"
)


def _baseline_expectations(cfg: Any, split: str) -> list[Any]:
    import great_expectations.expectations as gxe

    from tuneship.data.checks import _BAD_CHARS
    from tuneship.data.pii import CARD, EMAIL, IBAN, SECRET_ASSIGN, SECRET_TOKEN, SSN

    c = cfg.checks

    def mostly(check: str) -> float:
        return 1.0 - float(c.get(check).max_fraction)

    out: list[Any] = []
    for col in ("prompt", "completion"):
        out += [
            gxe.ExpectColumnValuesToBeOfType(column=col, type_="str", mostly=mostly("schema")),
            gxe.ExpectColumnValuesToNotBeNull(column=col, mostly=mostly("schema")),
            gxe.ExpectColumnValuesToNotMatchRegex(
                column=col, regex=r"^\s*$", mostly=mostly("required_fields")
            ),
            gxe.ExpectColumnValuesToNotMatchRegex(
                # escaped: GE writes the pattern into Data Docs, where a raw surrogate cannot go
                column=col,
                regex=_BAD_CHARS.pattern.encode("unicode_escape").decode("ascii"),
                mostly=mostly("text_encoding"),
            ),
            gxe.ExpectColumnValuesToNotMatchRegexList(
                column=col,
                regex_list=[
                    EMAIL.pattern,
                    _BASELINE_PHONE,
                    CARD.pattern,
                    IBAN.pattern,
                    SSN.pattern,
                    SECRET_TOKEN.pattern,
                    "(?i)" + SECRET_ASSIGN.pattern,
                ],
                mostly=mostly("pii"),
            ),
            gxe.ExpectColumnValuesToNotMatchRegexList(
                column=col,
                regex_list=["(?i)" + p for p in c.prompt_injection.patterns],
                mostly=mostly("prompt_injection"),
            ),
        ]
    for col, b in (("prompt", c.length.prompt_tokens), ("completion", c.length.completion_tokens)):
        out.append(  # more than max whitespace tokens
            gxe.ExpectColumnValuesToNotMatchRegex(
                column=col, regex=rf"^\s*(?:\S+\s+){{{b.max}}}\S", mostly=mostly("length")
            )
        )
    out.append(
        gxe.ExpectCompoundColumnsToBeUnique(
            column_list=["prompt", "completion"], mostly=mostly("duplicates")
        )
    )
    out.append(gxe.ExpectTableRowCountToBeBetween(min_value=getattr(c.min_rows, split)))
    return out


def run_baseline(data: str, workdir: str) -> dict[str, Any]:
    import pandas as pd

    from tuneship.data.checks import load_config
    from tuneship.data.gx import _gx

    gx = _gx()
    cfg = load_config()
    t0 = time.perf_counter()
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    context = gx.get_context(
        project_config=DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=True),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),
        ),
        mode="ephemeral",
    )
    source = context.data_sources.add_pandas(name="raw")
    successes: dict[str, bool] = {}
    rows = 0
    for split in ("train", "eval"):
        frame = pd.read_json(Path(data) / f"{split}.jsonl", lines=True, dtype=False)
        rows += len(frame)
        asset = source.add_dataframe_asset(name=split)
        batch = asset.add_batch_definition_whole_dataframe(name=f"{split}_all")
        suite = context.suites.add(
            gx.ExpectationSuite(
                name=f"baseline.{split}",
                expectations=_baseline_expectations(cfg, split),
            )
        )
        vd = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"baseline.{split}", data=batch, suite=suite)
        )
        res = vd.run(batch_parameters={"dataframe": frame}, result_format="BASIC")
        successes[split] = bool(res.success)
        del frame
    context.build_data_docs()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rows": rows, "success": successes}


# ---------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--eval-rows", type=int, default=50_000)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only", choices=["tuneship", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.only:  # child process: one contender, one JSON line
        fn = run_tuneship if args.only == "tuneship" else run_baseline
        print(json.dumps(fn(args.data, args.workdir)), flush=True)
        return 0

    import tempfile

    data = _data_dir(args.rows, args.eval_rows)
    results: dict[str, Any] = {"rows": args.rows, "eval_rows": args.eval_rows, "cpus": os.cpu_count()}
    for who in ("tuneship", "baseline"):
        with tempfile.TemporaryDirectory(prefix=f"bench-{who}-") as wd:
            print(f"[validation] {who} ...", flush=True)
            r = run_measured(
                [sys.executable, "-m", "bench.validation", "--only", who, "--data", str(data),
                 "--workdir", wd]
            )
        r["rows_per_s"] = r["rows"] / r["seconds"]
        results[who] = r
        print(f"[validation] {who}: {r['rows']:,} rows in {r['seconds']:.1f} s = "
              f"{r['rows_per_s']:,.0f} rows/s, peak RSS {r['peak_rss_mb']:,.0f} MB", flush=True)
    t, b = results["tuneship"], results["baseline"]
    results["speedup"] = t["rows_per_s"] / b["rows_per_s"]
    results["memory_ratio"] = t["peak_rss_mb"] / b["peak_rss_mb"]
    results["goal"] = {"rows_per_s": 50_000, "peak_rss_mb": 2048,
                       "met": t["rows_per_s"] >= 50_000 and t["peak_rss_mb"] < 2048}
    print(f"[validation] tuneship vs plain GE: {results['speedup']:.1f}x the throughput, "
          f"{results['memory_ratio']:.2f}x the peak memory; goal (>= 50k rows/s, < 2 GB) "
          f"{'met' if results['goal']['met'] else 'NOT met'}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
