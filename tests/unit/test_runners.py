"""The `kubernetes` and `docker` runners driven through the providers' own code paths.

No cluster and no Docker engine here, so the fakes sit at the client boundary only:
`KubernetesHook.core_v1_client` (sync CoreV1Api calls of KubernetesPodOperator and PodManager),
`KubernetesPodTrigger.hook` (the AsyncKubernetesHook the trigger polls) and docker-py's
`APIClient` (what DockerHook constructs). Everything above them is the real
KubernetesPodOperator / KubernetesPodTrigger / DockerOperator code and our lazy wrappers:
pod building from the template, labels, find/reattach, deferral, the trigger's start-up
timeout, re-entry, cleanup and on_kill.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from types import SimpleNamespace
from typing import Any

import pendulum
import pytest
from kubernetes.client import ApiClient
from kubernetes.client import models as k8s
from kubernetes.client.exceptions import ApiException

from tuneship.runners import trainer_command
from tuneship_airflow.runners import (
    DockerTrainerOperator,
    KubernetesTrainerOperator,
    TrainerPodError,
)

RUN_ID = "manual__2026-11-22T10:00:00+00:00"
DAG_ID, TASK_ID = "llm_finetune", "train_kubernetes"
NAMESPACE = "tuneship-training"  # the template's, where its Secrets are created
IMAGE = "registry.example.com/tuneship/trainer:0.1.0"
ARGV = trainer_command("recipes/tiny-lora.yaml", "/artifacts/datasets/v1", "base", "/artifacts/runs/r1",
                       {"lora.r": 8})
NO_GPU = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available."


# --------------------------------------------------------------------------- a fake cluster


def _matches(labels: dict[str, str], selector: str) -> bool:
    """Kubernetes equality-based label selector (k=v, k!=v, !k, k)."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.split("=", 1)
            if labels.get(k) != v:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class FakeCoreV1:
    """The CoreV1Api calls KubernetesPodOperator makes, over an in-memory namespace.

    `linger=True` keeps deleted pods listed (Terminating, with a deletionTimestamp) as a real
    API server does for a while, so the label logic must exclude them by itself.
    """

    def __init__(self, linger: bool = False) -> None:
        from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator

        self._to_pod = PodGenerator.deserialize_model_dict
        self.api_client = ApiClient()  # only sanitize_for_serialization (pure) is used
        self.linger = linger
        self.pods: dict[str, k8s.V1Pod] = {}
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.patched: list[tuple[str, dict]] = []
        self.log_lines = [b"step 1/2 loss 1.2000 tok/s 900 eta 1s\n"]

    # pods
    def create_namespaced_pod(self, body: dict, namespace: str, **_: Any) -> k8s.V1Pod:
        pod = self._to_pod(body)
        name = pod.metadata.name
        if name in self.pods:
            raise ApiException(status=409, reason="AlreadyExists")
        pod.metadata.namespace = namespace
        pod.metadata.creation_timestamp = dt.datetime.now(dt.UTC)
        pod.status = k8s.V1PodStatus(phase="Pending")
        self.pods[name] = pod
        self.created.append(name)
        return pod

    def list_namespaced_pod(self, namespace: str, label_selector: str = "", **_: Any) -> k8s.V1PodList:
        items = [p for p in self.pods.values()
                 if p.metadata.namespace == namespace and _matches(p.metadata.labels or {}, label_selector)]
        return k8s.V1PodList(items=items)

    def read_namespaced_pod(self, name: str, namespace: str, **_: Any) -> k8s.V1Pod:
        pod = self.pods.get(name)
        if pod is None or pod.metadata.namespace != namespace:
            raise ApiException(status=404, reason="Not Found")
        return pod

    def delete_namespaced_pod(self, name: str, namespace: str, body: Any = None, **_: Any) -> None:
        pod = self.read_namespaced_pod(name, namespace)
        self.deleted.append(name)
        if self.linger:
            pod.metadata.deletion_timestamp = dt.datetime.now(dt.UTC)
        else:
            del self.pods[name]

    def patch_namespaced_pod(self, name: str, namespace: str, body: dict, **_: Any) -> k8s.V1Pod:
        pod = self.read_namespaced_pod(name, namespace)
        pod.metadata.labels.update(body["metadata"]["labels"])
        self.patched.append((name, dict(body["metadata"]["labels"])))
        return pod

    # logs and events
    def read_namespaced_pod_log(self, name: str, namespace: str, **_: Any):
        self.read_namespaced_pod(name, namespace)
        return iter(list(self.log_lines))

    def list_namespaced_event(self, namespace: str, field_selector: str = "", **_: Any) -> k8s.CoreV1EventList:
        name = field_selector.split("=", 1)[-1]
        return k8s.CoreV1EventList(items=self.events(name), metadata=k8s.V1ListMeta(resource_version="1"))

    def events(self, name: str) -> list[k8s.CoreV1Event]:
        pod = self.pods.get(name)
        cond = _scheduled_condition(pod)
        if cond is None or cond.status == "True":
            return []
        return [k8s.CoreV1Event(
            metadata=k8s.V1ObjectMeta(name=f"{name}.1", uid=f"{name}-ev1", resource_version="1"),
            involved_object=k8s.V1ObjectReference(kind="Pod", name=name, namespace=NAMESPACE),
            type="Warning", reason="FailedScheduling", message=cond.message)]

    # the cluster's side: what the scheduler and kubelet would do
    def live(self) -> list[str]:
        return [n for n, p in self.pods.items() if p.metadata.deletion_timestamp is None]

    def set_unschedulable(self, name: str) -> None:
        self.pods[name].status = k8s.V1PodStatus(phase="Pending", conditions=[k8s.V1PodCondition(
            type="PodScheduled", status="False", reason="Unschedulable", message=NO_GPU)])

    def set_running(self, name: str) -> None:
        self._set(name, "Running", k8s.V1ContainerState(
            running=k8s.V1ContainerStateRunning(started_at=dt.datetime.now(dt.UTC))))

    def set_terminated(self, name: str, exit_code: int) -> None:
        self._set(name, "Succeeded" if exit_code == 0 else "Failed", k8s.V1ContainerState(
            terminated=k8s.V1ContainerStateTerminated(exit_code=exit_code, reason="Error" if exit_code else "Completed")))

    def _set(self, name: str, phase: str, state: k8s.V1ContainerState) -> None:
        pod = self.pods[name]
        pod.spec.node_name = "gpu-node-1"
        pod.status = k8s.V1PodStatus(
            phase=phase,
            conditions=[k8s.V1PodCondition(type="PodScheduled", status="True")],
            container_statuses=[k8s.V1ContainerStatus(
                name="base", image=IMAGE, image_id="", ready=phase == "Running", restart_count=0, state=state)])


