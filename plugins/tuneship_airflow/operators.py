"""Operators: the deferrable shadow and post-switch windows, the release slot, the release's
approval (human in the loop), and the local fine-tune runner.

The Kubernetes and Docker runners use the providers' own KubernetesPodOperator and
DockerOperator (see dags/llm_finetune.py); the local runner below runs exactly the same
entrypoint and arguments as the pod, as a subprocess of the worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import BaseOperator

from tuneship_airflow.triggers import (
    CanaryStepTrigger,
    PostSwitchWindowTrigger,
    ReleaseSlotTrigger,
    ShadowWindowTrigger,
    dag_run_state,
)


def _release_settings(value: Any) -> dict[str, Any]:
    """A release's settings as given: a dict, or its JSON (a rendered template)."""
    import json

    if isinstance(value, str):
        value = json.loads(value) if value.strip() else {}
    if not isinstance(value, dict):
        raise ValueError(f"release settings must be a mapping, got {value!r}")
    return value


class ShadowWindowOperator(BaseOperator):
    """Wait out the shadow window on the triggerer, then return the verdict.

    The window is decided by `tuneship.shadow` (anytime-valid confidence sequences over the
    task's partition of the inference log, with the task's answer check, parser and refusal
    detector): a clear loser is rolled back as soon as a bound says so, a clear non-inferior
    candidate is promoted once the declared minimums have passed, and what is still open at
    the window's end is decided by the task's `release.on_open`. `release` (the task's
    release settings merged with the run's Params, a dict or its JSON) is templated; `slot`
    is where the candidate answers (`shadow`, or `live` for a first release).
    """

    template_fields: Sequence[str] = ("task", "candidate_version", "window_hours", "release", "slot")
    ui_color = "#e8dff5"

    def __init__(self, *, task: str, candidate_version: str, window_hours: float | str = 72.0,
                 poll_interval: float = 10.0, release: dict[str, Any] | str | None = None, slot: str = "shadow",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.task = task
        self.candidate_version = candidate_version
        self.window_hours = window_hours
        self.poll_interval = poll_interval
        self.release = release or {}
        self.slot = slot

    def execute(self, context: Any) -> dict[str, Any] | None:
        from tuneship.shadow import state_path
        from tuneship.tasks import load_task

        hours = float(self.window_hours)
        if hours <= 0:
            raise ValueError(f"window_hours must be > 0, got {hours}")
        if self.slot not in ("shadow", "live"):
            raise ValueError(f"slot must be shadow or live, got {self.slot!r}")
        now = time.time()
        task = load_task(self.task)
        release = {**task.release.model_dump(), **_release_settings(self.release)}
        if release.get("strategy") == "canary" and self.slot == "shadow":
            self.log.info("task %s releases by canary alone: no shadow window", task.name)
            return {"verdict": "promote", "skipped": True, "slot": self.slot, "requests": 0, "errors": 0,
                    "error_rate": 0.0, "p95_ms": None, "reasons": ["the task's release strategy is canary: "
                                                                    "no shadow window"]}
        self.log.info("shadow window for %s version %s (%s slot): %.3f h", task.name, self.candidate_version,
                      self.slot, hours)
        self.defer(
            trigger=ShadowWindowTrigger(
                task_name=task.name, slot=self.slot, served_model=task.served_model,
                version=str(self.candidate_version), since=now, ends_at=now + hours * 3600, release=release,
                state_path=str(state_path(task.served_model, "shadow", str(self.candidate_version), now)),
                poll_interval=self.poll_interval,
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        from tuneship.monitor import feedback_by_version, task_records
        from tuneship.shadow import readable
        from tuneship.tasks import load_task

        if not event or event.get("status") != "decided" or not isinstance(event.get("verdict"), dict):
            raise RuntimeError(f"shadow window ended without a usable event: {event!r}")
        report = event["verdict"]
        task = load_task(self.task)
        # Reported, not gated: users' feedback on the answers each version gave them (one read
        # of the window, once; the polls never re-read it).
        by_version = feedback_by_version(task_records(task.served_model, since=float(report["since"])))
        verdict = {**report, "reasons": readable(report), "slot": self.slot,
                   **(by_version.get(str(self.candidate_version)) or {}), "feedback_by_version": by_version,
                   "window_event": {"status": event["status"], "at": event["at"]}}
        self.log.info("shadow verdict: %s after %d requests: %s", verdict["verdict"], verdict["requests"],
                      verdict["reasons"])
        return verdict


class CanaryOperator(BaseOperator):
    """The progressive canary (`tuneship.stages.canary_plan`): when the task's strategy asks for
    one and the shadow window promoted, the candidate answers `canary_steps` percent of live
    traffic in turn, each step baked on the triggerer (`CanaryStepTrigger`); a breach at any
    step sends all traffic back to live at once and returns a `rollback` verdict, the last step
    passed returns `promote`. Otherwise returns `{"skipped": True, "reason"}` at once.
    `shadow_verdict` and `release` are templated (dicts or their JSON)."""

    template_fields: Sequence[str] = ("task", "candidate_version", "release", "slot", "shadow_verdict",
                                      "window_hours")
    ui_color = "#dff5e3"

    def __init__(self, *, task: str, candidate_version: str, release: dict[str, Any] | str | None = None,
                 slot: str = "shadow", shadow_verdict: dict[str, Any] | str | None = None,
                 window_hours: float | str = 72.0, poll_interval: float = 10.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.task = task
        self.candidate_version = candidate_version
        self.release = release or {}
        self.slot = slot
        self.shadow_verdict = shadow_verdict
        self.window_hours = window_hours
        self.poll_interval = poll_interval

    def _plan(self) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        from tuneship.stages import canary_plan
        from tuneship.tasks import load_task

        task = load_task(self.task)
        release = {**task.release.model_dump(), **_release_settings(self.release)}
        verdict = _release_settings(self.shadow_verdict) if self.shadow_verdict else None
        return task, release, canary_plan(release, slot=self.slot, shadow_verdict=verdict,
                                          shadow_hours=float(self.window_hours))

    def _defer_step(self, task: Any, release: dict[str, Any], plan: dict[str, Any], step: int, started: float,
                    history: list[dict[str, Any]]) -> None:
        from tuneship.shadow import state_path

        now = time.time()
        self.log.info("canary step %d of %d: %d %% of live traffic for %.0f s", step + 1, len(plan["steps"]),
                      plan["steps"][step], plan["bake_s"])
        self.defer(
            trigger=CanaryStepTrigger(
                task_name=task.name, slot="shadow", served_model=task.served_model,
                version=str(self.candidate_version), since=started, ends_at=now + plan["bake_s"], release=release,
                state_path=str(state_path(task.served_model, "canary", str(self.candidate_version), started)),
                poll_interval=self.poll_interval),
            method_name="step_done", kwargs={"step": step, "started": started, "history": history})

    def execute(self, context: Any) -> dict[str, Any] | None:
        from tuneship_airflow.hooks import GatewayHook

        task, release, plan = self._plan()
        if not plan["run"]:
            self.log.info("no canary: %s", plan["reason"])
            return {"skipped": True, "reason": plan["reason"]}
        GatewayHook(served_model=task.served_model).canary(plan["steps"][0])
        self._defer_step(task, release, plan, 0, time.time(), [])
        return None

    def step_done(self, context: Any, event: dict[str, Any] | None = None, *, step: int, started: float,
                  history: list[dict[str, Any]]) -> dict[str, Any] | None:
        from tuneship.stages import canary_step, decided
        from tuneship_airflow.hooks import GatewayHook

        if not event or event.get("status") not in {"breach", "step_done"} or not isinstance(event.get("verdict"), dict):
            GatewayHook(served_model=self._plan()[0].served_model).canary(0)  # unknown state: traffic back
            raise RuntimeError(f"canary step ended without a usable event (traffic sent back to live): {event!r}")
        task, release, plan = self._plan()
        out = canary_step(GatewayHook(served_model=task.served_model), plan, step, event, history)
        report, weight = event["verdict"], plan["steps"][step]
        decided("canary_step", task.name, f"step {step + 1} of {len(plan['steps'])} ({weight} % of traffic): "
                + ("breached; traffic back to live" if event["status"] == "breach" else "passed"),
                version=self.candidate_version, once_per=f"step{step + 1}",
                figures={"step": step + 1, "weight": weight, "requests": report.get("requests"),
                         "errors": report.get("errors"), "p95_ms": report.get("p95_ms"), "status": event["status"]})
        if "next" in out:
            self._defer_step(task, release, plan, out["next"], started, out["history"])
            return None
        self.log.info("canary verdict: %s: %s", out["verdict"], out["reasons"])
        return out


class PostSwitchWindowOperator(BaseOperator):
    """Watch the new live version for `window_minutes` after the switch, on the triggerer;
    return the verdict of `tuneship.shadow.guard_verdict` (`breach`, `healthy` or
    `insufficient`). Acting on it is the next task's job (`tuneship.stages.guard_release`).

    The window is anchored on `switched_at` (epoch seconds, from the task that switched), so
    a retry or a late start resumes the same window instead of starting a new one.
    `thresholds`: `max_error_rate`, `max_p95_ms`, `min_requests` and optionally `alpha`
    (templated, so they can come from Params)."""

    template_fields: Sequence[str] = ("served_model", "version", "switched_at", "window_minutes", "thresholds")
    ui_color = "#f5dfe3"

    def __init__(self, *, served_model: str, version: str, switched_at: float | str | None = None,
                 window_minutes: float | str = 30.0, thresholds: dict[str, Any] | None = None,
                 poll_interval: float = 15.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.served_model = served_model
        self.version = version
        self.switched_at = switched_at
        self.window_minutes = window_minutes
        self.thresholds = thresholds or {}
        self.poll_interval = poll_interval

    def execute(self, context: Any) -> None:
        from tuneship.shadow import state_path

        minutes = float(self.window_minutes)
        if minutes <= 0:
            raise ValueError(f"window_minutes must be > 0, got {minutes}")
        since = float(self.switched_at) if self.switched_at not in (None, "", "None") else time.time()
        th = self.thresholds
        self.log.info("post-switch window for v%s: %.2f min from %s", self.version, minutes,
                      time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)))
        self.defer(
            trigger=PostSwitchWindowTrigger(
                served_model=str(self.served_model),
                version=str(self.version),
                since=since,
                ends_at=since + minutes * 60,
                release={"max_error_rate": float(th.get("max_error_rate", 0.01)),
                         "max_p95_ms": float(th.get("max_p95_ms", 2000.0)),
                         "min_requests": int(float(th.get("min_requests", 20))),
                         "alpha": float(th.get("alpha", 0.05)), "min_seconds": 0.0, "on_open": "hold"},
                state_path=str(state_path(str(self.served_model), "post-switch", str(self.version), since)),
                poll_interval=self.poll_interval,
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        if not event or event.get("status") not in {"complete", "breach"} or not isinstance(event.get("verdict"), dict):
            raise RuntimeError(f"post-switch window ended without a usable event: {event!r}")
        verdict = dict(event["verdict"])
        if (event["status"] == "breach") != (verdict.get("verdict") == "breach"):
            raise RuntimeError(f"post-switch event and verdict disagree: {event!r}")
        verdict["window_event"] = {"status": event["status"], "at": event.get("at")}
        self.log.info("post-switch verdict: %s", verdict)
        return verdict


class ReleaseSlotOperator(BaseOperator):
    """Take `task`'s release slot for this run: one release per task at a time, any number of
    tasks side by side (`tuneship.release_slot`). The release's setup task; its teardown gives
    the slot back, even when the release fails.

    A free slot (or one this run already holds: a retry) is taken at once. A held one is
    waited for on the triggerer (`ReleaseSlotTrigger`), so a release queued behind another
    task-mate's 72-hour shadow window holds no worker. A holder whose run no longer runs is
    taken over. Returns the holder record (and `took_over`, the stale holder replaced)."""

    template_fields: Sequence[str] = ("task",)
    ui_color = "#fdf1d6"

    def __init__(self, *, task: str, poll_interval: float = 15.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.task = task
        self.poll_interval = poll_interval

    def execute(self, context: Any) -> dict[str, Any]:
        from tuneship.release_slot import try_take

        run_id = context["run_id"]
        result = try_take(self.task, run_id, dag_id=self.dag_id, run_state=dag_run_state)
        if result["taken"]:
            return self._taken(result)
        held = result["holder"]
        self.log.info("waiting for the release slot of task %s: held by run %s (%s) since %s",
                      self.task, held["run_id"], result["holder_state"], held.get("taken_at"))
        self.defer(
            trigger=ReleaseSlotTrigger(task_name=self.task, run_id=run_id, dag_id=self.dag_id,
                                       poll_interval=self.poll_interval),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        if not event or event.get("status") != "taken" or event.get("holder", {}).get("run_id") != context["run_id"]:
            raise RuntimeError(f"release slot of task {self.task} not taken: {event!r}")
        return self._taken(event)

    def _taken(self, result: dict[str, Any]) -> dict[str, Any]:
        stale = result.get("took_over")
        if stale:
            self.log.warning("took the release slot of task %s over from run %s (%s): its give-back never ran",
                             self.task, stale["run_id"], stale["state"])
        self.log.info("release slot of task %s taken by run %s", self.task, result["holder"]["run_id"])
        return {**result["holder"], "took_over": stale}


class LocalTrainerOperator(BaseOperator):
    """The embedded default's "GPU pod": the trainer entrypoint as a worker subprocess.

    Idempotent: a complete output (manifest.json present) for this run is reused; an
    interrupted one resumes from its last checkpoint (the trainer does that itself).
    `on_kill` terminates the subprocess group so no orphan keeps training.
    """

    template_fields: Sequence[str] = ("arguments", "output_dir")

    def __init__(self, *, arguments: list[str] | str, output_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.arguments = arguments
        self.output_dir = output_dir
        self._proc: subprocess.Popen | None = None

    def execute(self, context: Any) -> str:
        args = self.arguments
        if isinstance(args, str):  # rendered from an XCom as a string
            import ast

            args = ast.literal_eval(args)
        manifest = os.path.join(self.output_dir, "manifest.json")
        if os.path.exists(manifest):
            self.log.info("training output already complete at %s; reusing it", self.output_dir)
            return self.output_dir
        cmd = [sys.executable, *args[1:]] if args and args[0] == "python" else list(args)
        self.log.info("running: %s", " ".join(cmd))
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.log.info("%s", line.rstrip())
        code = self._proc.wait()
        if code != 0:
            raise RuntimeError(f"trainer exited with {code} (2 means a recipe/argument error; see the log above)")
        return self.output_dir

    def on_kill(self) -> None:
        if self._proc and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)


class ReleaseApprovalOperator(HITLOperator):
    """Approval before the switch, through Airflow's human-in-the-loop request (answered in
    the UI's Required Actions page or `PATCH .../hitlDetails`): asks only when the task's
    `approval` rules give a reason (`tuneship.approval.reasons`), else returns at once
    (`asked: false`). The request names why, with the figures and links; the task waits in
    `awaiting_input`, holding no worker. A timeout does what the task declares: `rollback`
    answers Reject (Airflow applies the default), `wait` never times out. Returns
    `{asked, approved, by, comment, at, timed_out, reasons}` for `decide`."""

    template_fields: Sequence[str] = (*HITLOperator.template_fields, "task_name", "candidate_version")

    def __init__(self, *, task_name: str, candidate_version: str, verdict_task_ids: Sequence[str] = ("canary", "shadow_window"),
                 **kwargs: Any) -> None:
        from airflow.sdk import Param

        from tuneship.approval import OPTIONS  # light: no heavy imports at DAG parse

        # the form's one field; the DAG's own Params arrive in kwargs too (HITL keeps task-level ones)
        params = dict(kwargs.pop("params", None) or {})
        params["comment"] = Param(None, type=["null", "string"], title="Comment",
                                  description="Why (optional; kept with the release's record)")
        super().__init__(subject="Release approval", options=list(OPTIONS), params=params, **kwargs)
        self.task_name = task_name
        self.candidate_version = candidate_version
        self.verdict_task_ids = tuple(verdict_task_ids)

    def execute(self, context: Any) -> Any:
        from datetime import timedelta

        from tuneship import approval
        from tuneship.stages import release_verdict
        from tuneship.tasks import load_task

        ti = context["ti"]
        verdict = release_verdict(*(ti.xcom_pull(task_ids=t) for t in self.verdict_task_ids))
        task = load_task(self.task_name)
        why = approval.reasons(task, self.candidate_version, verdict) if verdict.get("verdict") in ("promote", "hold") \
            else []
        if not why:
            return {"asked": False, "reasons": [], "approved": None}
        plan = ti.xcom_pull(task_ids="plan")
        self.subject, self.body = approval.request(task, plan, verdict, why,
                                                   links=approval.links(task, self.candidate_version, context["dag_run"]))
        spec = task.approval
        if spec.on_timeout == "rollback" and spec.timeout_hours:
            self.response_timeout = timedelta(hours=spec.timeout_hours)
            self.defaults = [approval.REJECT]
        else:
            self.response_timeout, self.defaults = None, None
        self.validate_defaults()
        ti.xcom_push(key="request", value={"subject": self.subject, "body": self.body, "reasons": why,
                                           "timeout_hours": spec.timeout_hours if self.defaults else None})
        approval.asked(task, plan, why, self.generate_link_to_ui_from_context(context=context))
        return super().execute(context)  # waits in awaiting_input; resumes in execute_complete

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        from tuneship.approval import APPROVE

        payload = super().execute_complete(context, event)
        ti = context["ti"]
        request = ti.xcom_pull(task_ids=ti.task_id, key="request") or {}
        user = payload["responded_by_user"] or None
        at = payload["responded_at"]
        answer = {"asked": True, "reasons": request.get("reasons") or [],
                  "approved": payload["chosen_options"] == [APPROVE],
                  "by": (user.get("name") or user.get("id")) if isinstance(user, dict) else user,
                  "comment": (payload["params_input"] or {}).get("comment") or None,
                  "at": at.isoformat() if hasattr(at, "isoformat") else str(at),
                  "timed_out": user is None, "timeout_hours": request.get("timeout_hours")}
        from tuneship import approval
        from tuneship.tasks import load_task

        approval.answered(load_task(self.task_name), self.candidate_version, answer)
        return answer
