"""`make demo`: the whole loop on the embedded default, through Airflow's real scheduler.

1. prepare each demo task's base model and generate its first batch of data (the tasks whose
   `include/tasks/<task>.yaml` declares `demo.cycles`);
2. start Airflow (api-server, scheduler, dag-processor, triggerer), MLflow, Triton, gateway;
3. for every task at once, side by side: land its batch and trigger `llm_data_validation`;
   Assets chain it to `llm_finetune` and `llm_release` (validate → fine-tune → gates →
   compile → blue/green with shadow → promotion) while a traffic generator replays the
   task's prompts through the gateway for its release windows to watch;
4. cycle two, for a task that declares it: the replayed traffic drifts, `llm_drift_monitor`
   fires `retrain_request`, the retrain goes through to a new release decision;
5. print a summary (with the seconds each stage took), write an HTML report, stop what it
   started; exit non-zero on failure.

Only time (the shadow window) and traffic (the generator) are simulated. The generator
replays while something watches the traffic (a release's shadow and post-switch windows, a
drift window) and pauses while its task trains, is scored and compiled: on 2 shared cores
every answer served is time the trainer does not get.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tuneship import config, services
from tuneship.runwatch import RunWatcher, failures

DAGS = ("llm_data_validation", "llm_finetune", "llm_release", "llm_drift_monitor")


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Traffic:
    """Replays a task's production-like prompts through the gateway at a steady rate once
    its served model is ready: `senders` threads, each on a fixed schedule, so a slow answer
    delays no other request (a real model on 2 cores answers in about a second)."""

    task: Any = None  # tuneship.tasks.Task
    rps: float = 1.0  # a real model on 2 shared cores: every request costs live + shadow answers
    drift: float = 0.0
    api_key: str | None = None  # the embedded default's client key (ensure_client_key)
    senders: int = 2
    sent: int = 0
    ok: int = 0
    failed: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _resumed: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)
    _seed: int = 1000

    def start(self, active: bool = True) -> None:
        """Start the senders; `active=False`: paused until `resume()`."""
        self._stop.clear()
        if active:
            self._resumed.set()
        else:
            self._resumed.clear()
        self._threads = [threading.Thread(target=self._loop, daemon=True, name=f"traffic-{i}")
                         for i in range(self.senders)]
        for t in self._threads:
            t.start()

    def pause(self) -> None:
        """Hold the replay (a request in flight finishes)."""
        self._resumed.clear()

    def resume(self) -> None:
        self._resumed.set()

    def stop(self) -> None:
        self._stop.set()
        self._resumed.set()
        for t in self._threads:
            t.join(timeout=30)

    def _next_seed(self) -> int:
        with self._lock:
            self._seed += 1
            return self._seed

    def _count(self, ok: bool) -> None:
        with self._lock:
            self.sent += 1
            self.ok += ok
            self.failed += not ok

    def _loop(self) -> None:
        task = self.task
        traffic_prompts = task.resolve(task.demo.traffic)
        max_tokens = task.suite(task.eval.smoke).generation.max_new_tokens
        served = task.served_model
        period = self.senders / self.rps
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        with httpx.Client(base_url=config.gateway_url(), timeout=60.0, headers=headers) as c:
            while not self._stop.is_set():
                if not self._resumed.is_set():
                    self._resumed.wait(1.0)
                    continue
                try:
                    ready = any(m["id"] == served for m in c.get("/v1/models").json().get("data", []))
                except (httpx.HTTPError, ValueError):
                    ready = False
                if not ready:
                    self._stop.wait(1.0)
                    continue
                due = time.monotonic() + period
                prompt = task.render_prompt(traffic_prompts(1, seed=self._next_seed(), drift=self.drift)[0])
                body = {"model": served, "max_tokens": max_tokens, "temperature": 0}
                try:
                    if isinstance(prompt, str):
                        r = c.post("/v1/completions", json={**body, "prompt": prompt})
                    else:
                        r = c.post("/v1/chat/completions", json={**body, "messages": prompt})
                    self._count(r.status_code == 200)
                except httpx.HTTPError:
                    self._count(False)
                self._stop.wait(max(0.0, due - time.monotonic()))


class Loop(RunWatcher):
    """The demo's waits (tuneship.runwatch), printed with the demo's prefix, plus DAG parsing."""

    def __init__(self, api: Any, timeout: float, label: str | None = None) -> None:
        emit = say if label is None else (lambda msg: say(f"[{label}] {msg.lstrip()}"))
        super().__init__(api, timeout, emit=emit, poll_s=2.0)

    def wait_parsed(self) -> None:
        while True:
            dags = self.api.dags()
            if all(d in dags for d in DAGS):
                return
            errors = self.api.import_errors()
            if errors:
                raise RuntimeError("DAG import errors:\n" + "\n".join(f"{e['filename']}: {e['stack_trace']}" for e in errors))
            self.tick("DAGs to be parsed")

    def wait_run(self, dag_id: str, run_id: str) -> dict:
        """As RunWatcher's, and a failed run prints each failed task's last log lines: the
        reason, without opening the UI."""
        run = super().wait_run(dag_id, run_id)
        if run["state"] == "failed":
            run["failed_tasks"] = [f.to_json() for f in failures(self.api, dag_id, run_id, lines=25)]
            for f in run["failed_tasks"]:
                say(f"  {dag_id}.{f['task_id']} failed (try {f['try_number']}); last lines of its log:")
                for line in f["log_tail"]:
                    print(f"    | {line}", flush=True)
        return run


def _run_ids(api: Any, dag_id: str) -> set[str]:
    return {r["dag_run_id"] for r in api.runs(dag_id)}


RESET = ("airflow", "mlflow", "artifacts", "gateway", "inference_log", "monitor", "incoming", "validation",
         "demo-staging", "release",
         "data_validation", "triton/models", "notifications.jsonl", "run", "logs")


def reset_state() -> None:
    """A demo starts from a clean slate; the base model, Triton install and reports stay."""
    import shutil

    services.stop()
    for rel in RESET:
        path = config.home() / rel
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    say(f"reset the embedded state under {config.home()} (kept: models, triton install, reports)")


def demo_tasks() -> list[Any]:
    """The tasks the demo runs: those whose task file declares `demo.cycles` (in name order),
    or only TUNESHIP_DEMO_TASKS (comma-separated) when set."""
    import os

    from tuneship.tasks import load_tasks

    tasks = load_tasks()
    chosen = [n.strip() for n in os.environ.get("TUNESHIP_DEMO_TASKS", "").split(",") if n.strip()]
    picked = [tasks[n] for n in chosen] if chosen else [t for t in tasks.values() if t.demo and t.demo.cycles]
    if not picked:
        raise RuntimeError("no task declares demo.cycles: nothing for the demo to run")
    return picked


def prepare_base_model(task: Any) -> str:
    """The task's base model, ready to load: a packaged model converted once, or the tiny
    test model built from the task's demo corpus; an HF id or directory as given."""
    from tuneship import basemodel

    ref = task.base_model
    if ref == basemodel.DEFAULT_NAME and task.demo and task.demo.pretrain_corpus:
        basemodel.build_base_model(config.models_dir() / ref, task.resolve(task.demo.pretrain_corpus),
                                   vocab_texts=task.demo.vocab)
    return basemodel.resolve_base_ref(ref)[0]


