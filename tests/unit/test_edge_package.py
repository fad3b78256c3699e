"""The int4 edge package (issue 13): a compiled build a device runs with ONNX Runtime GenAI alone.

The tiny model is compiled at int4 exactly as the compile stage does it, packaged, copied to a
fresh directory and answered there by `python -I run.py` on a "device": a virtual environment
holding onnxruntime-genai and its declared dependencies and nothing else (no tuneship,
transformers, torch, `tokenizers`, jinja2). Its answers must be what Triton serves for the same
prompts: `compile.served_answers`' text, and the prompt and completion token counts of the
class Triton runs. A changed file is refused by `verify_edge` naming it; a missing one stops
`run.py` and `verify_edge` with its name; a failed packaging leaves the previous package whole.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from ml_fixtures import base_model
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from typer.testing import CliRunner

from tuneship.cli import app
from tuneship.compile import (
    GENERIC_PARITY_PROMPTS,
    compile_for_triton,
    load_triton_model_module,
    served_answers,
)
from tuneship.edge import EdgeError, package_edge, verify_edge
from tuneship.stages import parity_prompts
from tuneship.tasks import load_task

TASK, VERSION = "triage", 7
SYSTEM = "You triage support tickets."
PLAIN = [*GENERIC_PARITY_PROMPTS, "Ticket: my card was charged twice for one order\nTriage:",
         "héllo wörld: ünïcode 日本 ✓", " a leading space and  two  spaces"]
CHAT = ["Hello", "My parcel never arrived and nobody answers my emails",
        [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "the app crashes"}]]
MAX_NEW = 24
FORBIDDEN = ("tuneship", "transformers", "torch", "tokenizers", "jinja2", "peft")


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> dict:
    """The tiny model's int4 build where the compile stage leaves a registered version's
    (artifacts/tasks/<task>/compiled/v<N>, with its COMPILED.json), and its tokenizer."""
    from transformers import AutoTokenizer

    base = base_model(tmp_path_factory)
    artifacts = tmp_path_factory.mktemp("artifacts")
    package = artifacts / "tasks" / TASK / "compiled" / f"v{VERSION}"
    deployment = {"task": TASK, "model": "triage-llm", "version": VERSION}
    # not gated here (test_quantize holds quantized builds to the task's gates): the package's
    # fidelity to this build is what is under test
    report = compile_for_triton(str(base), None, package, "llm", precision="int4", deployment=deployment,
                                quality_gate=lambda answers: {"gated": False})
    (package / "COMPILED.json").write_text(json.dumps(
        {"task": TASK, "version": VERSION, "package": str(package / "llm"), **report}, default=str))
    return {"artifacts": artifacts, "version_dir": Path(report["onnx_path"]).parent,
            "tokenizer": AutoTokenizer.from_pretrained(str(base))}


@pytest.fixture(scope="module")
def packaged(build, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("edge") / "triage-v7-int4"
    manifest = package_edge(build["version_dir"], out, prompt_format="chat", system_prompt=SYSTEM,
                            archive=True)
    return manifest


@pytest.fixture(scope="module")
def device_python(tmp_path_factory) -> Path:
    """A Python that has onnxruntime-genai and what its wheel declares it needs, and nothing
    else: a fresh venv whose site-packages links just those distributions from this one."""
    root = tmp_path_factory.mktemp("device") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = next(root.glob("lib/python*/site-packages"))
    todo, seen = ["onnxruntime-genai"], set()
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        dist = importlib.metadata.distribution(name)
        todo += [r.name for r in map(Requirement, dist.requires or [])
                 if r.marker is None or r.marker.evaluate({"extra": ""})]
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if not (site / top).exists():
                (site / top).symlink_to(Path(str(dist.locate_file(top))))
    assert seen == {"onnxruntime-genai", "onnxruntime", "numpy", "flatbuffers", "packaging", "protobuf"}
    return root / "bin" / "python"


def on_device(device_python: Path, package: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python -I run.py ...` in the package's directory: no PYTHONPATH, no user site, not even
    the script's directory on sys.path."""
    return subprocess.run([str(device_python), "-I", "run.py", *args], cwd=package, input=stdin,
                          capture_output=True, text=True, timeout=120)


def copy_of(packaged: dict, dest: Path) -> Path:
    return Path(shutil.copytree(packaged["path"], dest / "pkg"))


