"""Shared test set-up: every test session gets its own TUNESHIP_HOME, never the user's."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The gateway lives in serving/, the Airflow layer in plugins/, shared ML fixtures in tests/.
for p in (REPO, REPO / "plugins", REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

# Triton is installed once per checkout (make install puts it in <repo>/.tuneship/triton);
# tests reuse that install instead of downloading the server again.
os.environ.setdefault("TUNESHIP_TEST_TRITON_HOME", os.environ.get("TUNESHIP_HOME", str(REPO / ".tuneship")))
# Converted base models (checksummed, written atomically under a lock) are shared the same way,
# so the packaged SmolLM2 is converted once per checkout, not once per test session.
os.environ.setdefault("TUNESHIP_MODELS", str(Path(os.environ["TUNESHIP_TEST_TRITON_HOME"]) / "models"))

if "TUNESHIP_TEST_HOME" in os.environ:
    os.environ["TUNESHIP_HOME"] = os.environ["TUNESHIP_TEST_HOME"]
else:
    os.environ["TUNESHIP_HOME"] = tempfile.mkdtemp(prefix="tuneship-test-")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("SLACK_BOT_TOKEN", None)
