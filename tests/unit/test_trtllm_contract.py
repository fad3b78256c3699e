"""Contract tests for the GPU compile path (TensorRT-LLM LLM API + Triton), which cannot run here.

The rendered Triton repository is parsed with Triton's own protobuf (tritonclient's
model_config_pb2), its ensemble wiring and model.yaml are checked against the pinned
TensorRT-LLM options, and the preparation Job is validated with kubernetes-validate's strict
schema. Every validator is also shown to reject a broken input, so a green run means something.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tuneship import trtllm
from tuneship.runners import SpecInvalid, load_manifests
from tuneship.trtllm import RepositoryInvalid

REPO = Path(__file__).resolve().parents[2]
TRAINER_POD = REPO / "serving" / "k8s" / "trainer-pod-template.yaml"
NAME = "llm_blue"
LLM = f"{NAME}_trtllm"


def _render(tmp_path: Path, **overrides) -> Path:
    kwargs = dict(model_name=NAME, engine_or_checkpoint_dir="/models/llm_blue/merged",
                  tokenizer_dir="/models/llm_blue/merged", max_batch_size=16,
                  max_input_len=2048, max_output_len=256, kv_cache_free_gpu_mem_fraction=0.7)
    kwargs.update(overrides)
    out = tmp_path / "repo"
    trtllm.render_model_repository(out, **kwargs)
    return out


def _lora(tmp_path: Path) -> Path:
    return _render(tmp_path, lora=True, adapter_dir="/models/llm_blue/adapter",
                   lora_cache_gpu_memory_fraction=0.07, max_lora_rank=16)


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def _model_yaml(repo: Path) -> dict:
    return yaml.safe_load((repo / LLM / "1" / "model.yaml").read_text())


# --------------------------------------------------------------------------- repository


@pytest.mark.parametrize("lora", [False, True])
def test_every_config_parses_with_tritons_protobuf(tmp_path: Path, lora: bool) -> None:
    repo = _lora(tmp_path) if lora else _render(tmp_path)
    configs = sorted(repo.glob("*/config.pbtxt"))
    assert [p.parent.name for p in configs] == [NAME, LLM]
    for path in configs:
        cfg = model_config_pb2.ModelConfig()
        text_format.Parse(path.read_text(), cfg)  # raises on any unknown field
        assert cfg.name == path.parent.name
    assert sorted(trtllm.validate_model_repository(repo)) == [NAME, LLM]
    assert (repo / NAME / "1").is_dir() and (repo / LLM / "1" / "model.yaml").is_file()


def test_no_placeholder_survives_rendering(tmp_path: Path) -> None:
    repo = _lora(tmp_path)
    for path in repo.rglob("*"):
        if path.is_file():
            assert "$" not in path.read_text(), path
    _edit(repo / LLM / "1" / "model.yaml", "max_batch_size: 16", "max_batch_size: ${max_batch_size}")
    with pytest.raises(RepositoryInvalid, match=r"model\.yaml.*placeholder.*max_batch_size"):
        trtllm.validate_model_repository(repo)


@pytest.mark.parametrize("model, old, new", [
    (LLM, "instance_group [", "instance_groups ["),
    (NAME, "input_map {", "inputs_map {"),
])
def test_misspelled_pbtxt_field_is_rejected_naming_the_file(tmp_path: Path, model: str, old: str, new: str) -> None:
    repo = _render(tmp_path)
    _edit(repo / model / "config.pbtxt", old, new)
    with pytest.raises(RepositoryInvalid) as exc:
        trtllm.validate_model_repository(repo)
    assert str(repo / model / "config.pbtxt") in str(exc.value)
    assert new.split()[0] in str(exc.value)


@pytest.mark.parametrize("old, new, match", [
    (f'model_name: "{LLM}"', 'model_name: "tensorrt_llm"', r"model_name 'tensorrt_llm' is not in the repository"),
    # the engine flow's tensor name: gone from the llmapi model
    ('key: "sampling_param_max_tokens"', 'key: "max_tokens"', r"input_map key 'max_tokens' is not an input"),
    ('key: "text_output"', 'key: "output_ids"', r"output_map key 'output_ids' is not an output"),
    ('value: "PROMPT"', 'value: "TEXT"', r"input_map value 'TEXT' is neither"),
    ('value: "COMPLETION"', 'value: "TEXT_OUT"', r"output 'COMPLETION' is produced by no step"),
])
def test_ensemble_cross_references_are_checked(tmp_path: Path, old: str, new: str, match: str) -> None:
    repo = _render(tmp_path)
    _edit(repo / NAME / "config.pbtxt", old, new)
    with pytest.raises(RepositoryInvalid, match=match) as exc:
        trtllm.validate_model_repository(repo)
    assert str(repo / NAME / "config.pbtxt") in str(exc.value)


def test_ensemble_data_type_mismatch_is_rejected(tmp_path: Path) -> None:
    repo = _render(tmp_path)
    _edit(repo / NAME / "config.pbtxt", "data_type: TYPE_INT32", "data_type: TYPE_INT64")
    with pytest.raises(RepositoryInvalid, match="changes data type"):
        trtllm.validate_model_repository(repo)


def test_serving_settings_carry_our_values(tmp_path: Path) -> None:
    repo = _render(tmp_path)
    doc = _model_yaml(repo)
    assert doc["backend"] == "pytorch" and doc["model"] == "/models/llm_blue/merged"
    assert doc["kv_cache_config"]["free_gpu_memory_fraction"] == 0.7
    # in-flight batching: executor-side batch, scheduler policy; Triton-side batching off
    assert doc["max_batch_size"] == 16 and doc["max_seq_len"] == 2048 + 256
    assert doc["max_num_tokens"] >= doc["max_input_len"] == 2048
    assert doc["scheduler_config"]["capacity_scheduler_policy"] == "GUARANTEED_NO_EVICT"
    assert doc["triton_config"] == {"max_batch_size": 0, "decoupled": True}
    assert "lora_config" not in doc and "peft_cache_config" not in doc
    ens = trtllm.validate_model_repository(repo)[NAME]
    assert dict(ens.ensemble_scheduling.step[0].input_map)["streaming"] == "STREAM"
    llm = trtllm.validate_model_repository(repo)[LLM]
    assert not llm.HasField("model_transaction_policy")  # decoupled has one home: model.yaml
    assert "lora_id" not in {i.name for i in llm.input}


def test_lora_settings_carry_our_values(tmp_path: Path) -> None:
    repo = _lora(tmp_path)
    doc = _model_yaml(repo)
    assert doc["lora_config"]["lora_dir"] == ["/models/llm_blue/adapter"]
    assert doc["lora_config"]["max_lora_rank"] == 16
    assert doc["peft_cache_config"]["device_cache_percent"] == 0.07
    llm = trtllm.validate_model_repository(repo)[LLM]
    assert {"lora_id", "lora_name", "lora_path"} <= {i.name for i in llm.input}


@pytest.mark.parametrize("old, new, match", [
    # the v0.19.0 template's key, gone from the 1.x LLM API
    ("backend: \"pytorch\"", "backend: \"pytorch\"\npytorch_backend_config: {use_cuda_graph: false}",
     r"model\.yaml: <root>: Additional properties .*pytorch_backend_config"),
    ("free_gpu_memory_fraction: 0.7", "free_gpu_memory_fraction: 1.5",
     r"model\.yaml: kv_cache_config\.free_gpu_memory_fraction"),
    ("free_gpu_memory_fraction: 0.7", "free_gpu_mem_fraction: 0.7", r"kv_cache_config"),
    ("max_batch_size: 0", "max_batch_size: 8", r"triton_config\.max_batch_size"),
    ("  decoupled: true\n", "", r"'decoupled' is a required property"),
])
def test_model_yaml_is_checked_against_pinned_options(tmp_path: Path, old: str, new: str, match: str) -> None:
    repo = _render(tmp_path)
    _edit(repo / LLM / "1" / "model.yaml", old, new)
    with pytest.raises(RepositoryInvalid, match=match):
        trtllm.validate_model_repository(repo)


def test_decoupled_settings_must_agree(tmp_path: Path) -> None:
    repo = _render(tmp_path, decoupled=False)  # STREAM still reaches the model
    with pytest.raises(RepositoryInvalid, match="decoupled is false"):
        trtllm.validate_model_repository(repo)
    repo = _render(tmp_path / "b")
    _edit(repo / LLM / "config.pbtxt", 'backend: "python"',
          'backend: "python"\nmodel_transaction_policy { decoupled: true }')
    with pytest.raises(RepositoryInvalid, match="set them only there"):
        trtllm.validate_model_repository(repo)


def test_required_backend_parameters(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="gpu_device_ids"):
        _render(tmp_path, instance_count=2)
    repo = _render(tmp_path / "b", instance_count=2, gpu_device_ids="0;1")
    trtllm.validate_model_repository(repo)
    _edit(repo / LLM / "config.pbtxt", 'string_value: "0;1"', 'string_value: ""')
    with pytest.raises(RepositoryInvalid, match=r"gpu_device_ids must list 2"):
        trtllm.validate_model_repository(repo)
    with pytest.raises(RepositoryInvalid, match=r"missing \['model.py', 'helpers.py'\]"):
        trtllm.validate_model_repository(_render(tmp_path / "c"), require_runtime_files=True)


# --------------------------------------------------------------------------- build + Job


def _cmd(**kw) -> list[str]:
    return trtllm.build_command(base_ref="HuggingFaceTB/SmolLM2-135M-Instruct",
                                adapter_dir="s3://tuneship/runs/r1/adapter",
                                merged_dir="/scratch/merged", repo_dir="/scratch/repo",
                                model_name=NAME, **kw)


def test_build_command_uses_only_pinned_flags() -> None:
    argv = _cmd(lora=True, lora_cache_gpu_memory_fraction=0.07)
    assert argv[:4] == ["python", "-m", "tuneship.trtllm", "prepare"]
    flags = [a for a in argv[4:] if a.startswith("-")]
    assert flags and set(flags) <= trtllm.PREPARE_FLAGS
    assert argv[argv.index("--lora-cache-fraction") + 1] == "0.07"


@pytest.mark.parametrize("flag", ["--gemm_plugin", "--max_seq_len", "--kv-cache-free-gpu-mem-fraction"])
def test_unknown_build_flag_is_refused(flag: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"unknown flag {flag!r}")):
        _cmd(extra_flags=[flag, "1"])


def _job() -> dict:
    return trtllm.render_build_job(
        name="llm_finetune|prepare|manual__2026-07-01|abc", image="registry.example.com/tuneship/trainer:0.2.0",
        command=_cmd(), labels={"tuneship.io/task": "faq-bot"}, env={"TUNESHIP_HOME": "/scratch/t"})


def test_build_job_validates_strictly_and_matches_the_trainer_pool() -> None:
    job = _job()
    trtllm.validate_build_job(job)
    pod = job["spec"]["template"]["spec"]
    base = pod["containers"][0]
    assert base["command"] == _cmd() and "args" not in base
    assert base["resources"]["limits"]["nvidia.com/gpu"] == "1"
    trainer = load_manifests(TRAINER_POD)[0]["spec"]
    assert pod["nodeSelector"] == trainer["nodeSelector"]
    assert pod["tolerations"] == trainer["tolerations"]
    assert len(job["metadata"]["name"]) <= 63


@pytest.mark.parametrize("breakage, match", [
    (lambda j: j["spec"]["template"]["spec"]["containers"][0].update(gpus=1), "gpus"),
    (lambda j: j["spec"].update(backofLimit=0), "backofLimit"),
    (lambda j: j["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].update(
        {"nvidia.com/gpu": "one"}), "resource quantity"),
    (lambda j: j["spec"]["template"]["spec"].update(restartPolicy="Always"), "restartPolicy"),
    (lambda j: j["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu"),
     "nvidia.com/gpu"),
])
def test_broken_job_is_refused(breakage, match: str) -> None:
    job = copy.deepcopy(_job())
    breakage(job)
    with pytest.raises(SpecInvalid, match=match):
        trtllm.validate_build_job(job)


def test_secrets_are_refused_as_literals_in_the_job() -> None:
    with pytest.raises(SpecInvalid, match="secret"):
        trtllm.render_build_job(name="x", image="i", command=_cmd(), env={"HF_TOKEN": "hf_abc"})


def test_the_cluster_runs_the_triton_image_the_repository_is_written_for():
    """One pinned image: the Triton Deployment serves what `prepare` renders for."""
    from tuneship.runners import load_manifests
    from tuneship.trtllm import REPO_ROOT, TRITON_IMAGE

    images = {c["image"] for m in load_manifests(REPO_ROOT / "serving" / "k8s" / "triton.yaml")
              if m.get("kind") == "Deployment" for c in m["spec"]["template"]["spec"]["containers"]}
    assert images == {TRITON_IMAGE}
