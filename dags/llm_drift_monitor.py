"""
### llm_drift_monitor

Hourly, for each task (one mapped task instance per task file): compares the task's
recent inference log (prompts its live model answered) with the reference text profile
stored in its champion's training-dataset manifest (length-distribution PSI and
token-distribution divergence, `tuneship.profile`), and runs the task's two-sample tests as
one family (`tuneship.drift`, Holm by default): an MMD permutation test on sentence
embeddings of a sample of recent prompts against the champion's training prompts, and the
champion's recent answers against its own first window after promotion (length, format
failures, refusals, each parsed label). The task's retrain governor decides whether to emit
`retrain_request` (extra: `task`), which triggers `llm_finetune`: debounce (N drifted checks
in a row), cooldown, hysteresis (the drift must clear before it fires again), one open
retrain per task, and a GPU-hour budget per week from the champion's measured training time.
Every decision, with what drifted and why it did or did not fire, is appended to
`monitor/<task>/governor.jsonl`. Charts (the profile, the tests) are written beside the run's
reports. The settings come from the task file's `drift:` section; a Param given here
replaces it for this run.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task

from tuneship.tasks import task_names
from tuneship_airflow.assets import retrain_request
from tuneship_airflow.schedules import clock


@dag(
    schedule=clock("@hourly"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["tuneship", "monitoring"],
    default_args={"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(minutes=1)},
    params={
        "window_hours": Param(None, type=["null", "number"], exclusiveMinimum=0, title="Window (hours)",
                              description="How much recent traffic to compare with the training reference. "
                                          "Empty: each task's."),
        "threshold": Param(None, type=["null", "number"], exclusiveMinimum=0, title="Drift threshold",
                           description="Empty: each task's."),
        "min_requests": Param(None, type=["null", "integer"], minimum=1, title="Min requests in the window",
                              description="Empty: each task's."),
        "debounce": Param(None, type=["null", "integer"], minimum=1, title="Drifted checks in a row before a retrain",
                          description="Empty: each task's."),
        "cooldown_hours": Param(None, type=["null", "number"], minimum=0, title="Cooldown between retrains (hours)",
                                description="Empty: each task's."),
    },
)
def llm_drift_monitor():
    @task(outlets=[retrain_request])
    def detect_drift(task_name: str, params=None, run_id=None, outlet_events=None):
        from airflow.sdk.exceptions import AirflowSkipException

        from tuneship.stages import check_drift, drift_settings
        from tuneship.tasks import load_task

        t = load_task(task_name)
        s = drift_settings(t, params)
        result = check_drift(
            t,
            window_hours=float(s["window_hours"]),
            threshold=float(s["threshold"]),
            min_requests=int(s["min_requests"]),
            debounce=int(s["debounce"]),
            cooldown_hours=float(s["cooldown_hours"]),
            run_id=run_id,
        )
        if not result["fire"]:
            raise AirflowSkipException(f"{task_name}: no retrain: {result['reason']} (score {result.get('score')})")
        outlet_events[retrain_request].extra = {
            "task": task_name,
            "score": result["score"],
            "champion": result["champion"],
            "dataset_version": result["dataset_version"],
            "reason": result["reason"],
        }
        return result

    detect_drift.expand(task_name=task_names())


llm_drift_monitor()
