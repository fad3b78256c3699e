"""The `docker` and `kubernetes` fine-tune runners: the providers' own operators, built lazily.

Same image, same entrypoint, same arguments as the local runner (`tuneship.runners.trainer_command`).
Pod settings (GPU pool, tolerations, priority class, resources, /dev/shm, secrets) come
from `serving/k8s/trainer-pod-template.yaml`, a file the platform team owns, not from code.

Why wrappers: importing KubernetesPodOperator pulls the kubernetes client (seconds), and
DAG files must parse in well under a second. These thin operators keep the DAG's shape at
parse time and build the provider operator only when the task runs; they delegate the
deferral re-entry (`trigger_reentry`) and `on_kill`, so the pod is still deferrable and
still deleted when the task is killed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

POD_TEMPLATE = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "serving", "k8s", "trainer-pod-template.yaml")
)


class KubernetesTrainerOperator(BaseOperator):
    """A deferrable GPU pod: fails clearly if Pending past the start-up timeout (no GPU free),
    deletes its pod on kill, and on retry re-attaches instead of starting a twin."""

    template_fields: Sequence[str] = ("image", "arguments", "namespace")
    ui_color = "#d6e9f8"

    def __init__(self, *, image: str, arguments: Any, namespace: str | None = None,
                 pod_template_file: str = POD_TEMPLATE, startup_timeout_seconds: int = 900, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image = image
        self.arguments = arguments
        self.namespace = namespace or os.environ.get("TUNESHIP_K8S_NAMESPACE", "ml-training")
        self.pod_template_file = pod_template_file
        self.startup_timeout_seconds = startup_timeout_seconds
        self.deferrable = True
        self.reattach_on_restart = True
        self._pod_op = None

    def build(self):
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

        return KubernetesPodOperator(
            task_id=self.task_id,
            name="tuneship-trainer",
            namespace=self.namespace,
            image=self.image,
            cmds=[],
            arguments=list(self.arguments),
            pod_template_file=self.pod_template_file,
            labels={"app.kubernetes.io/name": "tuneship-trainer", "app.kubernetes.io/part-of": "tuneship"},
            deferrable=self.deferrable,
            reattach_on_restart=self.reattach_on_restart,
            startup_timeout_seconds=self.startup_timeout_seconds,
            on_finish_action="delete_pod",
            get_logs=True,
            log_events_on_failure=True,
        )

    def execute(self, context: Any) -> Any:
        self._pod_op = self.build()
        return self._pod_op.execute(context)

    def trigger_reentry(self, context: Any, event: dict[str, Any]) -> Any:
        self._pod_op = self.build()
        return self._pod_op.trigger_reentry(context, event)

    def on_kill(self) -> None:
        if self._pod_op is not None:
            self._pod_op.on_kill()


class DockerTrainerOperator(BaseOperator):
    """The trainer in a Docker container with all GPUs requested and artifacts bind-mounted."""

    template_fields: Sequence[str] = ("image", "arguments")
    ui_color = "#e3f1e0"

    def __init__(self, *, image: str, arguments: Any, artifacts_host_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image = image
        self.arguments = arguments
        self.artifacts_host_path = artifacts_host_path or os.environ.get(
            "TUNESHIP_ARTIFACTS_HOST_PATH", "/srv/tuneship/artifacts")
        self._docker_op = None

    def build(self, container_name: str = "tuneship-trainer"):
        from airflow.providers.docker.operators.docker import DockerOperator
        from docker.types import DeviceRequest, Mount

        return DockerOperator(
            task_id=self.task_id,
            image=self.image,
            command=list(self.arguments),
            container_name=container_name,
            device_requests=[DeviceRequest(count=-1, capabilities=[["gpu"]])],
            mounts=[Mount(source=self.artifacts_host_path, target="/artifacts", type="bind")],
            shm_size=8 * 1024**3,
            auto_remove="success",
            mount_tmp_dir=False,
            environment={"TUNESHIP_ARTIFACTS": "/artifacts"},
        )

    def execute(self, context: Any) -> Any:
        from tuneship.runners import dns1123_name

        ti = context["ti"]
        self._docker_op = self.build(dns1123_name(f"tuneship-trainer-{ti.run_id}-{ti.try_number}"))
        return self._docker_op.execute(context)

    def on_kill(self) -> None:
        if self._docker_op is not None:
            self._docker_op.on_kill()
