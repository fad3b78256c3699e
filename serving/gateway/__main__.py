"""`python -m serving.gateway`: run the gateway with uvicorn on 127.0.0.1:<Ports.gateway>."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from tuneship import config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.gateway", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=config.Ports.from_env().gateway)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--no-access-log", action="store_true", help="access lines carry paths only, never bodies")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from serving.gateway.app import create_app

    uvicorn.run(
        create_app(), host=args.host, port=args.port, log_level=args.log_level,
        access_log=not args.no_access_log, timeout_graceful_shutdown=15, lifespan="on",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
