"""
### llm_drift_monitor

Hourly: compares the recent inference log (prompts the live model answered) with the
reference text profile stored in the champion's training-dataset manifest (length-
distribution PSI and token-distribution divergence, `tuneship.profile`). A retrain
governor (debounce: N drifted checks in a row; cooldown between requests) decides whether
to emit `retrain_request`, which triggers `llm_finetune`. A drift chart is written beside
the run's reports.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task

from tuneship_airflow.assets import retrain_request


@dag(
    schedule="@hourly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["tuneship", "monitoring"],
    default_args={"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(minutes=1)},
    params={
        "window_hours": Param(1.0, type="number", exclusiveMinimum=0, title="Window (hours)",
                              description="How much recent traffic to compare with the training reference."),
        "threshold": Param(0.2, type="number", exclusiveMinimum=0, title="Drift threshold"),
        "min_requests": Param(50, type="integer", minimum=1, title="Min requests in the window"),
        "debounce": Param(2, type="integer", minimum=1, title="Drifted checks in a row before a retrain"),
        "cooldown_hours": Param(24.0, type="number", minimum=0, title="Cooldown between retrains (hours)"),
    },
)
def llm_drift_monitor():
    @task(outlets=[retrain_request])
    def detect_drift(params=None, run_id=None, outlet_events=None):
        from airflow.sdk.exceptions import AirflowSkipException

        from tuneship.stages import check_drift

        result = check_drift(
            window_hours=float(params["window_hours"]),
            threshold=float(params["threshold"]),
            min_requests=int(params["min_requests"]),
            debounce=int(params["debounce"]),
            cooldown_hours=float(params["cooldown_hours"]),
            run_id=run_id,
        )
        if not result["fire"]:
            raise AirflowSkipException(f"no retrain: {result['reason']} (score {result.get('score')})")
        outlet_events[retrain_request].extra = {
            "score": result["score"],
            "champion": result["champion"],
            "dataset_version": result["dataset_version"],
            "reason": result["reason"],
        }
        return result

    detect_drift()


llm_drift_monitor()