def _scheduled_condition(pod: k8s.V1Pod | None) -> k8s.V1PodCondition | None:
    conds = (pod.status.conditions if pod is not None and pod.status else None) or []
    return next((c for c in conds if c.type == "PodScheduled"), None)


class FakeAsyncHook:
    """The AsyncKubernetesHook methods KubernetesPodTrigger/AsyncPodManager call, on the same cluster."""

    def __init__(self, core: FakeCoreV1) -> None:
        self.core = core
        self.deleted: list[tuple[str, str, int | None]] = []

    async def get_pod(self, name: str, namespace: str) -> k8s.V1Pod:
        return self.core.read_namespaced_pod(name, namespace)

    async def get_pod_events(self, name: str, namespace: str, resource_version: str | None = None):
        return self.core.list_namespaced_event(namespace, f"involvedObject.name={name}")

    async def watch_pod_events(self, name: str, namespace: str, resource_version: str | None = None,
                               timeout_seconds: float = 30):
        for event in self.core.events(name):
            yield event
        await asyncio.sleep(min(timeout_seconds, 0.05))  # a watch window with nothing new

    async def delete_pod(self, name: str, namespace: str, grace_period_seconds: int | None = None) -> None:
        self.deleted.append((namespace, name, grace_period_seconds))
        self.core.delete_namespaced_pod(name, namespace)


