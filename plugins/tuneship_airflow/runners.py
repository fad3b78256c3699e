"""The `docker` and `kubernetes` fine-tune runners: the providers' own operators, built lazily.

Same image, same entrypoint, same arguments as the local runner (`tuneship.runners.trainer_command`).
Pod settings (GPU pool, tolerations, priority class, resources, /dev/shm, secrets) come
from `serving/k8s/trainer-pod-template.yaml`, a file the platform team owns, not from code;
`tuneship.runners.render_trainer_pod` fills in image and argv and the result goes to
KubernetesPodOperator as `pod_template_dict`.

Why wrappers: importing KubernetesPodOperator pulls the kubernetes client (seconds), and
DAG files must parse in well under a second. These thin operators keep the DAG's shape at
parse time and build the provider operator only when the task runs; they delegate the
deferral re-entry (`trigger_reentry`) and `on_kill`, so the pod is still deferrable and
still deleted when the task is killed, and they translate the provider's failures (a pod
stuck Pending, a deadline, a failed trainer) into one message that names the pod and says
what to do. tests/unit/test_runners.py drives them through the providers' own code.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

POD_TEMPLATE = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "serving", "k8s", "trainer-pod-template.yaml")
)

#: Pod name stem; KubernetesPodOperator appends a random suffix per pod. A retry finds its
#: predecessor by the labels the provider sets (dag_id, task_id, run_id), not by name.
TRAINER_POD_NAME = "tuneship-trainer"


class TrainerPodError(AirflowException):
    """The trainer pod failed, timed out or never started; the message names it and says why."""


class KubernetesTrainerOperator(BaseOperator):
    """A deferrable GPU pod: fails clearly if Pending past the start-up timeout (no GPU free),
    deletes its pod on kill, and on retry re-attaches instead of starting a twin.

    `execution_timeout` is handed to the provider operator, which turns it into a deadline
    for the trigger: a deferred pod that runs past it gets a `timeout` event and is deleted.
    """

    template_fields: Sequence[str] = ("image", "arguments", "namespace")
    ui_color = "#d6e9f8"

    def __init__(self, *, image: str, arguments: Any, namespace: str | None = None,
                 pod_template_file: str = POD_TEMPLATE, startup_timeout_seconds: int = 900, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image = image
        self.arguments = arguments
        self.namespace = namespace or os.environ.get("TUNESHIP_K8S_NAMESPACE", "tuneship-training")
        self.pod_template_file = pod_template_file
        self.startup_timeout_seconds = startup_timeout_seconds
        self._pod_op = None

    def build(self):
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

        from tuneship.runners import render_trainer_pod

        # The template's `base` container gets the full argv as `command` (no `args`), so the
        # image's default CMD can never be prepended or appended to the trainer's arguments.
        pod = render_trainer_pod(self.pod_template_file, name=TRAINER_POD_NAME, image=self.image,
                                 command=[str(a) for a in self.arguments])
        return KubernetesPodOperator(
            task_id=self.task_id,
            namespace=self.namespace,
            pod_template_dict=pod,
            deferrable=True,
            # Airflow 3.3 name of reattach_on_restart: a retry re-attaches to the pod an earlier
            # try left running (task state store, else the dag_id/task_id/run_id labels).
            durable=True,
            execution_timeout=self.execution_timeout,
            startup_timeout_seconds=self.startup_timeout_seconds,
            schedule_timeout_seconds=self.startup_timeout_seconds,
            on_finish_action="delete_pod",
            on_kill_action="delete_pod",
            get_logs=True,
            log_events_on_failure=True,
            log_pod_spec_on_failure=False,  # the whole pod dump would bury the reason
        )

    def execute(self, context: Any) -> Any:
        self._pod_op = self.build()
        try:
            return self._pod_op.execute(context)
        except Exception as exc:
            clear = self._explain(None, exc)
            if clear is exc:
                raise
            raise clear from exc

    def trigger_reentry(self, context: Any, event: dict[str, Any]) -> Any:
        self._pod_op = self.build()
        try:
            return self._pod_op.trigger_reentry(context, event)
        except Exception as exc:
            clear = self._explain(event, exc)
            if clear is exc:
                raise
            raise clear from exc

    def on_kill(self) -> None:
        if self._pod_op is not None:
            self._pod_op.on_kill()

    # ------------------------------------------------------------------ failure messages

    def _explain(self, event: dict[str, Any] | None, exc: Exception) -> Exception:
        """One message naming the pod, what happened and what to do; `exc` unchanged if unknown."""
        pod = getattr(self._pod_op, "pod", None)
        reentry = event is not None  # without an event (execute) a Pending pod is just new
        event = event or {}
        meta = getattr(pod, "metadata", None)
        name = event.get("name") or getattr(meta, "name", None)
        namespace = event.get("namespace") or getattr(meta, "namespace", None) or self.namespace
        if not name:
            return exc
        ref = f"{namespace}/{name}"
        status = event.get("status")
        message = str(event.get("message") or "")
        pod_status = getattr(pod, "status", None)
        phase = getattr(pod_status, "phase", None)
        finish = getattr(getattr(self._pod_op, "on_finish_action", None), "value", None)
        if pod is None:
            deleted = "the pod no longer exists"
        else:
            deleted = "the pod was deleted" if finish == "delete_pod" else "the pod was kept"
        events_cmd = f"kubectl -n {namespace} get events --field-selector involvedObject.name={name}"

        if status == "timeout" and "execution_timeout" in message:
            return TrainerPodError(
                f"trainer pod {ref} ran past the task's execution_timeout ({self.execution_timeout}); "
                f"{deleted}. The trainer resumes from its last checkpoint, so a retry or a cleared "
                "task continues where it stopped; for longer runs raise execution_timeout of "
                f"{self.task_id} in dags/llm_finetune.py."
            )
        if status == "timeout" or (reentry and phase == "Pending"):
            conditions = getattr(pod_status, "conditions", None) or []
            scheduled = next((c for c in conditions if c.type == "PodScheduled"), None)
            if scheduled is None or scheduled.status != "True":
                why = (scheduled.message if scheduled is not None and scheduled.message
                       else "no node matched its requests")
                return TrainerPodError(
                    f"trainer pod {ref} stayed Pending (unschedulable) for more than "
                    f"{self.startup_timeout_seconds}s: {why}. Most likely no node in the GPU pool "
                    "has a free nvidia.com/gpu (or none matches the pod's node selector, affinity "
                    f"and tolerations). {deleted.capitalize()}. What to do: see `{events_cmd}`; "
                    "free or add GPU nodes in the pool, or check nodeSelector/tolerations in "
                    "serving/k8s/trainer-pod-template.yaml; to queue longer for a GPU raise "
                    "startup_timeout_seconds. The task's retry launches a new pod."
                )
            waiting = [
                f"{s.state.waiting.reason}: {s.state.waiting.message or ''}".strip(": ")
                for s in (getattr(pod_status, "container_statuses", None) or [])
                if s.state is not None and s.state.waiting is not None
            ]
            node = getattr(getattr(pod, "spec", None), "node_name", None) or "a node"
            return TrainerPodError(
                f"trainer pod {ref} was scheduled on {node} but its container did not start within "
                f"{self.startup_timeout_seconds}s ({'; '.join(waiting) or message}); {deleted}. "
                f"What to do: see `{events_cmd}`; check that the image {self.image} exists and the "
                "pull secret, volumes and Secrets of the pod template exist in the namespace."
            )
        code = _exit_code(pod)
        if status == "failed" or phase == "Failed" or code not in (None, 0):
            meaning = {2: "invalid recipe, data or arguments (fix them, a retry will not help)",
                       1: "the training itself failed",
                       143: "stopped by SIGTERM (pod deleted, evicted or preempted) after saving "
                            "a checkpoint; a retry resumes from it"}.get(code, "see the trainer's log above")
            return TrainerPodError(
                f"trainer pod {ref} failed (exit code {code}: {meaning}); {deleted}. "
                "The trainer's own log lines are above in this task's log."
            )
        if status == "error":
            return TrainerPodError(
                f"the trigger watching trainer pod {ref} failed: {message}; {deleted}. "
                "What to do: check the triggerer's access to the Kubernetes API "
                "(kubernetes_default connection, RBAC for pods), then clear the task."
            )
        return exc


def _exit_code(pod: Any) -> int | None:
    for s in getattr(getattr(pod, "status", None), "container_statuses", None) or []:
        if s.name == "base" and s.state is not None and s.state.terminated is not None:
            return s.state.terminated.exit_code
    return None


class DockerTrainerOperator(BaseOperator):
    """The trainer in a Docker container with all GPUs requested and artifacts bind-mounted.

    DockerOperator cannot re-attach to a container, so a try whose worker died leaves its
    container training on. Each container carries labels naming its task instance; before a
    try starts its own, it stops (SIGTERM, `stop_timeout` seconds for the trainer to write a
    checkpoint, then SIGKILL) and removes any container an earlier try of the same task
    instance left, so two trainers never write the same output. The new container resumes
    from that checkpoint. `on_kill` stops with the same grace period.
    """

    template_fields: Sequence[str] = ("image", "arguments")
    ui_color = "#e3f1e0"
    LABEL = "io.tuneship.trainer"  # label keys: io.tuneship.trainer.<dag-id|task-id|...>

    def __init__(self, *, image: str, arguments: Any, artifacts_host_path: str | None = None,
                 stop_timeout: int = 300, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image = image
        self.arguments = arguments
        self.artifacts_host_path = artifacts_host_path or os.environ.get(
            "TUNESHIP_ARTIFACTS_HOST_PATH", "/srv/tuneship/artifacts")
        self.stop_timeout = stop_timeout  # like the pod's terminationGracePeriodSeconds
        self._docker_op = None

    def build(self, container_name: str = "tuneship-trainer", labels: dict[str, str] | None = None):
        from airflow.providers.docker.operators.docker import DockerOperator
        from docker.types import DeviceRequest, Mount

        return DockerOperator(
            task_id=self.task_id,
            image=self.image,
            command=list(self.arguments),
            container_name=container_name,
            labels=labels,
            device_requests=[DeviceRequest(count=-1, capabilities=[["gpu"]])],
            mounts=[Mount(source=self.artifacts_host_path, target="/artifacts", type="bind")],
            shm_size=8 * 1024**3,
            # "force": the container goes whatever the outcome (its log is already in the task log),
            # also when the task is killed, so no try leaves a container behind. ("success" removes
            # on failure too, but without force, so a still-running container would survive.)
            auto_remove="force",
            mount_tmp_dir=False,
            environment={"TUNESHIP_ARTIFACTS": "/artifacts"},
        )

    def _labels(self, ti: Any) -> dict[str, str]:
        ids = {"dag-id": ti.dag_id, "task-id": ti.task_id, "run-id": ti.run_id,
               "map-index": str(getattr(ti, "map_index", -1)), "try": str(ti.try_number)}
        return {f"{self.LABEL}.{k}": str(v) for k, v in ids.items()}

    def _remove_earlier_tries(self, cli: Any, labels: dict[str, str]) -> list[str]:
        """Stop and remove containers of this task instance's earlier tries; their names."""
        same_ti = [f"{k}={v}" for k, v in labels.items() if not k.endswith(".try")]
        removed = []
        for c in cli.containers(all=True, filters={"label": same_ti}):
            name = (c.get("Names") or [c["Id"]])[0].lstrip("/")
            try_no = (c.get("Labels") or {}).get(f"{self.LABEL}.try", "?")
            if c.get("State") == "running":
                self.log.warning(
                    "container %s of try %s is still running (its worker went away); stopping it "
                    "(SIGTERM, %ss to checkpoint) before this try starts", name, try_no, self.stop_timeout)
                cli.stop(c["Id"], timeout=self.stop_timeout)
            cli.remove_container(c["Id"], force=True)
            removed.append(name)
        return removed

    def execute(self, context: Any) -> Any:
        from tuneship.runners import dns1123_name

        ti = context["ti"]
        labels = self._labels(ti)
        self._docker_op = self.build(dns1123_name(f"tuneship-trainer-{ti.run_id}-{ti.try_number}"), labels)
        self._remove_earlier_tries(self._docker_op.cli, labels)
        return self._docker_op.execute(context)

    def on_kill(self) -> None:
        op = self._docker_op
        if op is not None and op.hook.client_created and op.container is not None:
            # DockerOperator.on_kill stops with docker's 10 s default: too short for a checkpoint
            self.log.info("stopping trainer container (SIGTERM, %ss to checkpoint)", self.stop_timeout)
            op.cli.stop(op.container["Id"], timeout=self.stop_timeout)
            op.on_kill()  # removes it (auto_remove="force"); stopping twice is harmless