def served(build: dict, prompts: list, max_new: int) -> list[dict]:
    """What Triton serves for each prompt: served_answers' text, and the token counts the class
    Triton runs reports (its PROMPT_TOKENS and COMPLETION_TOKENS outputs)."""
    from tuneship.compile import served_text

    texts = served_answers(build["version_dir"], build["tokenizer"])(prompts, max_new)
    generator = load_triton_model_module().GenaiGreedyGenerator(str(build["version_dir"]), threads=os.cpu_count() or 1)
    out = []
    for prompt, text in zip(prompts, texts, strict=True):
        completion, n_prompt, n_out = generator.generate(served_text(build["tokenizer"], prompt), max_new)
        assert completion == text
        out.append({"completion": text, "prompt_tokens": n_prompt, "completion_tokens": n_out})
    return out


def test_the_package_answers_on_onnx_runtime_genai_alone_as_triton_serves(build, packaged, device_python, tmp_path):
    probe = f"import importlib.util as u, json; print(json.dumps([m for m in {FORBIDDEN!r} if u.find_spec(m)]))"
    importable = subprocess.run([str(device_python), "-I", "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(importable.stdout) == []  # the device has none of them
    pkg = copy_of(packaged, tmp_path)
    verify_edge(pkg)

    task = load_task(TASK).model_copy(update={"prompt_format": "chat", "system_prompt": SYSTEM})
    chat = on_device(device_python, pkg, "--jsonl", "--max-tokens", str(MAX_NEW),
                     stdin="".join(json.dumps(p) + "\n" for p in CHAT))
    assert chat.returncode == 0, chat.stderr
    expected_chat = served(build, [task.render_prompt(p) for p in CHAT], MAX_NEW)
    assert [json.loads(line) for line in chat.stdout.splitlines()] == expected_chat

    plain = on_device(device_python, pkg, "--jsonl", "--format", "plain", "--max-tokens", str(MAX_NEW),
                      stdin="".join(json.dumps(p) + "\n" for p in PLAIN))
    assert plain.returncode == 0, plain.stderr
    expected_plain = served(build, PLAIN, MAX_NEW)
    assert [json.loads(line) for line in plain.stdout.splitlines()] == expected_plain

    # prompts as arguments, generation.json's default length, one answer a line
    args = on_device(device_python, pkg, "--format", "plain", "Hello", "The weather today is")
    assert args.returncode == 0, args.stderr
    assert args.stdout.splitlines() == [a["completion"] for a in served(build, ["Hello", "The weather today is"], 16)]

    # the answers are real decoding, and the rendering matters: not one constant answer
    assert sum(a["completion_tokens"] for a in expected_plain) > 3 * len(PLAIN)
    assert len({a["completion"] for a in expected_plain}) == len(PLAIN)
    assert PLAIN[0] == CHAT[0] and expected_chat[0]["prompt_tokens"] > expected_plain[0]["prompt_tokens"] + 5
    assert sorted(os.listdir(pkg)) == sorted(os.listdir(packaged["path"]))  # running wrote nothing into it
    verify_edge(pkg)


def test_the_package_holds_every_file_with_its_digest_and_imports_no_tuneship(build, packaged, tmp_path):
    pkg = Path(packaged["path"])
    manifest = verify_edge(pkg)
    assert set(manifest["files"]) == {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json",
                                      "tokenizer_config.json", "generation.json", "model.py", "edge.json",
                                      "run.py", "SHA256SUMS"}
    for name, meta in manifest["files"].items():
        data = (pkg / name).read_bytes()
        assert meta == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert manifest["precision"] == "int4"
    assert manifest["source"]["task"] == TASK and manifest["source"]["version"] == VERSION
    assert manifest["requires"]["onnxruntime-genai"] == importlib.metadata.version("onnxruntime-genai")
    assert manifest["checked"] == {"prompts": len(GENERIC_PARITY_PROMPTS), "rendered_equal": True,
                                   "tokens_equal": True, "answers_equal": True}
    assert manifest["bytes"] == sum(m["bytes"] for m in manifest["files"].values())
    # the device checks the files with coreutils alone
    sums = subprocess.run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=pkg, capture_output=True, text=True)
    assert sums.returncode == 0 and sums.stdout.count(": OK") == len(manifest["files"]) - 1, sums.stdout
    # run.py imports the standard library and onnxruntime_genai, nothing else
    tree = ast.parse((pkg / "run.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported - set(sys.stdlib_module_names) == {"onnxruntime_genai"}
    # model.py is the file the version's Triton runs, byte for byte
    assert (pkg / "model.py").read_bytes() == (build["version_dir"] / "model.py").read_bytes()
    # the archive holds the same package
    with tarfile.open(packaged["archive"]) as tar:
        tar.extractall(tmp_path, filter="data")
    assert verify_edge(tmp_path / pkg.name) == manifest


def test_a_changed_file_is_refused_naming_it(packaged, tmp_path):
    pkg = copy_of(packaged, tmp_path)
    data = bytearray((pkg / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight, same size
    (pkg / "model.onnx.data").write_bytes(bytes(data))
    (pkg / "notes.txt").write_text("added on the device")
    with pytest.raises(EdgeError) as refused:
        verify_edge(pkg)
    message = str(refused.value)
    assert "model.onnx.data differs from the manifest: sha256 " in message
    assert "notes.txt is not in the manifest" in message
    assert "run.py" not in message and "model.onnx " not in message  # only what changed is named


def test_a_missing_file_stops_run_py_and_verify_edge_naming_it(packaged, device_python, tmp_path):
    pkg = copy_of(packaged, tmp_path)
    (pkg / "model.onnx.data").unlink()
    with pytest.raises(EdgeError, match=r"model\.onnx\.data is missing"):
        verify_edge(pkg)
    r = on_device(device_python, pkg, "Hello")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == f"error: the edge package in {pkg} is incomplete: model.onnx.data is missing"
    (pkg / "MANIFEST.json").unlink()
    r = on_device(device_python, pkg, "Hello")
    assert r.returncode == 2 and "has no MANIFEST.json: not an edge package" in r.stderr
    assert "Traceback" not in r.stderr


def test_packaging_refuses_what_it_cannot_package_and_leaves_the_last_package_whole(build, tmp_path):
    out = tmp_path / "edge"
    first = package_edge(build["version_dir"], out, archive=True)
    assert first["prompt_format"] == "plain" and first["checked"]["answers_equal"]
    first.pop("archive")

    with pytest.raises(EdgeError, match="the build in .* is int4, the edge package is int8"):
        package_edge(build["version_dir"], out, precision="int8")
    broken = Path(shutil.copytree(build["version_dir"], tmp_path / "broken"))
    (broken / "tokenizer.json").unlink()
    with pytest.raises(EdgeError, match="tokenizer.json missing"):
        package_edge(broken, out)
    # a served model whose chat rendering the edge does not reproduce: refused by the check
    other = copy.deepcopy(build["tokenizer"])
    other.chat_template = "{% for m in messages %}{{ m['role'] | upper }}> {{ m['content'] }}\n{% endfor %}A>"
    with pytest.raises(EdgeError, match="ONNX Runtime GenAI renders 'Hello' as"):
        package_edge(build["version_dir"], out, prompt_format="chat", tokenizer=other)

    assert verify_edge(out) == {k: v for k, v in first.items() if k != "path"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "edge", "edge.tar.gz"]  # no staging left
    package_edge(build["version_dir"], out)  # without an archive: the earlier one, now stale, goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "edge"]


def test_the_cli_packages_a_registered_versions_compiled_build(build, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESHIP_ARTIFACTS", str(build["artifacts"]))
    runner = CliRunner()
    out = tmp_path / "triage-edge"
    r = runner.invoke(app, ["edge-package", "--task", TASK, "--version", str(VERSION), "--out", str(out), "--archive"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out)
    manifest = verify_edge(out)
    task = load_task(TASK)
    assert manifest["prompt_format"] == task.prompt_format == "plain"
    assert manifest["checked"]["prompts"] == len(parity_prompts(task))  # the task's own prompts
    assert manifest["source"]["version"] == VERSION and (tmp_path / "triage-edge.tar.gz").is_file()

    r = runner.invoke(app, ["edge-package", "--task", TASK, "--version", "8", "--out", str(tmp_path / "v8")])
    assert r.exit_code == 2 and "triage v8 has no compiled build" in r.stderr
    r = runner.invoke(app, ["edge-package", "--task", TASK, "--version", str(VERSION), "--out", str(out),
                            "--precision", "int8"])
    assert r.exit_code == 2 and "is int4, the edge package is int8" in r.stderr
    assert verify_edge(out) == manifest  # the refused run left the package as it was
