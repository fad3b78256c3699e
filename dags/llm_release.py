"""
### llm_release

Blue/green release of a task's `release_candidate` (the event's `task`, or the `task` Param
with a `version`; candidates of other tasks in the same run each get their own run,
`fan_out__<task>__<run id>` with conf `task` and `version`, and a candidate Airflow 3.3 gave
no run is taken by the run that left it behind, see `tuneship.event_claims`): each task has its own colours in Triton (`<task>_blue`, `<task>_green`),
its own routes in the gateway (its served model) and its own inference log; nothing here
touches another task's. First reconcile the task's Triton colours with its routing state
(recovers from a release, Triton or gateway that died mid-way), then load the candidate
into the idle Triton colour, confirm readiness, run warm-up requests straight to it, run the
smoke suite through the gateway to that colour only (scores below the suite's gates: the
candidate is unloaded, Slack is told, the run fails), then measure it against the live colour
on the same requests straight to Triton (`serving_gate`: p95, tokens/s, peak memory and cost
per 1k tokens, with the task file's `serving` gates; a failure is refused the same way), then
mirror live
traffic to it for the shadow window (deferrable: the wait runs on the triggerer, default
72 h, `shadow_hours` Param). The window is decided with anytime-valid confidence sequences
(`tuneship.shadow`, `tuneship.sequential`): error rate, p95, the task's format rate and,
against live on the same requests, format and refusal differences; a clear loser is rolled
back as soon as a bound crosses, a clear non-inferior candidate is promoted early once the
task's `release.min_requests` and `release.min_seconds` have passed, and what is still open
at the window's end follows the task's `release.on_open` (rollback, hold, or estimates).
Promote: atomic gateway switch, `@champion` alias follows, `model_promoted` Asset. Rollback
or hold: live untouched, the run fails loudly, Slack says which bound crossed what after how
many requests. With no live model yet (first release) the candidate goes live after smoke
and the window watches it in the live slot. A task whose `release.strategy` is `canary` or
`shadow_then_canary` then runs a progressive canary (`canary`, deferrable): the candidate
answers `canary_steps` percent of live traffic in turn, each step baked
`canary_bake_minutes` under the same sequential analysis of its own answers (and of users'
task success, `min_task_success`); a breach at any step sends all traffic back at once.

Before the switch, `approval` asks a person when the task file's `approval` rules give a
reason (every release; a changed dataset schema or source, hyperparameters or base model
against the champion; a window that ended undecided; a gate its suite held): an Airflow
human-in-the-loop request (the UI's Required Actions, or the REST API) with the reasons,
figures and links. Approve switches (a held window included), Reject or a timeout
(`approval.on_timeout: rollback`) rolls back; who answered and why goes with the verdict.

After the switch a post-switch guard watches the new version's own live answers
(deferrable, `post_switch_minutes`, default 30): as soon as the confidence sequence of the
error rate or of p95 latency lies above `max_error_rate` or `max_p95_ms`, traffic goes back
at once (gateway rollback to the previous colour, still loaded; `@champion` follows), Slack
gets the figures and the run fails (no retry). A first release has nothing to go back to:
its live route is taken down and `@champion` removed. Too little traffic to judge is a
Slack warning, not a failure. After a clean window the previous colour stays loaded for
`retention_minutes` (default 120; a rollback stays instant), then it is unloaded from
Triton and cleared from the routes' `previous`, if nothing routes to it by then.

One release per task at a time, any number of tasks side by side: the run first takes its
task's release slot (`take_release_slot`, a setup task; waiting for it is deferred to the
triggerer, so a release queued behind its task's 72-hour window holds no worker) and gives it
back at the end (`give_back_release_slot`, a teardown: it runs when the release fails too).
A slot whose holder no longer runs (killed, marked failed, deleted) is taken over. The next
release of the same task therefore waits for this run, retention included; another task's
does not (`max_active_runs` bounds them all).

A refusal (smoke below its gates, a shadow rollback, a post-switch breach) is a decision:
the task fails once, without a retry, and Slack hears it once. Retries stay for faults
(Triton, the gateway or MLflow not answering).

The Variable `tuneship_shadow_hours_override` (staging and the demo) shortens every window:
the shadow window takes its value, and the post-switch and retention windows are capped at
the same length. `tuneship_post_switch_minutes_override` and
`tuneship_retention_minutes_override` set those two windows on their own.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.providers.standard.sensors.date_time import DateTimeSensorAsync
from airflow.sdk import Param, dag, task

from tuneship.tasks import task_names
from tuneship_airflow.assets import model_promoted, release_candidate
from tuneship_airflow.operators import (
    CanaryOperator,
    PostSwitchWindowOperator,
    ReleaseApprovalOperator,
    ReleaseSlotOperator,
    ShadowWindowOperator,
)
from tuneship_airflow.refusals import fail_on_refusal


@dag(
    schedule=[release_candidate],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=8,  # releases of different tasks overlap; one per task (the release slot)
    doc_md=__doc__,
    tags=["tuneship", "serving"],
    default_args={"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(seconds=20)},
    params={
        "shadow_hours": Param(None, type=["null", "number"], exclusiveMinimum=0, title="Shadow window (hours)",
                              description="How long the candidate shadows live traffic before the verdict. "
                                          "Empty: the task's (release.shadow_hours, 72 by default)."),
        "max_error_rate": Param(None, type=["null", "number"], minimum=0, maximum=1, title="Max error rate",
                                description="Shadow window and post-switch guard: above it, traffic goes back. "
                                            "Empty: the task's."),
        "max_p95_ms": Param(None, type=["null", "number"], exclusiveMinimum=0, title="Max p95 latency (ms)",
                            description="Shadow window and post-switch guard: p95 of the successful answers. "
                                        "Empty: the task's."),
        "min_requests": Param(None, type=["null", "integer"], minimum=1, title="Min requests in the window",
                              description="Empty: the task's."),
        "post_switch_minutes": Param(30.0, type="number", exclusiveMinimum=0, maximum=1440,
                                     title="Post-switch window (minutes)",
                                     description="How long the guard watches the new live version after the switch."),
        "post_switch_min_requests": Param(20, type="integer", minimum=1, title="Min requests after the switch",
                                          description="The guard judges (and can roll back) only once this many "
                                                      "live answers are in."),
        "retention_minutes": Param(120.0, type="number", minimum=0, maximum=10080,
                                   title="Retention of the previous colour (minutes)",
                                   description="After a clean post-switch window the previous colour stays loaded "
                                               "this long (instant rollback), then it is unloaded."),
        "task": Param(None, type=["null", "string"], enum=[None, *task_names()], title="Task",
                      description="include/tasks/<task>.yaml. Empty: the triggering candidate's task, else the default."),
        "version": Param(None, type=["null", "string"], title="Registry version",
                         description="Release this version of the task's registered model instead of the "
                                     "triggering candidate."),
    },
)
def llm_release():
    @task(inlets=[release_candidate])  # inlets: to read recent events (strays)
    def which_task(params=None, run_id=None, dag_run=None, triggering_asset_events=None, inlet_events=None):
        """The task this run releases and the release runs to start for other tasks' candidates."""
        from tuneship.stages import release_trigger
        from tuneship_airflow.assets import recent_events, skip_if_handled

        chosen = release_trigger(params["task"], params["version"], triggering_asset_events, run_id=run_id,
                                 recent_events=recent_events(dag_run, inlet_events, release_candidate))
        skip_if_handled(chosen, "nothing to release: every candidate of this run was handled by an earlier run")
        print(f"releasing task {chosen['task']}; fanning out: {[f['conf'] for f in chosen['fan_out']] or 'nothing'}")
        return chosen

    @task
    def other_candidates(chosen: dict) -> list[dict]:
        """fan_out's kwargs, one per other task's candidate: `trigger_run_id` and `conf`."""
        return chosen["fan_out"]

    # One release run per other task's candidate (conf: task, version); a retry never doubles one.
    fan_out = TriggerDagRunOperator.partial(
        task_id="fan_out", trigger_dag_id="llm_release", skip_when_already_exists=True,
    )

    take_slot = ReleaseSlotOperator(
        task_id="take_release_slot",
        task="{{ ti.xcom_pull(task_ids='which_task')['task'] }}",
        poll_interval=5.0,
    )

    @task
    def give_back_release_slot(chosen: dict, run_id=None):
        """The release's teardown: runs after the last step, failed or not."""
        from tuneship.release_slot import give_back

        return {"task": chosen["task"], "given_back": give_back(chosen["task"], run_id)}

    @task
    def reconcile(chosen: dict):
        """A release (or Triton, or the gateway) that died mid-way is recovered from here:
        the task's Triton colour models are made to match its routing state before anything moves."""
        from tuneship.stages import reconcile_serving
        from tuneship.tasks import load_task
        from tuneship_airflow.hooks import GatewayHook, TritonHook

        task = load_task(chosen["task"])
        return reconcile_serving(task, GatewayHook(served_model=task.served_model).routes(), TritonHook())

    @task
    def plan(chosen: dict, params=None):
        from airflow.sdk import Variable

        from tuneship.stages import StageFailed, release_plan, release_thresholds, release_windows
        from tuneship.tasks import load_task
        from tuneship_airflow.hooks import GatewayHook

        task = load_task(chosen["task"])
        candidate = chosen["candidate"]
        thresholds = release_thresholds(task, params)
        windows = release_windows(
            {**params, "shadow_hours": thresholds.pop("shadow_hours")},
            shadow_hours_override=Variable.get("tuneship_shadow_hours_override", default=None),
            post_switch_minutes_override=Variable.get("tuneship_post_switch_minutes_override", default=None),
            retention_minutes_override=Variable.get("tuneship_retention_minutes_override", default=None),
        )
        routes = GatewayHook(served_model=task.served_model).routes()
        result = release_plan(task, candidate, params["version"] or None, routes)
        if result is None:
            raise StageFailed(f"nothing to release for task {task.name}: no triggering candidate and no `version` given")
        result.update(windows)
        result["thresholds"] = thresholds
        return result

    @task
    def load_candidate(p: dict):
        from tuneship.stages import stage_into_repository, warm_up_candidate
        from tuneship.tasks import load_task
        from tuneship_airflow.hooks import TritonHook

        model = stage_into_repository(p["package"], p["model"])
        triton = TritonHook()
        triton.load(model)  # returns once Triton reports the model ready
        print(f"warm-up: {warm_up_candidate(load_task(p['task']), model, triton)}")
        return model

    @task
    @fail_on_refusal
    def smoke(model: str, p: dict):
        from tuneship.stages import smoke_candidate
        from tuneship.tasks import load_task
        from tuneship_airflow.hooks import GatewayHook, TritonHook

        return smoke_candidate(load_task(p["task"]), model, p["version"],
                               gateway=GatewayHook(served_model=p["served_model"]), triton=TritonHook())

    @task
    @fail_on_refusal
    def serving_gate(model: str, p: dict, smoke_result: dict):
        """p95, tokens/s, memory and cost against the live colour on the same requests."""
        from tuneship.stages import serving_candidate
        from tuneship.tasks import load_task
        from tuneship_airflow.hooks import TritonHook

        return serving_candidate(load_task(p["task"]), model, p, triton=TritonHook())

    @task
    def start_shadow(model: str, p: dict, serving_result: dict):
        from tuneship.stages import route_for
        from tuneship_airflow.hooks import GatewayHook

        hook = GatewayHook(served_model=p["served_model"])
        routes = hook.routes()
        route = route_for(p, model)
        if routes.get("live"):
            hook.put_routes({**routes, "shadow": route})
            return "shadow"
        hook.put_routes({**routes, "live": route, "shadow": None})
        return "live"

    # the candidate and its release settings (the task file's, the run's Params on top), as
    # the windows on the triggerer read them
    candidate = {"task": "{{ ti.xcom_pull(task_ids='plan')['task'] }}",
                 "candidate_version": "{{ ti.xcom_pull(task_ids='plan')['version'] }}",
                 "window_hours": "{{ ti.xcom_pull(task_ids='plan')['shadow_hours'] }}",
                 "release": "{{ ti.xcom_pull(task_ids='plan')['thresholds'] | tojson }}",
                 "slot": "{{ ti.xcom_pull(task_ids='start_shadow') }}", "poll_interval": 5.0}
    window = ShadowWindowOperator(task_id="shadow_window", execution_timeout=timedelta(hours=80), **candidate)
    canary = CanaryOperator(task_id="canary", shadow_verdict="{{ ti.xcom_pull(task_ids='shadow_window') | tojson }}",
                            execution_timeout=timedelta(hours=200), **candidate)

    # a person approves before the switch when the task's `approval` rules give a reason
    approve = ReleaseApprovalOperator(task_id="approval", task_name=candidate["task"],
                                      candidate_version=candidate["candidate_version"])

    @task(outlets=[model_promoted])
    @fail_on_refusal  # a rollback is a decision: fail loudly, never retry it
    def decide(p: dict, slot: str, outlet_events=None, ti=None):
        import time

        from tuneship import approval
        from tuneship.stages import finish_release, release_verdict
        from tuneship_airflow.hooks import GatewayHook, TritonHook

        verdict = approval.apply(release_verdict(ti.xcom_pull(task_ids="canary"), ti.xcom_pull(task_ids="shadow_window")),
                                 ti.xcom_pull(task_ids="approval"))
        switched_at = time.time()  # the post-switch window counts the new version's answers from here
        result = finish_release(p, slot, verdict, gateway=GatewayHook(served_model=p["served_model"]), triton=TritonHook())
        outlet_events[model_promoted].extra = {"task": p["task"], "version": p["version"], "colour": p["colour"]}
        return {**result, "switched_at": switched_at}

    post_window = PostSwitchWindowOperator(
        task_id="post_switch_window",
        served_model="{{ ti.xcom_pull(task_ids='plan')['served_model'] }}",
        version="{{ ti.xcom_pull(task_ids='plan')['version'] }}",
        switched_at="{{ ti.xcom_pull(task_ids='decide')['switched_at'] }}",
        window_minutes="{{ ti.xcom_pull(task_ids='plan')['post_switch_minutes'] }}",
        thresholds={"max_error_rate": "{{ ti.xcom_pull(task_ids='plan')['thresholds']['max_error_rate'] }}",
                    "max_p95_ms": "{{ ti.xcom_pull(task_ids='plan')['thresholds']['max_p95_ms'] }}",
                    "alpha": "{{ ti.xcom_pull(task_ids='plan')['thresholds']['alpha'] }}",
                    "min_requests": "{{ params.post_switch_min_requests }}"},
        poll_interval=5.0,
        execution_timeout=timedelta(hours=25),
    )

    @task
    @fail_on_refusal  # the rollback is done; a retry must not repeat the decision
    def post_switch_guard(p: dict, ti=None):
        """Breach: traffic back, @champion back, Slack, run fails (no retry). Else keep."""
        from tuneship.stages import guard_release
        from tuneship_airflow.hooks import GatewayHook, TritonHook

        verdict = ti.xcom_pull(task_ids="post_switch_window")
        return guard_release(p, verdict, retention_minutes=p["retention_minutes"],
                             gateway=GatewayHook(served_model=p["served_model"]), triton=TritonHook())

    retention = DateTimeSensorAsync(
        task_id="retention_window",
        target_time="{{ ti.xcom_pull(task_ids='post_switch_guard')['retain_until'] }}",
    )

    @task
    def retire_previous(p: dict):
        from tuneship.stages import retire_previous as retire
        from tuneship_airflow.hooks import GatewayHook, TritonHook

        return retire(p, gateway=GatewayHook(served_model=p["served_model"]), triton=TritonHook())

    chosen = which_task()
    fan_out.expand_kwargs(other_candidates(chosen))
    chosen >> take_slot
    p = plan(chosen)
    take_slot >> reconcile(chosen) >> p
    model = load_candidate(p)
    smoked = smoke(model, p)
    slot = start_shadow(model, p, serving_gate(model, p, smoked))
    decided = decide(p, slot)
    slot >> window >> canary >> approve >> decided >> post_window
    retired = retire_previous(p)
    post_window >> post_switch_guard(p) >> retention >> retired
    retired >> give_back_release_slot(chosen).as_teardown(setups=take_slot)


llm_release()