class FakeTI:
    def __init__(self, try_number: int = 1, task_id: str = TASK_ID) -> None:
        self.dag_id, self.task_id, self.run_id = DAG_ID, task_id, RUN_ID
        self.try_number, self.map_index = try_number, -1
        self.start_date = pendulum.now("UTC")
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


class FakeTaskStateStore(dict):
    """Airflow 3.3's `task_state_store`: one per task instance, kept across its tries."""

    def set(self, key: str, value: Any) -> None:
        self[key] = value


def _context(ti: FakeTI, store: FakeTaskStateStore | None = None) -> dict[str, Any]:
    ctx: dict[str, Any] = {"ti": ti, "run_id": RUN_ID, "dag": SimpleNamespace(dag_id=DAG_ID)}
    if store is not None:
        ctx["task_state_store"] = store
    return ctx


@pytest.fixture()
def cluster(monkeypatch) -> FakeCoreV1:
    """Route every KubernetesHook the provider builds to one fake CoreV1Api."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    core = FakeCoreV1()
    monkeypatch.setattr(KubernetesHook, "core_v1_client", property(lambda self: core))
    monkeypatch.setattr(KubernetesHook, "is_in_cluster", property(lambda self: False))
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", '{"conn_type": "kubernetes"}')
    monkeypatch.delenv("TUNESHIP_K8S_NAMESPACE", raising=False)
    return core


def _op(**kwargs: Any) -> KubernetesTrainerOperator:
    kwargs.setdefault("execution_timeout", dt.timedelta(hours=12))
    return KubernetesTrainerOperator(task_id=TASK_ID, image=IMAGE, arguments=ARGV, **kwargs)


def _defer(op: KubernetesTrainerOperator, ctx: dict[str, Any]):
    from airflow.sdk.exceptions import TaskDeferred

    with pytest.raises(TaskDeferred) as d:
        op.execute(ctx)
    return d.value


def _trigger_from(deferred, core: FakeCoreV1, **overrides: Any):
    """What the triggerer does: rebuild the trigger from its serialized form (with test timings)."""
    from airflow.providers.cncf.kubernetes.triggers.pod import KubernetesPodTrigger

    classpath, kwargs = deferred.trigger.serialize()
    assert classpath.endswith("KubernetesPodTrigger")
    for key, value in overrides.items():
        if key == "_execution_deadline":
            kwargs["trigger_kwargs"] = {**kwargs["trigger_kwargs"], key: value}
        else:
            kwargs[key] = value
    trigger = KubernetesPodTrigger(**kwargs)
    trigger.hook = FakeAsyncHook(core)  # the async client boundary
    return trigger


def _first_event(trigger) -> dict[str, Any]:
    async def first():
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    return asyncio.run(asyncio.wait_for(first(), timeout=30))


# --------------------------------------------------------------------------- the pod it submits


def test_pod_runs_exactly_the_trainer_argv_from_the_template(cluster):
    _defer(_op(), _context(FakeTI()))
    [name] = cluster.created
    pod = cluster.pods[name]
    base = next(c for c in pod.spec.containers if c.name == "base")
    # the full argv as the container command and nothing after it: the template's `--help`
    # placeholder and the image CMD can never leak into the trainer's arguments
    assert base.command == ARGV and not base.args
    assert base.image == IMAGE
    assert base.resources.limits["nvidia.com/gpu"] == "1"
    assert pod.spec.priority_class_name == "tuneship-training"
    assert pod.spec.node_selector == {"tuneship.io/node-pool": "gpu-train"}
    assert name.startswith("tuneship-trainer-") and pod.metadata.namespace == NAMESPACE
    labels = pod.metadata.labels
    assert labels["dag_id"] == DAG_ID and labels["task_id"] == TASK_ID and labels["try_number"] == "1"
    assert labels["app.kubernetes.io/part-of"] == "tuneship"


# --------------------------------------------------------------------------- (a) execution_timeout


def test_execution_timeout_from_the_dag_becomes_the_triggers_deadline(cluster):
    from tuneship_airflow import runners

    dag_task = _finetune_dag().get_task(TASK_ID)
    assert isinstance(dag_task, runners.KubernetesTrainerOperator)
    assert dag_task.execution_timeout == dt.timedelta(hours=12)

    ti = FakeTI()
    op = _op(execution_timeout=dag_task.execution_timeout)
    deferred = _defer(op, _context(ti))
    assert deferred.method_name == "trigger_reentry"
    deadline = deferred.trigger.trigger_kwargs["_execution_deadline"]
    assert deadline == int(ti.start_date.timestamp() + 12 * 3600)
    # the framework's defer timeout sits after the deadline, so the trigger's own `timeout`
    # event (which deletes the pod) wins over the framework failing the task around it
    assert deferred.timeout > dt.timedelta(hours=12) - dt.timedelta(minutes=1)
    assert deferred.trigger.pod_name == cluster.created[0]


def test_pod_running_past_execution_timeout_fails_clearly_and_is_deleted(cluster):
    op = _op()
    deferred = _defer(op, _context(FakeTI()))
    [name] = cluster.created
    cluster.set_running(name)
    trigger = _trigger_from(deferred, cluster, _execution_deadline=int(pendulum.now("UTC").timestamp()) - 1)
    event = _first_event(trigger)
    assert event["status"] == "timeout" and "execution_timeout" in event["message"]

    with pytest.raises(TrainerPodError) as e:
        _op().trigger_reentry(_context(FakeTI()), event)
    msg = str(e.value)
    assert f"{NAMESPACE}/{name}" in msg and "execution_timeout (12:00:00)" in msg
    assert "resumes from its last checkpoint" in msg and "the pod was deleted" in msg
    assert cluster.deleted == [name] and cluster.live() == []


# --------------------------------------------------------------------------- (b) Pending: no GPU free


def test_pod_pending_past_startup_timeout_fails_naming_pod_reason_and_fix(cluster):
    op = _op(startup_timeout_seconds=1)
    deferred = _defer(op, _context(FakeTI()))
    [name] = cluster.created
    cluster.set_unschedulable(name)

    # the provider's trigger, polling the fake cluster, gives up after the start-up timeout
    trigger = _trigger_from(deferred, cluster, startup_check_interval=0.05)
    assert trigger.schedule_timeout == 1 and trigger.startup_timeout == 1
    event = _first_event(trigger)
    assert event["status"] == "timeout" and event["name"] == name

    with pytest.raises(TrainerPodError) as e:
        _op(startup_timeout_seconds=1).trigger_reentry(_context(FakeTI()), event)
    msg = str(e.value)
    assert f"trainer pod {NAMESPACE}/{name} stayed Pending (unschedulable) for more than 1s" in msg
    assert "Insufficient nvidia.com/gpu" in msg and "GPU pool" in msg
    assert "What to do" in msg and f"kubectl -n {NAMESPACE} get events" in msg
    assert "startup_timeout_seconds" in msg and "trainer-pod-template.yaml" in msg
    # the provider's own error is kept as the cause (its text alone names neither pod state nor GPU)
    assert e.value.__cause__ is not None and "Pending" not in str(e.value.__cause__)
    # cleaned up: marked as handled (a retry will not reattach to it) and deleted
    assert (name, {"already_checked": "True"}) in cluster.patched
    assert cluster.deleted == [name] and cluster.live() == []


def test_pod_scheduled_but_never_started_says_so(cluster):
    deferred = _defer(_op(startup_timeout_seconds=1), _context(FakeTI()))
    [name] = cluster.created
    cluster._set(name, "Pending", k8s.V1ContainerState(waiting=k8s.V1ContainerStateWaiting(
        reason="ContainerCreating", message="pulling image")))
    event = _first_event(_trigger_from(deferred, cluster, startup_check_interval=0.05))
    assert event["status"] == "timeout"

    with pytest.raises(TrainerPodError) as e:
        _op(startup_timeout_seconds=1).trigger_reentry(_context(FakeTI()), event)
    msg = str(e.value)
    assert f"{NAMESPACE}/{name} was scheduled on gpu-node-1" in msg and "ContainerCreating" in msg
    assert IMAGE in msg and "unschedulable" not in msg
    assert cluster.deleted == [name]


# --------------------------------------------------------------------------- (c) on_kill


def test_kill_while_deferred_deletes_the_pod_through_the_trigger(cluster):
    deferred = _defer(_op(), _context(FakeTI()))
    [name] = cluster.created
    trigger = _trigger_from(deferred, cluster)
    assert trigger.on_kill_action.value == "delete_pod"
    asyncio.run(trigger.on_kill())  # what the 3.3 triggerer calls when a user kills the task
    assert trigger.hook.deleted == [(NAMESPACE, name, None)]
    assert cluster.live() == []


def test_kill_on_the_worker_deletes_the_pod(cluster):
    op = _op()
    op.on_kill()  # nothing launched yet: nothing to delete, no error
    assert cluster.deleted == []
    _defer(op, _context(FakeTI()))
    [name] = cluster.created
    op.on_kill()  # the task runner's SIGTERM / execution_timeout path calls this
    assert cluster.deleted == [name] and cluster.live() == []


# --------------------------------------------------------------------------- (d) retries


@pytest.mark.parametrize("state_store", [True, False], ids=["task-state-store", "labels-only"])
def test_retry_reattaches_to_the_running_pod_instead_of_starting_a_twin(cluster, state_store):
    store = FakeTaskStateStore() if state_store else None
    first = _defer(_op(), _context(FakeTI(try_number=1), store))
    [name] = cluster.created
    cluster.set_running(name)
    if store is not None:
        assert store["pod_identifier"] == {"name": name, "namespace": NAMESPACE}

    # the worker died; Airflow retries the task: a fresh operator, try 2, same DAG run
    ti2 = FakeTI(try_number=2)
    second = _defer(_op(), _context(ti2, store))
    assert cluster.created == [name], "a second pod was started for the same task"
    assert second.trigger.pod_name == first.trigger.pod_name == name
    assert ti2.xcom["pod_name"] == name and cluster.deleted == []


def test_retry_after_a_failed_pod_starts_exactly_one_new_pod(cluster):
    cluster.linger = True  # the deleted pod stays listed (Terminating) for a while
    store = FakeTaskStateStore()
    first = _defer(_op(), _context(FakeTI(try_number=1), store))
    [old] = cluster.created
    cluster.set_terminated(old, exit_code=1)
    event = _first_event(_trigger_from(first, cluster))
    assert event["status"] == "failed"
    with pytest.raises(TrainerPodError, match=rf"{old} failed \(exit code 1: the training itself failed\)"):
        _op().trigger_reentry(_context(FakeTI(try_number=1), store), event)
    assert cluster.deleted == [old] and cluster.pods[old].metadata.labels["already_checked"] == "True"

    second = _defer(_op(), _context(FakeTI(try_number=2), store))
    assert len(cluster.created) == 2 and cluster.created[0] == old
    new = cluster.created[1]
    assert second.trigger.pod_name == new != old
    assert cluster.pods[new].metadata.labels["try_number"] == "2"
    assert cluster.live() == [new]


def test_retry_after_worker_loss_deletes_the_finished_orphan_before_starting_anew(cluster):
    _defer(_op(), _context(FakeTI(try_number=1)))
    [old] = cluster.created
    cluster.set_terminated(old, exit_code=137)  # e.g. OOM-killed while nobody watched it
    second = _defer(_op(), _context(FakeTI(try_number=2)))
    assert old in cluster.deleted
    assert len(cluster.created) == 2 and cluster.live() == [cluster.created[1]]
    assert second.trigger.pod_name == cluster.created[1]


def test_two_matching_pods_fail_instead_of_guessing(cluster):
    _defer(_op(), _context(FakeTI(try_number=1)))
    twin = cluster.pods[cluster.created[0]]
    clone = ApiClient().sanitize_for_serialization(twin)
    clone["metadata"]["name"] = "tuneship-trainer-twin0000"
    cluster.create_namespaced_pod(clone, NAMESPACE)
    from airflow.providers.cncf.kubernetes.operators.pod import FoundMoreThanOnePodFailure

    with pytest.raises(FoundMoreThanOnePodFailure):
        _op().execute(_context(FakeTI(try_number=2)))
    assert len(cluster.created) == 2  # no third pod


# --------------------------------------------------------------------------- (e) deferred re-entry


def test_trigger_error_while_pod_runs_redefers_on_the_same_pod(cluster):
    from airflow.sdk.exceptions import TaskDeferred

    _defer(_op(), _context(FakeTI()))
    [name] = cluster.created
    cluster.set_running(name)
    event = {"status": "error", "name": name, "namespace": NAMESPACE, "message": "connection reset"}
    with pytest.raises(TaskDeferred) as d:
        _op().trigger_reentry(_context(FakeTI()), event)
    assert d.value.trigger.pod_name == name
    assert d.value.trigger.trigger_kwargs["_redefer_count"] == 1
    assert "_execution_deadline" in d.value.trigger.trigger_kwargs
    assert cluster.created == [name] and cluster.deleted == []


def test_trigger_error_on_a_finished_pod_fails_clearly_and_deletes_it(cluster):
    _defer(_op(), _context(FakeTI()))
    [name] = cluster.created
    cluster.set_terminated(name, exit_code=2)
    event = {"status": "error", "name": name, "namespace": NAMESPACE,
             "message": "Kubernetes API permission error: forbidden"}
    with pytest.raises(TrainerPodError) as e:
        _op().trigger_reentry(_context(FakeTI()), event)
    msg = str(e.value)
    assert f"trainer pod {NAMESPACE}/{name} failed (exit code 2: invalid recipe, data or arguments" in msg
    assert cluster.deleted == [name]


def test_trigger_error_for_a_vanished_pod_names_the_pod_and_the_fix(cluster):
    _defer(_op(), _context(FakeTI()))
    [name] = cluster.created
    cluster.delete_namespaced_pod(name, NAMESPACE)  # preempted / garbage-collected meanwhile
    event = {"status": "error", "name": name, "namespace": NAMESPACE,
             "message": "Kubernetes API permission error: forbidden"}
    with pytest.raises(TrainerPodError) as e:
        _op().trigger_reentry(_context(FakeTI()), event)
    msg = str(e.value)
    assert f"the trigger watching trainer pod {NAMESPACE}/{name} failed" in msg
    assert "permission error" in msg and "the pod no longer exists" in msg and "RBAC" in msg
    assert "not found after resuming" in str(e.value.__cause__)  # the provider's own finding


def test_success_event_returns_and_deletes_the_pod(cluster):
    _defer(_op(), _context(FakeTI()))
    [name] = cluster.created
    cluster.set_terminated(name, exit_code=0)
    event = {"status": "success", "name": name, "namespace": NAMESPACE}
    assert _op().trigger_reentry(_context(FakeTI()), event) is None
    assert cluster.deleted == [name] and cluster.patched == []


# --------------------------------------------------------------------------- the DAG


_DAG: list[Any] = []


def _finetune_dag():
    if not _DAG:
        import os

        from airflow.dag_processing.dagbag import DagBag

        from tuneship.services import airflow_env

        for key, value in airflow_env().items():
            if key.startswith("AIRFLOW"):
                os.environ.setdefault(key, value)
        repo = __import__("pathlib").Path(__file__).resolve().parents[2]
        bag = DagBag(dag_folder=str(repo / "dags" / "llm_finetune.py"))
        assert not bag.import_errors, bag.import_errors
        _DAG.append(bag.dags[DAG_ID])
    return _DAG[0]


# --------------------------------------------------------------------------- docker


class FakeDockerAPI:
    """docker-py's APIClient as DockerHook/DockerOperator use it, against no engine.

    `engine` is the daemon's container table, shared by every client (one per operator)."""

    last: FakeDockerAPI | None = None
    exit_code = 0  # what the container's process exits with
    during_wait: Any = None  # called while the operator waits on the container
    engine: dict[str, dict[str, Any]] = {}

    def __init__(self, base_url: str | None = None, version: str | None = None, tls: Any = None,
                 timeout: int | None = None) -> None:
        self.calls: list[tuple] = []
        FakeDockerAPI.last = self

    def ping(self) -> bool:
        return True

    def images(self, name: str):
        return [{"Id": "sha256:trainer"}]

    def create_host_config(self, **kwargs: Any) -> dict[str, Any]:
        return kwargs

    def create_container(self, **kwargs: Any) -> dict[str, str]:
        self.calls.append(("create", kwargs))
        if any(c["Names"] == ["/" + kwargs["name"]] for c in self.engine.values()):
            raise RuntimeError(f"409 Conflict: the container name {kwargs['name']} is already in use")
        cid = "c0ffee" if not self.engine else f"c0ffee{len(self.engine)}"
        self.engine[cid] = {"Id": cid, "Names": ["/" + kwargs["name"]],
                            "Labels": dict(kwargs.get("labels") or {}), "State": "created"}
        return {"Id": cid}

    def containers(self, all: bool = False, filters: dict[str, Any] | None = None):
        self.calls.append(("list", filters))
        wanted = [tuple(f.split("=", 1)) for f in (filters or {}).get("label", [])]
        return [dict(c) for c in self.engine.values()
                if (all or c["State"] == "running") and all_labels(c, wanted)]

    def attach(self, container: str, **_: Any):
        return iter([b"step 1/1 loss 0.1000 tok/s 900 eta 0s\n"])

    def start(self, container: str) -> None:
        self.calls.append(("start", container))
        self.engine[container]["State"] = "running"

    def wait(self, container: str) -> dict[str, int]:
        if FakeDockerAPI.during_wait:
            FakeDockerAPI.during_wait()
        if container in self.engine:
            self.engine[container]["State"] = "exited"
        return {"StatusCode": FakeDockerAPI.exit_code}

    def stop(self, container: str, timeout: int | None = None) -> None:
        self.calls.append(("stop", container, timeout))
        if container in self.engine:
            self.engine[container]["State"] = "exited"

    def remove_container(self, container: str, force: bool = False) -> None:
        self.calls.append(("remove", container, force))
        self.engine.pop(container, None)

    def created(self) -> dict[str, Any]:
        return next(c[1] for c in self.calls if c[0] == "create")