def prepare_inputs(task: Any) -> Path:
    """The task's base model ready, and its first batch generated off to the side: it lands
    when the task's cycle starts (a batch already in a landing location would be taken in by
    the nightly validation run that starts when the DAG is unpaused, beside the demo's)."""
    t = time.monotonic()
    prepare_base_model(task)
    say(f"base model {task.base_model} ready ({time.monotonic() - t:.0f}s)")
    staged = config.home() / "demo-staging" / task.name / "batch-0001"
    if not (staged / "train.jsonl").exists():
        task.resolve(task.demo.generator)(staged, seed=0)
    return staged


def land(task: Any, staged: Path) -> Path:
    """Move a generated batch into the task's landing location (one rename: never half there)."""
    batch = task.landing() / staged.name
    batch.parent.mkdir(parents=True, exist_ok=True)
    if staged.exists():
        staged.rename(batch)
    say(f"training data for task {task.name} landed: {batch}")
    return batch


def start_services() -> None:
    say("starting Airflow (api-server, scheduler, dag-processor, triggerer), MLflow, Triton, gateway")
    t = time.monotonic()
    services.start(services.ALL)
    say(f"services up ({time.monotonic() - t:.0f}s)")


def _prepare_while_services_start(tasks: list[Any]) -> dict[str, Path]:
    """Preparing base models is CPU work and Airflow's start is mostly waiting: overlap them."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        starting = pool.submit(start_services)
        batches = {t.name: prepare_inputs(t) for t in tasks}
        starting.result()
    return batches


def ensure_client_key() -> str:
    """A client API key for local clients (traffic generator, `make up` users), kept 0600 in
    home/gateway/client_key; the gateway requires keys from the first one issued on."""
    import subprocess

    path = config.home() / "gateway" / "client_key"
    subprocess.run([sys.executable, "-m", "serving.gateway.keys", "ensure", "--name", "local", "--save", str(path)],
                   cwd=config.REPO_ROOT, check=True, capture_output=True)
    return path.read_text().strip()


def api_client() -> Any:
    from tuneship.airflow_api import AirflowAPI

    return AirflowAPI(f"http://127.0.0.1:{config.Ports.from_env().airflow}", services.ADMIN_USER,
                      services.admin_password())


def print_urls() -> None:
    ports = config.Ports.from_env()
    print(f"""
  Airflow UI   http://127.0.0.1:{ports.airflow}   login: {services.ADMIN_USER} / {services.admin_password()}
  MLflow UI    http://127.0.0.1:{ports.mlflow}
  Gateway      http://127.0.0.1:{ports.gateway}/v1   (OpenAI-compatible; /version, /health/ready, /metrics)
               API key: {config.home() / "gateway" / "client_key"}
  Reports      http://127.0.0.1:{ports.airflow}/tuneship/reports/
  Stop with:   make down
