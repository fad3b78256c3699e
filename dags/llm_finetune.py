"""
### llm_finetune

LoRA fine-tune → MLflow registration (`@challenger`) → evaluation gates → compile for Triton.

Fine-tunes one task (`task` Param, else the task named by the triggering event; the task
file `include/tasks/<task>.yaml` gives the base model, recipe, suites and registered model).
Runs when `validated_dataset` (new accepted data) or `retrain_request` (the drift monitor)
is updated, or from the UI form. No trigger is lost: events that arrive close together
collapse into one run (one run at a time), so this run trains one task (the newest event's)
and `fan_out` starts one `llm_finetune` run per OTHER task with an event in it (conf: that
task, its trigger and the event's `dataset_version`; run id `fan_out__<task>__<this run id>`,
so a retry never starts a second one). An event that Airflow 3.3 consumed in no run
(apache/airflow#56050) is taken by the run whose creation left it behind (`which_task` reads
the assets' recent events); each event is claimed by one run, and a run whose events were all
handled already skips. `dataset_version` (Param) trains on that accepted
version; empty: the event's, else the newest. A drift-triggered retrain first validates and
versions any labelled data that landed since the last accepted version, then trains on the
newest. The trainer is one entrypoint (`python -m tuneship.train`)
with the same arguments on every runner: `local` (a worker subprocess, the embedded
default), `docker` (DockerOperator with GPU device requests) or `kubernetes`
(KubernetesPodOperator in deferrable mode from the pod template in `serving/k8s/`).
A retried task reuses its MLflow run and model version; it never registers a second one.
Emits `release_candidate` (extra: registry version, compiled package) when the gates pass; a
candidate that fails them fails the run once (a decision: no retry) with one Slack alert.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, dag, task

from tuneship.tasks import task_names
from tuneship_airflow.assets import release_candidate, retrain_request, validated_dataset
from tuneship_airflow.operators import LocalTrainerOperator
from tuneship_airflow.refusals import fail_on_refusal
from tuneship_airflow.runners import DockerTrainerOperator, KubernetesTrainerOperator

# Rendered as native objects (render_template_as_native_obj): the plan's argv list.
COMMAND = "{{ ti.xcom_pull(task_ids='plan')['command'] }}"


@dag(
    schedule=(validated_dataset | retrain_request),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    doc_md=__doc__,
    tags=["tuneship", "training"],
    default_args={"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(seconds=30)},
    params={
        "task": Param(None, type=["null", "string"], enum=[None, *task_names()], title="Task",
                      description="include/tasks/<task>.yaml. Empty: the triggering event's task, else the default."),
        "dataset_version": Param(None, type=["null", "string"], title="Dataset version",
                                 description="An accepted version id of the task's data (llm_data_validation). "
                                             "Empty: the triggering event's, else the newest."),
        "base_model": Param(None, type=["null", "string"], title="Base model",
                            description="HF model id, local path or packaged model name. Empty: the task's."),
        "recipe": Param(None, type=["null", "string"], title="Recipe",
                        description="A recipe under include/tuneship/train/recipes (name) or a YAML path. "
                        "The fields below override it; leave them empty to keep the recipe's value."),
        "lora_r": Param(None, type=["null", "integer"], minimum=1, maximum=256, title="LoRA rank",
                        description="Adapter rank r (capacity of the update). Empty: the recipe's."),
        "lora_alpha": Param(None, type=["null", "integer"], minimum=1, maximum=512, title="LoRA alpha",
                            description="LoRA scaling alpha (update scale = alpha / r). Empty: the recipe's."),
        "epochs": Param(None, type=["null", "integer"], minimum=1, maximum=100, title="Epochs",
                        description="Passes over the training split. Empty: the recipe's."),
        "max_steps": Param(None, type=["null", "integer"], minimum=1, maximum=100000, title="Max steps",
                           description="Optimizer steps; wins over epochs. Empty: the recipe's (or epochs, if given)."),
        "learning_rate": Param(None, type=["null", "number"], exclusiveMinimum=0, maximum=1, title="Learning rate",
                               description="Peak learning rate of the schedule. Empty: the recipe's."),
        "runner": Param("local", type="string", enum=["local", "docker", "kubernetes"], title="Runner",
                        description="Where the trainer runs: worker subprocess, Docker GPU container, or K8s GPU pod."),
        "trainer_image": Param("ghcr.io/tuneship/trainer:0.1.0", type="string", title="Trainer image",
                               description="Image for the docker and kubernetes runners (serving/docker/Dockerfile.trainer)."),
    },
)
def llm_finetune():
    @task(inlets=[validated_dataset, retrain_request])  # inlets: to read recent events (strays)
    def which_task(params=None, run_id=None, dag_run=None, triggering_asset_events=None, inlet_events=None):
        """The task this run trains and the runs to start for the other tasks' events."""
        from tuneship.stages import finetune_trigger
        from tuneship_airflow.assets import recent_events, skip_if_handled

        chosen = finetune_trigger(params["task"], triggering_asset_events, run_id=run_id,
                                  dataset_version=params["dataset_version"],
                                  trigger=(dag_run.conf or {}).get("trigger"),
                                  recent_events=recent_events(dag_run, inlet_events, validated_dataset, retrain_request))
        skip_if_handled(chosen, "nothing to train: every event of this run was handled by an earlier run")
        print(f"training task {chosen['task']} ({chosen['trigger']}); fanning out: "
              f"{[f['conf'] for f in chosen['fan_out']] or 'nothing'}")
        return chosen

    @task
    def other_tasks(chosen: dict) -> list[dict]:
        """fan_out's kwargs, one per other task: `trigger_run_id` and `conf`."""
        return chosen["fan_out"]

    # One run per other task in the events; an existing run id (a retry) is skipped, not doubled.
    fan_out = TriggerDagRunOperator.partial(
        task_id="fan_out", trigger_dag_id="llm_finetune", skip_when_already_exists=True,
    )

    @task
    @fail_on_refusal  # a retrain's landed batch can be rejected by validation; an unknown dataset_version
    def plan(chosen: dict, params=None, run_id=None):
        from tuneship.stages import finetune_dataset, finetune_plan
        from tuneship.tasks import load_task

        task = load_task(chosen["task"])
        dataset = finetune_dataset(task, chosen, run_id=run_id)
        return finetune_plan(task, dataset=dataset, params=dict(params), run_key=run_id, trigger=chosen["trigger"])

    @task.branch
    def choose_runner(p: dict):
        return f"train_{p['runner']}"

    train_local = LocalTrainerOperator(
        task_id="train_local",
        arguments=COMMAND,
        output_dir="{{ ti.xcom_pull(task_ids='plan')['output_dir'] }}",
        execution_timeout=timedelta(hours=2),
    )

    train_docker = DockerTrainerOperator(task_id="train_docker", arguments=COMMAND, image="{{ params.trainer_image }}",
                                         execution_timeout=timedelta(hours=12))
    train_kubernetes = KubernetesTrainerOperator(task_id="train_kubernetes", arguments=COMMAND,
                                                 image="{{ params.trainer_image }}",
                                                 execution_timeout=timedelta(hours=12))

    @task(trigger_rule="none_failed_min_one_success")
    def register(p: dict):
        from tuneship.stages import register_training

        return register_training(p)

    @task
    @fail_on_refusal
    def evaluate(candidate: dict, p: dict):
        from tuneship.stages import evaluate_candidate
        from tuneship.tasks import load_task

        return evaluate_candidate(load_task(p["task"]), candidate, p["dataset"])

    @task(outlets=[release_candidate])
    @fail_on_refusal  # a quantized build that fails the task's gates against the unquantized candidate
    def compile_model(candidate: dict, gates: dict, p: dict, outlet_events=None):
        from tuneship.stages import compile_candidate
        from tuneship.tasks import load_task

        compiled = compile_candidate(load_task(p["task"]), candidate, gates, p["dataset"])
        outlet_events[release_candidate].extra = {
            "task": p["task"],
            "version": candidate["version"],
            "package": compiled["package"],
            "gates": gates["metrics"],
        }
        return compiled

    chosen = which_task()
    fan_out.expand_kwargs(other_tasks(chosen))
    p = plan(chosen)
    branch = choose_runner(p)
    trained = [train_local, train_docker, train_kubernetes]
    branch >> trained
    candidate = register(p)
    trained >> candidate
    gates = evaluate(candidate, p)
    compile_model(candidate, gates, p)


llm_finetune()