def all_labels(container: dict[str, Any], wanted: list[tuple[str, ...]]) -> bool:
    return all(container["Labels"].get(k) == v for k, v in wanted)


@pytest.fixture()
def docker_api(monkeypatch):
    import airflow.providers.docker.hooks.docker as docker_hook

    monkeypatch.setattr(docker_hook, "APIClient", FakeDockerAPI)
    monkeypatch.setenv("DOCKER_HOST", "unix:///var/run/docker.sock")
    monkeypatch.setattr(FakeDockerAPI, "exit_code", 0)
    monkeypatch.setattr(FakeDockerAPI, "during_wait", None)
    monkeypatch.setattr(FakeDockerAPI, "last", None)
    monkeypatch.setattr(FakeDockerAPI, "engine", {})
    return FakeDockerAPI


def _run_docker(op: DockerTrainerOperator, try_number: int = 1) -> Any:
    return op.execute({"ti": FakeTI(try_number=try_number, task_id="train_docker")})


def _docker_op() -> DockerTrainerOperator:
    return DockerTrainerOperator(task_id="train_docker", image=IMAGE, arguments=ARGV,
                                 artifacts_host_path="/srv/tuneship/artifacts")


def test_docker_success_runs_the_argv_on_all_gpus_and_removes_the_container(docker_api):
    _run_docker(_docker_op())
    api = docker_api.last
    kw = api.created()
    assert kw["command"] == ARGV and kw["image"] == IMAGE
    assert kw["name"].startswith("tuneship-trainer-manual-2026-11-22t10-00-00-00-00-1")
    host = kw["host_config"]
    assert host["device_requests"][0]["Count"] == -1
    assert host["device_requests"][0]["Capabilities"] == [["gpu"]]
    assert host["shm_size"] == 8 * 1024**3
    assert ("remove", "c0ffee", True) in api.calls


