#!/usr/bin/env bash
# Runs the whole suite; pytest's exit 5 ("no tests ran") is a failure here, never a pass.
# Two pytest-xdist workers, one test module each at a time (`--dist loadscope`: a module's
# fixtures, such as the e2e test's demo stack, stay in one process): most integration tests
# wait on servers, so the end-to-end demo runs beside them. TUNESHIP_TEST_WORKERS=0: serial.
set -uo pipefail
cd "$(dirname "$0")/.."
workers="${TUNESHIP_TEST_WORKERS:-2}"
if [ "$workers" = "0" ]; then
  .venv/bin/python -m pytest "$@"
else
  .venv/bin/python -m pytest -n "$workers" --dist loadscope "$@"
fi
code=$?
if [ "$code" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$code"