""", flush=True)


def run_demo(shadow_hours: float, timeout: float, keep: bool, retention_minutes: float = 0.25) -> int:
    """Every demo task (its task file's `demo.cycles`), side by side, each in its own thread:
    cycle 1 (new data -> release), then cycle 2 (drift -> retrain -> release) where declared.
    One task's release windows overlap the other's training, as separate tasks would on a real
    platform. Each task has a traffic generator replaying its prompts through the gateway while
    something watches them: its release's shadow and post-switch windows, and its drift window."""
    from concurrent.futures import ThreadPoolExecutor

    started = time.monotonic()
    tasks = demo_tasks()
    summary: dict[str, Any] = {"tasks": [t.name for t in tasks], "cycles": []}
    traffic = {t.name: Traffic(task=t) for t in tasks}
    failed = False
    try:
        reset_state()
        # The demo triggers every run itself: the clock schedules stay off in the stack it starts
        # (config.clock_schedules), so the time of day changes nothing. `make up` has them on.
        os.environ[config.CLOCK_SCHEDULES] = "off"
        say("clock schedules (nightly validation and batch inference, hourly drift check) are off in this stack: "
            "the demo triggers each run; `make up` starts the stack with them on")
        batches = _prepare_while_services_start(tasks)
        key = ensure_client_key()
        api = api_client()
        Loop(api, timeout).wait_parsed()
        api.set_variable("tuneship_shadow_hours_override", str(shadow_hours))
        api.set_variable("tuneship_retention_minutes_override", str(retention_minutes))
        for dag_id in DAGS:
            api.unpause(dag_id)
        for t in traffic.values():
            t.api_key = key
            t.start(active=False)
        deadline = started + timeout
        # Fine-tunes take turns (one run at a time), so the order they start in is the order
        # tasks finish: a task with a drift cycle (the longest chain) lands and trains first,
        # the next lands once that fine-tune has started.
        tasks.sort(key=lambda t: "drift" not in t.demo.cycles)
        taken = [threading.Event() for _ in tasks]
        with ThreadPoolExecutor(max_workers=len(tasks), thread_name_prefix="demo-task") as pool:
            paths = [pool.submit(_task_cycles, task, batches[task.name], traffic[task.name], deadline,
                                 taken[i - 1] if i else None, taken[i])
                     for i, task in enumerate(tasks)]
            for path in paths:
                summary["cycles"] += path.result()
        failed = not summary["cycles"] or not all(c["ok"] for c in summary["cycles"])
        return 1 if failed else 0
    except Exception as exc:  # noqa: BLE001 - the demo reports any failure and exits non-zero
        say(f"FAILED: {exc}")
        summary["error"] = str(exc)
        failed = True
        return 1
    finally:
        for t in traffic.values():
            t.stop()
        summary["traffic"] = {name: {"sent": t.sent, "ok": t.ok, "failed": t.failed} for name, t in traffic.items()}
        summary["wall_s"] = round(time.monotonic() - started, 1)
        summary["live"] = {}
        for task in tasks:
            try:
                summary["live"][task.name] = httpx.get(f"{config.gateway_url()}/version",
                                                       params={"model": task.served_model}, timeout=5).json()
            except (httpx.HTTPError, ValueError):
                summary["live"][task.name] = None
        from tuneship.report import write_demo_report

        report = write_demo_report(summary)
        _print_summary(summary, report, failed)
        if keep:
            print_urls()
        else:
            services.stop()


def _task_cycles(task: Any, staged: Path, traffic: Traffic, deadline: float,
                 after: threading.Event | None, taken: threading.Event) -> list[dict[str, Any]]:
    """One task's cycles, in order (its own API client and watcher: this runs in a thread).
    Its data lands once `after` is set; it sets `taken` once its fine-tune run has started."""
    api = api_client()
    loop = Loop(api, max(deadline - time.monotonic(), 1.0), label=task.name)
    cycles: list[dict[str, Any]] = []
    try:
        while after is not None and not after.wait(0):
            loop.tick(f"the previous task's fine-tune run to start ({task.name} lands after it)")
        say(f"cycle 1 ({task.name}): validate -> fine-tune -> gates -> compile -> release (shadow) -> promote")
        before = {d: _run_ids(api, d) for d in DAGS}
        conf = {"task": task.name, "dataset_uri": str(land(task, staged))}
        cycles.append(_cycle(api, loop, before, ("llm_data_validation", conf), task.name, traffic,
                             on_finetune=taken.set))
        if not cycles[-1]["ok"] or "drift" not in task.demo.cycles:
            return cycles

        say(f"cycle 2 ({task.name}): traffic drifts; the drift monitor should request a retrain")
        drift_from = time.time()
        traffic.drift = 0.8
        task.resolve(task.demo.generator)(task.landing() / "batch-0002", seed=1, drift=0.3)
        say(f"labelled examples of the new kinds of request landed: {task.landing() / 'batch-0002'}")
        start_count = traffic.sent
        traffic.resume()  # the drift window watches live traffic
        while traffic.sent - start_count < 45:
            loop.tick(f"drifted traffic ({task.name})")
        window_h = max((time.time() - drift_from) / 3600, 0.001)
        before = {d: _run_ids(api, d) for d in DAGS}
        cycles.append(_cycle(api, loop, before, ("llm_drift_monitor", {
            "window_hours": window_h, "threshold": 0.2, "min_requests": 30, "debounce": 1, "cooldown_hours": 0}),
            task.name, traffic))
        return cycles
    except Exception as exc:  # noqa: BLE001 - recorded as this task's failed cycle
        say(f"FAILED ({task.name}): {exc}")
        cycles.append({"task": task.name, "trigger": "-", "ok": False, "error": str(exc)})
        return cycles
    finally:
        taken.set()  # never leave the next task waiting
        traffic.pause()


def stage_seconds(api: Any, dag_id: str, run_id: str) -> dict[str, float]:
    """Seconds each task of a run took (a mapped task: its slowest instance), in run order:
    where the demo's time went."""
    times: dict[str, float] = {}
    tis = sorted(api.task_instances(dag_id, run_id), key=lambda t: t.get("start_date") or "~")
    for ti in tis:
        if ti.get("duration") is not None:
            times[ti["task_id"]] = round(max(times.get(ti["task_id"], 0.0), float(ti["duration"])), 1)
    return times


def _cycle(api: Any, loop: Loop, before: dict[str, set[str]], trigger: tuple[str, dict], task: str,
           traffic: Traffic | None = None, on_finetune: Any = None) -> dict[str, Any]:
    """One cycle through the DAGs for `task`. Its traffic replays while its release runs (the
    shadow and post-switch windows watch it) and, in a drift cycle, until the drift monitor
    has looked; it pauses while the task trains, is scored and compiled."""
    started = time.monotonic()
    try:
        cycle = _run_cycle(api, loop, before, trigger, task, traffic, on_finetune)
    finally:
        if traffic is not None:
            traffic.pause()
    cycle["wall_s"] = round(time.monotonic() - started, 1)
    return cycle


def _run_cycle(api: Any, loop: Loop, before: dict[str, set[str]], trigger: tuple[str, dict], task: str,
               traffic: Traffic | None, on_finetune: Any = None) -> dict[str, Any]:
    dag_id, conf = trigger
    cycle: dict[str, Any] = {"task": task, "trigger": dag_id, "ok": False, "seconds": {}}
    run_id = api.trigger(dag_id, conf)
    say(f"triggered {dag_id} ({run_id})")
    run = loop.wait_run(dag_id, run_id)
    cycle["seconds"][dag_id] = stage_seconds(api, dag_id, run_id)
    if traffic is not None:
        traffic.pause()
    first_task = "validate_and_version" if dag_id == "llm_data_validation" else "detect_drift"
    from tuneship.tasks import task_names

    # validation maps over the tasks given (one here); the drift monitor over every task
    index = task_names().index(task) if dag_id == "llm_drift_monitor" else 0
    cycle[dag_id] = {"run_id": run_id, "state": run["state"],
                     "result": api.xcom(dag_id, run_id, first_task, map_index=index)}
    if dag_id == "llm_drift_monitor":
        cycle["drift"] = _latest_drift(task, run_id)
        tis = {(t["task_id"], t.get("map_index", -1)): t["state"] for t in api.task_instances(dag_id, run_id)}
        if tis.get(("detect_drift", index)) != "success":
            say(f"drift monitor did not fire: {cycle['drift']}")
            return cycle
    if run["state"] != "success":
        return cycle
    ft = loop.wait_new_run("llm_finetune", before["llm_finetune"], task=task)
    if on_finetune is not None:
        on_finetune()
    ft_run = loop.wait_run("llm_finetune", ft)
    cycle["seconds"]["llm_finetune"] = stage_seconds(api, "llm_finetune", ft)
    cycle["finetune"] = {"run_id": ft, "state": ft_run["state"],
                         "model": api.xcom("llm_finetune", ft, "register"),
                         "gates": api.xcom("llm_finetune", ft, "evaluate"),
                         "compiled": api.xcom("llm_finetune", ft, "compile_model")}
    if ft_run["state"] != "success":
        tis = {t["task_id"]: (t["state"], t.get("try_number")) for t in api.task_instances("llm_finetune", ft)}
        if tis.get("evaluate") == ("failed", 1) and dag_id == "llm_drift_monitor":
            # A retrain that is no better than the champion is refused by its gates: a decision
            # the loop exists to make (live traffic stays on the champion), not a demo failure.
            # A first model refused leaves nothing to serve: that cycle fails the demo.
            cycle["decision"] = "refused by its gates"
            from tuneship.notify import read_sink

            cycle["gates_alert"] = next((m["text"] for m in reversed(read_sink())
                                         if "failed its gates" in m["text"] and (m.get("fields") or {}).get("task") == task), None)
            say(f"cycle ({task}): the retrain was refused by its gates; live traffic stays on the champion")
            cycle["ok"] = True
        return cycle
    rel = loop.wait_new_run("llm_release", before["llm_release"], task=task)
    if traffic is not None:
        traffic.resume()
    rel_run = loop.wait_run("llm_release", rel)
    cycle["seconds"]["llm_release"] = stage_seconds(api, "llm_release", rel)
    cycle["release"] = {"run_id": rel, "state": rel_run["state"],
                        "smoke": api.xcom("llm_release", rel, "smoke"),
                        "serving": api.xcom("llm_release", rel, "serving_gate"),
                        "verdict": api.xcom("llm_release", rel, "shadow_window"),
                        "decision": api.xcom("llm_release", rel, "decide")}
    cycle["ok"] = rel_run["state"] == "success"
    cycle["decision"] = (cycle["release"]["decision"] or {}).get("decision") if cycle["ok"] else "release failed"
    return cycle


def _latest_drift(task: str | None, run_id: str) -> dict | None:
    from tuneship.stages import slug

    path = config.home() / "monitor" / str(task) / f"drift-{slug(run_id)}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _print_summary(summary: dict[str, Any], report: Path, failed: bool) -> None:
    from tuneship.report import fmt, gate_line, usd
    from tuneship.serving_gate import line as serving_line

    print("\n" + "=" * 72)
    print(f"Tuneship demo {'FAILED' if failed else 'OK'} in {fmt(summary['wall_s'], 's')}")
    for name, live in (summary.get("live") or {}).items():
        live = live or {}
        print(f"live model ({name}): {live.get('model', '-')} v{live.get('version', '-')} "
              f"on colour {live.get('colour', '-')}")
    for i, cycle in enumerate(summary["cycles"], 1):
        print(f"-- cycle {i} ({cycle.get('task')}, trigger: {cycle['trigger']}, {fmt(cycle.get('wall_s'), 's')})")
        if cycle.get("drift"):
            d = cycle["drift"]
            print(f"   drift score {fmt(d.get('score'))} (threshold {fmt(d.get('threshold'))}) over "
                  f"{fmt(d.get('requests'))} requests: {d.get('reason')}")
        ft = cycle.get("finetune") or {}
        gates = (ft.get("gates") or {})
        if ft.get("model"):
            print(f"   fine-tune {ft['state']}: registered v{ft['model']['version']} "
                  f"(train loss {fmt(ft['model'].get('train_loss'))}"
                  + (f", warm start from {ft['model']['init_from']})" if ft["model"].get("init_from") else ")"))
        if gates.get("gates"):
            for row in gates["gates"]:
                print(f"   gate {gate_line(row, gates.get('reference_name'))}")
        elif gates:
            ref = gates.get("reference_name")
            for k, v in (gates.get("metrics") or {}).items():
                print(f"   gate {k}: {fmt(v)} vs {ref} {fmt((gates.get('reference') or {}).get(k))}")
        compiled = ft.get("compiled") or {}
        if compiled.get("builder"):
            quality = compiled.get("quality") or {}
            held = (f"held to the task's gates against the unquantized candidate: "
                    f"{'passed' if quality.get('passed') else 'refused'}, "
                    + ", ".join(f"{s['suite']} {s['same_answer']:.0%} of answers unchanged"
                                for s in quality.get("suites", []))) if quality else "token parity with eager"
            print(f"   compiled {compiled['builder'].get('precision')} "
                  f"({fmt((compiled.get('onnx_bytes') or 0) / 1e6, 'MB')}): {held}")
        for dag_id, secs in (cycle.get("seconds") or {}).items():
            print(f"   {dag_id} seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in secs.items()))
        rel = cycle.get("release") or {}
        verdict = rel.get("verdict") or {}
        if cycle.get("decision") == "refused by its gates":
            print("   decision: the retrain was refused by its gates; live traffic stays on the champion")
        serving = rel.get("serving") or {}
        if serving.get("candidate"):
            c = serving["candidate"]
            print(f"   serving v{serving.get('version')} ({serving.get('requests')} requests, against "
                  f"{serving.get('live_model') or 'nothing live'}): p95 {fmt(c.get('p95_ms'), 'ms')}, "
                  f"{fmt(c.get('tokens_per_s'))} tokens/s, peak memory {fmt(c.get('peak_memory_mb'), 'MB')}, "
                  f"{usd(c.get('cost_per_1k_tokens'))} per 1k tokens")
            for row in serving.get("rows") or []:
                print(f"   serving gate {serving_line(row)}")
        if rel:
            print(f"   release {rel['state']}: shadow verdict {verdict.get('verdict')} "
                  f"({fmt(verdict.get('requests'))} requests, error rate {fmt(verdict.get('error_rate'))}, "
                  f"p95 {fmt(verdict.get('p95_ms'), 'ms')}, slot {verdict.get('slot')})")
    for name, t in (summary.get("traffic") or {}).items():
        print(f"traffic ({name}): {fmt(t.get('sent'))} sent, {fmt(t.get('ok'))} ok, {fmt(t.get('failed'))} failed")
    from tuneship import audit

    trail = audit.verify()
    print(f"audit trail: {trail.records} decisions, {'chain intact' if trail.ok else f'BROKEN: {trail.first}'} "
          "(`tuneship audit show`)")
    cards = sorted((config.home() / "reports").glob("model-card-*.html"))
    print(f"model cards: {', '.join(c.name for c in cards) or 'none'} (Airflow UI: Browse > Tuneship reports; "
          "each task's state: Browse > Tuneship deployments)")
    if summary.get("error"):
        print(f"error: {summary['error']}")
    print(f"report: {report}")
    print("=" * 72, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneship.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--up", action="store_true", help="start the services and leave them running (make up)")
    parser.add_argument("--shadow-hours", type=float, default=0.008,
                        help="shadow window (default 0.008 h = 29 s, about 29 requests; also caps the post-switch window)")
    parser.add_argument("--retention-minutes", type=float, default=0.1,
                        help="how long a promoted release keeps the previous colour loaded (default 0.1 = 6 s)")
    parser.add_argument("--timeout", type=float, default=1500, help="give up after this many seconds")
    parser.add_argument("--keep", action="store_true", help="leave the services running after the demo")
    args = parser.parse_args(argv)
    if args.up:
        from tuneship.gateway_admin import GatewayAdmin
        from tuneship.stages import reconcile_serving
        from tuneship.tasks import load_tasks
        from tuneship.triton_control import TritonControl

        for task in demo_tasks():
            prepare_inputs(task)
        start_services()
        ensure_client_key()
        from tuneship.gateway_admin import admin_token

        # The routes as the gateway serves them, per task's served model (the gateway
        # migrated a legacy routes.json on start-up), not a file path guessed here.
        for task in load_tasks().values():
            with GatewayAdmin(config.gateway_url(), admin_token(), served_model=task.served_model) as gw:
                routes = gw.routes()  # a model with no routes yet reads as the empty state
            done = reconcile_serving(task, routes, TritonControl(config.triton_url()))
            if done["loaded"]:
                say(f"re-loaded into Triton what the gateway routes to: {', '.join(done['loaded'])}")
        loop = Loop(api_client(), 300)
        loop.wait_parsed()
        print_urls()
        return 0
    return run_demo(args.shadow_hours, args.timeout, args.keep, args.retention_minutes)


if __name__ == "__main__":
    sys.exit(main())
