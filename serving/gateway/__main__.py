"""`python -m serving.gateway`: run the gateway with uvicorn on 127.0.0.1:<Ports.gateway>.

One process on uvloop with the httptools parser (uvicorn's fastest pair, both installed with
uvicorn[standard]; named here so a missing one fails loudly instead of falling back to the
slow pure-Python ones). No access log unless asked for: at hundreds of requests per second
a line per request is measurable CPU, and /metrics and the inference log already count and
record every inference request. One worker on purpose: rate limits and /metrics are
per process, so several workers would multiply the limits and split the counters.
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from tuneship import config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=config.Ports.from_env().gateway)
    parser.add_argument("--log-level", default="info")
    access = parser.add_mutually_exclusive_group()
    access.add_argument("--access-log", dest="access_log", action="store_true",
                        help="log one line per request (paths only, never bodies); off by default")
    access.add_argument("--no-access-log", dest="access_log", action="store_false",
                        help="the default; kept for existing scripts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from serving.gateway.app import create_app

    uvicorn.run(
        create_app(), host=args.host, port=args.port, log_level=args.log_level,
        access_log=args.access_log, loop="uvloop", http="httptools",
        timeout_graceful_shutdown=15, lifespan="on",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
