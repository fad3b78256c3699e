"""`make bench`: every benchmark, each against its baseline in the same run.

Results go to `TUNESHIP_HOME/bench/<name>.json` and are printed as they come.
    python -m bench [name ...]     (default: all)
"""

from __future__ import annotations

import importlib
import sys

from tuneship import config

BENCHES = ("validation", "trainer", "train_precision", "contention", "gateway", "compile", "quantize", "eval", "gates", "serving",
           "served", "retrain", "shadow", "drift")


def main(argv: list[str]) -> int:
    names = argv or list(BENCHES)
    unknown = set(names) - set(BENCHES)
    if unknown:
        print(f"unknown benchmark(s) {sorted(unknown)}; choose from {list(BENCHES)}", file=sys.stderr)
        return 2
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        out = config.home() / "bench" / f"{name}.json"
        code = module.main(["--out", str(out)])
        if code:
            return code
        print(f"[{name}] results: {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