def test_docker_failure_fails_the_task_leaves_no_container_and_the_retry_does_not_clash(docker_api):
    from airflow.providers.docker.exceptions import DockerContainerFailedException

    docker_api.exit_code = 2
    with pytest.raises(DockerContainerFailedException, match="'StatusCode': 2"):
        _run_docker(_docker_op(), try_number=1)
    first = docker_api.last
    assert ("remove", "c0ffee", True) in first.calls

    docker_api.exit_code = 0
    _run_docker(_docker_op(), try_number=2)
    assert docker_api.last.created()["name"] != first.created()["name"]


def test_docker_kill_stops_and_removes_the_container(docker_api):
    from airflow.providers.docker.exceptions import DockerContainerFailedException

    op = _docker_op()
    op.on_kill()  # before anything started: no client, nothing to stop, no error
    # SIGTERM arrives while the operator waits on the container; `docker stop` -> exit 137
    docker_api.during_wait = op.on_kill
    docker_api.exit_code = 137
    with pytest.raises(DockerContainerFailedException):
        _run_docker(op)
    calls = docker_api.last.calls
    # the trainer gets the grace period to checkpoint on SIGTERM, not docker's 10 s default
    assert ("stop", "c0ffee", 300) in calls
    assert calls.index(("stop", "c0ffee", 300)) < calls.index(("remove", "c0ffee", True))
    assert docker_api.engine == {}


