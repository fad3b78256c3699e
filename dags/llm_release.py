"""
### llm_release

Blue/green release of a `release_candidate`: first reconcile Triton with the routing state
(recovers from a release, Triton or gateway that died mid-way), then load the candidate
into the idle Triton colour, confirm readiness, run the smoke suite through the gateway to that colour only, then mirror live
traffic to it for the shadow window (deferrable: the wait runs on the triggerer, default
72 h, `shadow_hours` Param). The verdict promotes (atomic gateway switch, `@champion`
alias follows, `model_promoted` Asset) or rolls back (live untouched, run fails loudly,
Slack says why). With no live model yet (first release) the candidate goes live after
smoke and the window watches it in the live slot, rolling back on a breach.

The Variable `tuneship_shadow_hours_override` (staging and the demo) shortens every window.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task

from tuneship_airflow.assets import model_promoted, release_candidate
from tuneship_airflow.operators import ShadowWindowOperator


@dag(
    schedule=[release_candidate],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["tuneship", "serving"],
    default_args={"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(seconds=20)},
    params={
        "shadow_hours": Param(72.0, type="number", exclusiveMinimum=0, title="Shadow window (hours)",
                              description="How long the candidate shadows live traffic before the verdict."),
        "max_error_rate": Param(0.01, type="number", minimum=0, maximum=1, title="Max shadow error rate"),
        "max_p95_ms": Param(2000, type="number", exclusiveMinimum=0, title="Max shadow p95 latency (ms)"),
        "min_requests": Param(20, type="integer", minimum=1, title="Min requests in the window"),
        "version": Param("", type="string", title="Registry version",
                         description="Release this version instead of the triggering candidate."),
    },
)
def llm_release():
    @task
    def reconcile():
        """A release (or Triton, or the gateway) that died mid-way is recovered from here:
        Triton's colour models are made to match the routing state before anything moves."""
        from tuneship.stages import reconcile_serving
        from tuneship_airflow.hooks import GatewayHook, TritonHook

        return reconcile_serving(GatewayHook().routes(), TritonHook())

    @task
    def plan(params=None, triggering_asset_events=None):
        from airflow.sdk import Variable

        from tuneship.stages import StageFailed, idle_colour, release_plan
        from tuneship_airflow.hooks import GatewayHook

        candidate = None
        for asset, events in (triggering_asset_events or {}).items():
            if events and getattr(asset, "name", "") == "release_candidate":
                candidate = dict(events[-1].extra or {})
        override = Variable.get("tuneship_shadow_hours_override", default=None)
        routes = GatewayHook().routes()
        result = release_plan(candidate, params["version"] or None, routes)
        if result is None:
            raise StageFailed("nothing to release: no triggering candidate and no `version` given")
        result["colour"] = idle_colour(routes)
        result["shadow_hours"] = float(override) if override else float(params["shadow_hours"])
        return result

    @task
    def load_candidate(p: dict):
        from tuneship.stages import stage_into_repository
        from tuneship_airflow.hooks import TritonHook

        model = stage_into_repository(p["package"], p["colour"])
        TritonHook().load(model)
        return model

    @task
    def smoke(model: str, p: dict):
        from tuneship.notify import notify
        from tuneship.stages import StageFailed, smoke_through_gateway
        from tuneship_airflow.hooks import GatewayHook

        base_url, token = GatewayHook().endpoint()
        result = smoke_through_gateway(model, base_url=base_url, token=token)
        if not result["passed"]:
            notify(f"v{p['version']} failed smoke on {model}: {result['failed']}; live traffic untouched",
                   level="error")
            raise StageFailed(f"smoke failed on {model}: {result}")
        return result

    @task
    def start_shadow(model: str, p: dict, smoke_result: dict):
        from tuneship.stages import route_for
        from tuneship_airflow.hooks import GatewayHook

        hook = GatewayHook()
        routes = hook.routes()
        route = route_for(p, model)
        if routes.get("live"):
            hook.put_routes({**routes, "shadow": route})
            return "shadow"
        hook.put_routes({**routes, "live": route, "shadow": None})
        return "live"

    window = ShadowWindowOperator(
        task_id="shadow_window",
        candidate_version="{{ ti.xcom_pull(task_ids='plan')['version'] }}",
        window_hours="{{ ti.xcom_pull(task_ids='plan')['shadow_hours'] }}",
        thresholds={"max_error_rate": 0.01, "min_requests": 20},
        poll_interval=5.0,
        execution_timeout=timedelta(hours=80),
    )

    @task(outlets=[model_promoted])
    def decide(p: dict, slot: str, outlet_events=None, ti=None):
        from airflow.sdk.exceptions import AirflowFailException

        from tuneship.stages import StageFailed, finish_release
        from tuneship_airflow.hooks import GatewayHook, TritonHook

        verdict = ti.xcom_pull(task_ids="shadow_window")
        try:
            result = finish_release(p, slot, verdict, gateway=GatewayHook(), triton=TritonHook())
        except StageFailed as exc:  # a rollback is a decision: fail loudly, never retry it
            raise AirflowFailException(str(exc)) from exc
        outlet_events[model_promoted].extra = {"version": p["version"], "colour": p["colour"]}
        return result

    p = plan()
    reconcile() >> p
    model = load_candidate(p)
    smoked = smoke(model, p)
    slot = start_shadow(model, p, smoked)
    slot >> window >> decide(p, slot)


llm_release()
