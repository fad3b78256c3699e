"""
### llm_batch_inference

A task's champion, as compiled for serving, over a file of prompts: bulk re-labelling or
summarisation, nightly or from the UI form (`tuneship.batch`).

Nightly (no `task`): every task with a champion and a dataset version answers its newest
version's eval split; a night with nothing new finds every chunk written and runs nothing.
From the form: one task, a `version` (empty: its champion), and either `input_uri` (a JSONL
file of `prompt` or chat `messages` rows) or a `dataset_version` and `split`.

`plan` checks the compiled package and every input row (a bad row names its file and line,
refused once); `answer_chunk` runs one chunk per mapped task instance, one at a time, with
progress in its log; a chunk is written whole or not at all, so a crash or a retry redoes only
the chunk in flight and a new run resumes where the last one stopped. `finish` joins the
chunks in input order into `results.jsonl` next to the input's version, with `summary.json`
(tokens/s, cost per 1k tokens from the task's `serving.price_per_hour`, answers in the task's
shape, agreement with the input's references) and `report.html`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task

from tuneship.tasks import task_names
from tuneship_airflow.refusals import fail_on_refusal
from tuneship_airflow.schedules import clock


@dag(
    schedule=clock("0 2 * * *"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["tuneship", "inference"],
    default_args={"owner": "ml-platform", "retries": 2, "retry_delay": timedelta(seconds=30)},
    params={
        "task": Param(None, type=["null", "string"], enum=[None, *task_names()], title="Task",
                      description="include/tasks/<task>.yaml. Empty: every task with a champion (nightly)."),
        "version": Param(None, type=["null", "integer"], minimum=1, title="Model version",
                         description="A registered version with a compiled package. Empty: the task's champion."),
        "input_uri": Param(None, type=["null", "string"], title="Input file",
                           description="A JSONL file of {prompt} or {messages} rows (under TUNESHIP_HOME/incoming "
                                       "or absolute). Empty: a dataset version's split (below)."),
        "dataset_version": Param(None, type=["null", "string"], title="Dataset version",
                                 description="An accepted version id of the task's data. Empty: the newest."),
        "split": Param("eval", type="string", enum=["eval", "train"], title="Split"),
        "chunk_rows": Param(64, type="integer", minimum=1, maximum=10000, title="Rows per chunk",
                            description="What a crash can cost: the chunk in flight is answered again."),
        "max_new_tokens": Param(None, type=["null", "integer"], minimum=1, maximum=256, title="Max new tokens",
                                description="Empty: the task's first gate suite's."),
        "price_per_hour": Param(None, type=["null", "number"], exclusiveMinimum=0, title="Instance USD per hour",
                                description="For the cost per 1k tokens. Empty: the task's serving.price_per_hour."),
    },
)
def llm_batch_inference():
    @task
    def tasks_to_run(params=None) -> list[str]:
        return [params["task"]] if params["task"] else task_names()

    @task(map_index_template="{{ label }}")
    @fail_on_refusal
    def plan(task_name: str, params=None) -> dict | None:
        from airflow.sdk import get_current_context

        from tuneship.batch import nothing_to_answer, plan_batch
        from tuneship.tasks import load_task

        get_current_context()["label"] = task_name  # the mapped instance's name in the UI

        t = load_task(task_name)
        if not params["task"] and (why := nothing_to_answer(t)):
            print(f"{task_name}: skipped tonight: {why}")
            return None
        p = plan_batch(t, version=params["version"], input_uri=params["input_uri"],
                       dataset_version=params["dataset_version"], split=params["split"],
                       chunk_rows=params["chunk_rows"], max_new_tokens=params["max_new_tokens"],
                       price_per_hour=params["price_per_hour"])
        print(f"{task_name}: version {p['version']} over {p['input']}: {p['rows']} rows in {p['chunks']} chunks, "
              f"{len(p['done'])} already written; results in {p['out_dir']}")
        return p

    @task
    def chunks(plans: list) -> list[dict]:
        """One entry per chunk still to answer (those already written are not run again)."""
        return [{"out_dir": p["out_dir"], "index": i, "label": f"{p['task']} {i + 1}/{p['chunks']}"}
                for p in plans if p for i in range(p["chunks"]) if i not in p["done"]]

    @task(map_index_template="{{ label }}", max_active_tis_per_dagrun=1)
    @fail_on_refusal
    def answer_chunk(chunk: dict) -> dict:
        from airflow.sdk import get_current_context

        from tuneship.batch import run_chunk

        get_current_context()["label"] = chunk["label"]

        return run_chunk(chunk["out_dir"], chunk["index"])

    @task(trigger_rule="none_failed")
    def finish(plans: list) -> list[dict]:
        from tuneship.batch import finish_batch

        return [finish_batch(p) for p in plans if p]

    planned = plan.expand(task_name=tasks_to_run())
    answer_chunk.expand(chunk=chunks(planned)) >> finish(planned)


llm_batch_inference()