def test_docker_retry_stops_the_container_a_dead_worker_left_running(docker_api):
    """Try 1's worker died mid-training: its container is still running. Try 2 stops it
    (SIGTERM with the checkpoint grace period) and removes it before starting its own, and
    never touches containers of other task instances."""
    docker_api.engine.update({
        "orphan": {"Id": "orphan", "Names": ["/tuneship-trainer-old-1"], "State": "running",
                   "Labels": _docker_op()._labels(FakeTI(try_number=1, task_id="train_docker"))},
        "other-run": {"Id": "other-run", "Names": ["/tuneship-trainer-other-1"], "State": "running",
                      "Labels": {**_docker_op()._labels(FakeTI(try_number=1, task_id="train_docker")),
                                 "io.tuneship.trainer.run-id": "scheduled__2026-11-21"}},
    })
    _run_docker(_docker_op(), try_number=2)
    calls = docker_api.last.calls
    assert ("stop", "orphan", 300) in calls and ("remove", "orphan", True) in calls
    assert calls.index(("remove", "orphan", True)) < next(i for i, c in enumerate(calls) if c[0] == "start")
    assert set(docker_api.engine) == {"other-run"}  # try 2's own container was removed after it ran
    labels = docker_api.last.created()["labels"]
    assert labels["io.tuneship.trainer.try"] == "2"
    assert labels["io.tuneship.trainer.run-id"] == RUN_ID
