"""GPU compile path: a TensorRT-LLM (LLM API) model repository for Triton, checked by contract.

Decision: TensorRT-LLM's **LLM API flow** (PyTorch backend) served by Triton's `llmapi`
Python model, not the engine flow and not a plain TensorRT engine.

- TensorRT-LLM's main branch has dropped `convert_checkpoint.py` -> `trtllm-build` and the
  C++ `inflight_batcher_llm` backend; tensorrtllm_backend's own README (commit f526fc5,
  "Remove TensorRT engine backend references") and Triton's LLM guide call it deprecated and
  being removed. Pinning that flow would freeze Tuneship on an image it can never upgrade.
- The LLM API loads the Hugging Face checkpoint Tuneship already produces (the merged model
  of `tuneship.compile.merged_model`; SmolLM2 is a Llama with tied embeddings), so the GPU
  path needs no conversion step to keep in lockstep with the image. In-flight batching,
  the paged KV cache and LoRA are executor features set in `model.yaml`.
- A plain TensorRT engine from our ONNX export is out: the ONNX Runtime GenAI graph uses
  contrib ops (com.microsoft GroupQueryAttention, RotaryEmbedding) that onnx-tensorrt's
  operator matrix (docs/operators.md, ai.onnx domain only) does not implement, and a bare
  engine has no in-flight batching or paged KV cache anyway.

Pinned: TensorRT-LLM 1.2.1 in `nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3`
(triton-inference-server/tensorrtllm_backend branch r26.07,
dockerfile/Dockerfile.triton.trt_llm_backend: TENSORRTLLM_VER=1.2.1, TRT 10.14.1.48). The
templates under serving/triton/trtllm/ are written from TensorRT-LLM
triton_backend/all_models/llmapi/tensorrt_llm/{config.pbtxt,1/model.yaml,1/model.py}.

The repository keeps the gateway's contract: an ensemble named like the served model maps
PROMPT/MAX_TOKENS/STREAM -> COMPLETION onto the llmapi model (`<name>_trtllm`), so a colour
is served the same way on CPU (ONNX Runtime) and GPU (TensorRT-LLM).

No Airflow imports. Heavy imports (torch, peft) only inside the `prepare` CLI.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import string
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tuneship.runners import (
    BASE_CONTAINER_NAME,
    SpecInvalid,
    dns1123_name,
    env_entry,  # shared env rendering (secret refusal) with the trainer pod
    label_value,
    validate_manifest,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_DIR = REPO_ROOT / "serving" / "triton" / "trtllm"
JOB_TEMPLATE = REPO_ROOT / "serving" / "k8s" / "trtllm-build-job.yaml"

TRTLLM_VERSION = "1.2.1"
TRTLLM_TAG = "v1.2.1"
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3"
#: Python-backend code the llmapi model runs; not ours to vendor: `prepare --fetch-runtime`
#: copies it from the pinned tag into <name>_trtllm/1/.
RUNTIME_FILES = ("model.py", "helpers.py")
RUNTIME_URL = (
    "https://raw.githubusercontent.com/NVIDIA/TensorRT-LLM/{tag}/"
    "triton_backend/all_models/llmapi/tensorrt_llm/1/{file}"
)
LLM_SUFFIX = "_trtllm"

# ----------------------------------------------------------------- frozen upstream options
# model.yaml = LLM() arguments (TorchLlmArgs) + triton_config. Only the stable core that reads
# the same in every source consulted: tensorrt_llm/llmapi/llm_args.py (BaseLlmArgs/
# TorchLlmArgs fields: max_batch_size, max_input_len, max_seq_len, max_beam_width,
# max_num_tokens, PeftCacheConfig), tensorrt_llm/lora_helper.py (LoraConfig), the
# nvidia.github.io TorchLlmArgs/KvCacheConfig references (1.1.0rc5 .. 1.4.0rc4) and
# tensorrtllm_backend docs/llmapi.md + README (branch r26.07). Anything else is refused, so a
# misspelt or moved key fails here instead of at model load on a GPU.
LLMAPI_ARGS: frozenset[str] = frozenset({
    "model", "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code",
    "revision", "tokenizer_revision", "dtype", "backend",
    "tensor_parallel_size", "pipeline_parallel_size", "gpus_per_node",
    "moe_tensor_parallel_size", "moe_expert_parallel_size", "enable_attention_dp",
    "max_batch_size", "max_input_len", "max_seq_len", "max_beam_width", "max_num_tokens",
    "enable_chunked_prefill", "guided_decoding_backend",
    "kv_cache_config", "scheduler_config", "lora_config", "peft_cache_config",
})
KV_CACHE_CONFIG_KEYS = frozenset({
    "free_gpu_memory_fraction", "enable_block_reuse", "max_tokens", "max_attention_window",
    "sink_token_length", "host_cache_size", "enable_partial_reuse", "copy_on_partial_reuse",
    "dtype",
})
SCHEDULER_CONFIG_KEYS = frozenset({"capacity_scheduler_policy", "context_chunking_policy"})
CAPACITY_POLICIES = ("GUARANTEED_NO_EVICT", "MAX_UTILIZATION")
LORA_CONFIG_KEYS = frozenset({
    "lora_dir", "lora_ckpt_source", "max_lora_rank", "lora_target_modules",
    "trtllm_modules_to_hf_modules", "max_loras", "max_cpu_loras",
})
PEFT_CACHE_CONFIG_KEYS = frozenset({
    "num_host_module_layer", "num_device_module_layer", "optimal_adapter_size",
    "max_adapter_size", "num_put_workers", "num_ensure_workers", "num_copy_streams",
    "max_pages_per_block_host", "max_pages_per_block_device", "device_cache_percent",
    "host_cache_size", "lora_prefetch_dir",
})
#: model.py reads triton_config["decoupled"] and ["max_batch_size"] unconditionally.
TRITON_CONFIG_KEYS = frozenset({"max_batch_size", "decoupled"})

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PLACEHOLDER = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?")


class RepositoryInvalid(ValueError):
    """A rendered Triton model repository that Triton or TensorRT-LLM would reject."""


def _obj(keys: frozenset[str], props: Mapping[str, Any] | None = None,
         required: Sequence[str] = ()) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False,
            "properties": {k: (props or {}).get(k, {}) for k in sorted(keys)},
            "required": list(required)}


_POS = {"type": "integer", "minimum": 1}
_FRACTION = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
#: JSON Schema of model.yaml derived from the frozen lists above.
MODEL_YAML_SCHEMA: dict[str, Any] = {
    **_obj(LLMAPI_ARGS | {"triton_config"}, {
        "model": {"type": "string", "minLength": 1},
        "tokenizer": {"type": "string", "minLength": 1},
        "backend": {"const": "pytorch"},
        "tensor_parallel_size": _POS, "pipeline_parallel_size": _POS,
        "max_batch_size": _POS, "max_input_len": _POS, "max_seq_len": _POS,
        "max_num_tokens": _POS, "max_beam_width": _POS,
        "kv_cache_config": _obj(KV_CACHE_CONFIG_KEYS, {
            "free_gpu_memory_fraction": _FRACTION, "enable_block_reuse": {"type": "boolean"},
        }, required=["free_gpu_memory_fraction"]),
        "scheduler_config": _obj(SCHEDULER_CONFIG_KEYS, {
            "capacity_scheduler_policy": {"enum": list(CAPACITY_POLICIES)},
        }),
        "lora_config": _obj(LORA_CONFIG_KEYS, {
            "lora_dir": {"type": "array", "minItems": 1,
                         "items": {"type": "string", "minLength": 1}},
            "max_lora_rank": _POS, "max_loras": _POS, "max_cpu_loras": _POS,
        }, required=["lora_dir", "max_lora_rank"]),
        "peft_cache_config": _obj(PEFT_CACHE_CONFIG_KEYS, {
            "device_cache_percent": _FRACTION, "host_cache_size": _POS,
        }, required=["device_cache_percent"]),
        "triton_config": _obj(TRITON_CONFIG_KEYS, {
            # Triton-level batching is unsupported by model.py (upstream: "does not support
            # batching"); in-flight batching happens in the executor.
            "max_batch_size": {"const": 0}, "decoupled": {"type": "boolean"},
        }, required=["max_batch_size", "decoupled"]),
    }, required=["model", "backend", "max_batch_size", "max_seq_len", "kv_cache_config",
                 "triton_config"]),
}


# ----------------------------------------------------------------------------- render


def _template(rel: str, **values: Any) -> str:
    path = TEMPLATE_DIR / rel
    text = string.Template(path.read_text(encoding="utf-8")).substitute(values)
    if m := _PLACEHOLDER.search(text):
        raise RepositoryInvalid(f"{path}: placeholder {m.group(0)} survived rendering")
    return text


def render_model_repository(
    out_dir: str | Path,
    *,
    model_name: str,
    engine_or_checkpoint_dir: str,
    tokenizer_dir: str | None = None,
    max_batch_size: int = 8,
    max_input_len: int = 1024,
    max_output_len: int = 512,
    kv_cache_free_gpu_mem_fraction: float = 0.85,
    lora: bool = False,
    adapter_dir: str | None = None,
    max_lora_rank: int = 64,
    max_loras: int = 4,
    max_cpu_loras: int = 8,
    lora_cache_gpu_memory_fraction: float = 0.05,
    lora_cache_host_memory_bytes: int = 1 << 30,
    instance_count: int = 1,
    gpu_device_ids: str | None = None,
    decoupled: bool = True,
    tensor_parallel_size: int = 1,
    capacity_scheduler_policy: str = "GUARANTEED_NO_EVICT",
) -> dict[str, Any]:
    """Write the complete repository for one served model: `<model_name>` (the gateway-facing
    ensemble) and `<model_name>_trtllm` (the llmapi model: config.pbtxt + 1/model.yaml).

    `engine_or_checkpoint_dir` is the HF checkpoint the LLM API loads as seen from the Triton
    pod (the merged model; with `lora=True` the base, and `adapter_dir` is served unmerged).
    Paths are written as given: they are the serving host's, not this machine's.
    """
    if not _NAME.match(model_name):
        raise ValueError(f"model_name {model_name!r}: use letters, digits, '_', '.', '-'")
    for key, value in (("max_batch_size", max_batch_size), ("max_input_len", max_input_len),
                       ("max_output_len", max_output_len), ("instance_count", instance_count),
                       ("tensor_parallel_size", tensor_parallel_size)):
        if int(value) < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    for key, frac in (("kv_cache_free_gpu_mem_fraction", kv_cache_free_gpu_mem_fraction),
                      ("lora_cache_gpu_memory_fraction", lora_cache_gpu_memory_fraction)):
        if not 0 < float(frac) <= 1:
            raise ValueError(f"{key} must be in (0, 1], got {frac}")
    if capacity_scheduler_policy not in CAPACITY_POLICIES:
        raise ValueError(f"capacity_scheduler_policy must be one of {CAPACITY_POLICIES}")
    if lora and not adapter_dir:
        raise ValueError("lora=True serves the adapter unmerged: pass adapter_dir")
    if instance_count > 1 and not gpu_device_ids:
        raise ValueError("instance_count > 1 needs gpu_device_ids, one GPU set per instance "
                         "separated by ';' (e.g. '0;1')")

    out = Path(out_dir)
    llm_name = f"{model_name}{LLM_SUFFIX}"
    q = json.dumps  # a JSON string is a valid YAML scalar: paths with odd characters stay safe
    lora_block = ""
    if lora:
        lora_block = _template(
            "tensorrt_llm/1/lora.yaml.tmpl", adapter_dir=q(str(adapter_dir)),
            max_lora_rank=int(max_lora_rank), max_loras=int(max_loras),
            max_cpu_loras=int(max_cpu_loras),
            lora_cache_gpu_memory_fraction=float(lora_cache_gpu_memory_fraction),
            lora_cache_host_memory_bytes=int(lora_cache_host_memory_bytes))
    files = {
        out / model_name / "config.pbtxt": _template(
            "ensemble/config.pbtxt.tmpl", name=model_name, llm_model=llm_name),
        out / llm_name / "config.pbtxt": _template(
            "tensorrt_llm/config.pbtxt.tmpl", name=llm_name, instance_count=int(instance_count),
            lora_inputs=_template("tensorrt_llm/lora_inputs.pbtxt.tmpl").rstrip() if lora else "",
            parameters=_template("tensorrt_llm/gpu_device_ids.pbtxt.tmpl",
                                 gpu_device_ids=gpu_device_ids) if instance_count > 1 else ""),
        out / llm_name / "1" / "model.yaml": _template(
            "tensorrt_llm/1/model.yaml.tmpl",
            model=q(str(engine_or_checkpoint_dir)),
            tokenizer=q(str(tokenizer_dir or engine_or_checkpoint_dir)),
            tensor_parallel_size=int(tensor_parallel_size),
            max_batch_size=int(max_batch_size), max_input_len=int(max_input_len),
            max_seq_len=int(max_input_len) + int(max_output_len),
            # One full prompt prefill plus one decode token for every other in-flight sequence
            # per step (chunked prefill is off, so a prompt must fit in one step).
            max_num_tokens=int(max_input_len) + int(max_batch_size),
            capacity_scheduler_policy=capacity_scheduler_policy,
            kv_cache_free_gpu_mem_fraction=float(kv_cache_free_gpu_mem_fraction),
            lora_block=lora_block, decoupled="true" if decoupled else "false"),
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (out / model_name / "1").mkdir(exist_ok=True)  # Triton wants a version dir, even for ensembles
    return {
        "flow": "tensorrt_llm.llmapi",
        "trtllm_version": TRTLLM_VERSION,
        "triton_image": TRITON_IMAGE,
        "repository": str(out),
        "served_model": model_name,
        "llm_model": llm_name,
        "files": sorted(str(p.relative_to(out)) for p in files),
        "runtime_files": [f"{llm_name}/1/{f}" for f in RUNTIME_FILES],
        "decoupled": decoupled,
        "lora": lora,
    }


# --------------------------------------------------------------------------- validate


def _parse_config(path: Path) -> Any:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    cfg = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(path.read_text(encoding="utf-8"), cfg)
    except text_format.ParseError as exc:
        raise RepositoryInvalid(
            f"{path}: {exc} -- not a field of Triton's ModelConfig (model_config.proto); "
            "fix the spelling or remove it") from exc
    return cfg


def _load_model_yaml(path: Path) -> dict[str, Any]:
    import jsonschema
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RepositoryInvalid(f"{path}: not YAML: {exc}") from exc
    errors = sorted(jsonschema.Draft202012Validator(MODEL_YAML_SCHEMA).iter_errors(doc),
                    key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        field = ".".join(str(p) for p in e.path) or "<root>"
        raise RepositoryInvalid(
            f"{path}: {field}: {e.message} -- model.yaml takes TensorRT-LLM {TRTLLM_VERSION} "
            "LLM() arguments (tuneship.trtllm.LLMAPI_ARGS) plus triton_config")
    return doc


def validate_model_repository(repo: str | Path, *, require_runtime_files: bool = False) -> dict[str, Any]:
    """Check a repository as Triton and TensorRT-LLM would at load time; raise RepositoryInvalid
    naming the file and field. Returns {model name: ModelConfig}.

    Every config.pbtxt is parsed with Triton's own protobuf (unknown fields fail); names match
    directories; each model has a version dir; no template placeholder is left in any file;
    ensemble steps name models, tensors and data types that exist; llmapi models' model.yaml
    follows the pinned schema, its decoupled setting is the only one (config.pbtxt must not
    set it) and is on wherever a STREAM tensor reaches it; multi-instance models carry
    gpu_device_ids. `require_runtime_files` also wants the upstream model.py/helpers.py.
    """
    root = Path(repo)
    configs: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in {".pbtxt", ".yaml", ".yml"}:
            if m := _PLACEHOLDER.search(path.read_text(encoding="utf-8")):
                raise RepositoryInvalid(f"{path}: unrendered placeholder {m.group(0)}")
    for cfg_path in sorted(root.glob("*/config.pbtxt")):
        cfg = _parse_config(cfg_path)
        if cfg.name != cfg_path.parent.name:
            raise RepositoryInvalid(f"{cfg_path}: name {cfg.name!r} must equal its directory "
                                    f"{cfg_path.parent.name!r}")
        if not any(p.is_dir() and p.name.isdigit() for p in cfg_path.parent.iterdir()):
            raise RepositoryInvalid(f"{cfg_path.parent}: no version directory (e.g. 1/)")
        configs[cfg.name] = cfg
    if not configs:
        raise RepositoryInvalid(f"{root}: no */config.pbtxt found")

    decoupled: dict[str, bool] = {}
    for name, cfg in configs.items():
        model_yaml = root / name / "1" / "model.yaml"
        if cfg.backend == "python" and model_yaml.is_file():
            decoupled[name] = _check_llmapi_model(root / name, cfg, _load_model_yaml(model_yaml),
                                                  require_runtime_files)
    for name, cfg in configs.items():
        if cfg.platform == "ensemble":
            _check_ensemble(root / name / "config.pbtxt", cfg, configs, decoupled)
    return configs


def _check_llmapi_model(model_dir: Path, cfg: Any, doc: dict[str, Any],
                        require_runtime_files: bool) -> bool:
    cfg_path = model_dir / "config.pbtxt"
    where = model_dir / "1" / "model.yaml"
    if cfg.HasField("model_transaction_policy") or cfg.max_batch_size:
        raise RepositoryInvalid(
            f"{cfg_path}: model_transaction_policy / max_batch_size set here would override "
            f"{where} triton_config (model.py's auto_complete_config); set them only there")
    if not {"text_input", "streaming"} <= {i.name for i in cfg.input} or \
            "text_output" not in {o.name for o in cfg.output}:
        raise RepositoryInvalid(f"{cfg_path}: the llmapi model needs inputs text_input, "
                                "streaming and output text_output (model.py reads them)")
    count = cfg.instance_group[0].count if cfg.instance_group else 1
    if count > 1:
        ids = cfg.parameters["gpu_device_ids"].string_value if "gpu_device_ids" in cfg.parameters else ""
        if len([s for s in ids.split(";") if s.strip()]) != count:
            raise RepositoryInvalid(
                f"{cfg_path}: parameters.gpu_device_ids must list {count} GPU sets separated "
                f"by ';' for instance_group count {count} (model.py refuses to start otherwise)")
    if doc["max_seq_len"] <= doc.get("max_input_len", 0):
        raise RepositoryInvalid(f"{where}: max_seq_len must exceed max_input_len (room to generate)")
    if doc.get("max_num_tokens", 8192) < doc.get("max_input_len", 0) and not doc.get("enable_chunked_prefill"):
        raise RepositoryInvalid(f"{where}: max_num_tokens < max_input_len without "
                                "enable_chunked_prefill: a full prompt could never be scheduled")
    if ("lora_config" in doc) != ("peft_cache_config" in doc):
        raise RepositoryInvalid(f"{where}: lora_config and peft_cache_config go together "
                                "(the adapter cache must be sized when LoRA is on)")
    if "lora_config" in doc and "lora_id" not in {i.name for i in cfg.input}:
        raise RepositoryInvalid(f"{cfg_path}: lora_config is set but the lora_id/lora_name/"
                                "lora_path inputs are not declared; requests could not pick the adapter")
    if require_runtime_files:
        missing = [f for f in RUNTIME_FILES if not (model_dir / "1" / f).is_file()]
        if missing:
            raise RepositoryInvalid(f"{model_dir / '1'}: missing {missing}; run "
                                    f"`python -m tuneship.trtllm prepare --fetch-runtime` "
                                    f"(copies them from TensorRT-LLM {TRTLLM_TAG})")
    return bool(doc["triton_config"]["decoupled"])


def _check_ensemble(cfg_path: Path, cfg: Any, configs: Mapping[str, Any],
                    decoupled: Mapping[str, bool]) -> None:
    tensors = {t.name: t.data_type for t in cfg.input}
    steps = cfg.ensemble_scheduling.step
    if not steps:
        raise RepositoryInvalid(f"{cfg_path}: ensemble_scheduling has no step")
    stream_inputs = {t.name for t in cfg.input if t.name == "STREAM"}
    for i, step in enumerate(steps):
        where = f"{cfg_path}: ensemble_scheduling.step[{i}]"
        target = configs.get(step.model_name)
        if target is None:
            raise RepositoryInvalid(f"{where}: model_name {step.model_name!r} is not in the "
                                    f"repository (have: {sorted(configs)})")
        inputs = {t.name: t.data_type for t in target.input}
        outputs = {t.name: t.data_type for t in target.output}
        for key, value in step.input_map.items():
            if key not in inputs:
                raise RepositoryInvalid(f"{where}: input_map key {key!r} is not an input of "
                                        f"{step.model_name} (has: {sorted(inputs)})")
            if value not in tensors:
                raise RepositoryInvalid(f"{where}: input_map value {value!r} is neither an "
                                        "ensemble input nor an earlier step's output")
            if tensors[value] != inputs[key]:
                raise RepositoryInvalid(f"{where}: {value!r} -> {key!r} changes data type")
            if value in stream_inputs and key == "streaming" and not decoupled.get(step.model_name, False):
                raise RepositoryInvalid(
                    f"{where}: STREAM reaches {step.model_name}, whose model.yaml "
                    "triton_config.decoupled is false; set it true or streaming fails")
        for key, value in step.output_map.items():
            if key not in outputs:
                raise RepositoryInvalid(f"{where}: output_map key {key!r} is not an output of "
                                        f"{step.model_name} (has: {sorted(outputs)})")
            tensors[value] = outputs[key]
    for out in cfg.output:
        if out.name not in tensors:
            raise RepositoryInvalid(f"{cfg_path}: output {out.name!r} is produced by no step")
        if tensors[out.name] != out.data_type:
            raise RepositoryInvalid(f"{cfg_path}: output {out.name!r} data type differs from "
                                    "the step output mapped to it")


# ------------------------------------------------------------------- preparation command

PREPARE_MODULE = "tuneship.trtllm"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PREPARE_MODULE}",
                                description="Prepare a TensorRT-LLM (LLM API) Triton repository.")
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="merge the adapter, render, fetch runtime, validate")
    prep.add_argument("--base", required=True, help="HF base model id or directory")
    prep.add_argument("--adapter", help="LoRA adapter directory (PEFT)")
    prep.add_argument("--merged-dir", required=True, help="where the merged HF checkpoint goes")
    prep.add_argument("--repo", required=True, help="Triton model repository to write")
    prep.add_argument("--model-name", required=True)
    prep.add_argument("--serve-path", help="the checkpoint path as the Triton pod sees it")
    prep.add_argument("--max-batch-size", type=int, default=8)
    prep.add_argument("--max-input-len", type=int, default=1024)
    prep.add_argument("--max-output-len", type=int, default=512)
    prep.add_argument("--kv-cache-fraction", type=float, default=0.85)
    prep.add_argument("--lora", action="store_true", help="serve the adapter unmerged")
    prep.add_argument("--lora-cache-fraction", type=float, default=0.05)
    prep.add_argument("--fetch-runtime", action="store_true",
                      help=f"copy {', '.join(RUNTIME_FILES)} from TensorRT-LLM {TRTLLM_TAG}")
    return p


def _flags_of(parser: argparse.ArgumentParser) -> frozenset[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return frozenset(s for a in sub.choices["prepare"]._actions for s in a.option_strings
                     if s.startswith("--") and s != "--help")


#: The preparation step's flags (the `prepare` parser is their single source).
PREPARE_FLAGS: frozenset[str] = _flags_of(_parser())


def check_flags(argv: Sequence[str]) -> None:
    """Refuse any flag the pinned preparation step does not define (e.g. a trtllm-build flag:
    this flow has no engine build)."""
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and flag not in PREPARE_FLAGS:
            raise ValueError(
                f"unknown flag {flag!r}: `{PREPARE_MODULE} prepare` takes {sorted(PREPARE_FLAGS)} "
                f"(TensorRT-LLM {TRTLLM_VERSION} LLM API flow: no trtllm-build; LLM() options "
                "go in model.yaml)")


def build_command(
    *,
    base_ref: str,
    adapter_dir: str | None,
    merged_dir: str,
    repo_dir: str,
    model_name: str,
    max_batch_size: int = 8,
    max_input_len: int = 1024,
    max_output_len: int = 512,
    kv_cache_free_gpu_mem_fraction: float = 0.85,
    lora: bool = False,
    lora_cache_gpu_memory_fraction: float = 0.05,
    serve_path: str | None = None,
    fetch_runtime: bool = True,
    extra_flags: Sequence[str] = (),
) -> list[str]:
    """The argv the preparation Job runs (the GPU path's stand-in for an engine build)."""
    argv = ["python", "-m", PREPARE_MODULE, "prepare", "--base", base_ref,
            "--merged-dir", merged_dir, "--repo", repo_dir, "--model-name", model_name,
            "--max-batch-size", str(max_batch_size), "--max-input-len", str(max_input_len),
            "--max-output-len", str(max_output_len),
            "--kv-cache-fraction", str(kv_cache_free_gpu_mem_fraction)]
    if adapter_dir:
        argv += ["--adapter", adapter_dir]
    if serve_path:
        argv += ["--serve-path", serve_path]
    if lora:
        argv += ["--lora", "--lora-cache-fraction", str(lora_cache_gpu_memory_fraction)]
    if fetch_runtime:
        argv.append("--fetch-runtime")
    argv += [str(a) for a in extra_flags]
    check_flags(argv)
    _parser().parse_args(argv[3:])  # the real parser agrees (types, required flags)
    return argv


def render_build_job(
    *,
    name: str,
    image: str,
    command: Sequence[str],
    template_path: str | Path = JOB_TEMPLATE,
    labels: Mapping[str, str] | None = None,
    env: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The preparation Job: the platform team's template with this run's name/image/argv/env,
    filled in the way runners.render_trainer_pod fills the trainer pod."""
    import yaml

    template = yaml.safe_load(Path(template_path).read_text(encoding="utf-8"))
    if not isinstance(template, dict) or template.get("kind") != "Job":
        raise SpecInvalid(f"{template_path}: expected a single Job document")
    job = copy.deepcopy(template)
    meta = job.setdefault("metadata", {})
    meta["name"] = dns1123_name(name)
    meta["labels"] = {**(meta.get("labels") or {}),
                      **{k: label_value(str(v)) for k, v in (labels or {}).items()}}
    pod = job["spec"]["template"]["spec"]
    containers = pod.get("containers") or []
    if not containers:
        raise SpecInvalid(f"{template_path}: the template has no containers")
    c = next((c for c in containers if c.get("name") == BASE_CONTAINER_NAME), containers[0])
    c["image"], c["command"] = image, [str(a) for a in command]
    c.pop("args", None)
    new_env = [env_entry(k, v) for k, v in (env or {}).items()]
    c["env"] = [e for e in c.get("env") or [] if e["name"] not in {n["name"] for n in new_env}] + new_env
    return job


def validate_build_job(job: Mapping[str, Any], k8s_version: str = "1.31") -> None:
    """Strict OpenAPI schema (runners.validate_manifest) plus what the API server and this
    Job need: restartPolicy Never/OnFailure, one GPU on the base container."""
    if job.get("kind") != "Job" or job.get("apiVersion") != "batch/v1":
        raise SpecInvalid("expected apiVersion batch/v1, kind Job")
    validate_manifest(job, k8s_version)
    pod = job["spec"]["template"]["spec"]
    if pod.get("restartPolicy") not in ("Never", "OnFailure"):
        raise SpecInvalid("Job spec.template.spec.restartPolicy must be Never or OnFailure")
    base = next((c for c in pod["containers"] if c.get("name") == BASE_CONTAINER_NAME), None)
    gpu = ((base or {}).get("resources") or {}).get("limits", {}).get("nvidia.com/gpu")
    if base is None or str(gpu) in ("None", "0"):
        raise SpecInvalid("Job base container needs resources.limits['nvidia.com/gpu']")


# ------------------------------------------------------------------------------- CLI


def _prepare(args: argparse.Namespace) -> dict[str, Any]:
    import hashlib
    import urllib.request

    merged = Path(args.merged_dir)
    if not args.lora:  # idempotent: a retry finds the merged checkpoint and reuses it
        if not (merged / "config.json").is_file():
            from tuneship.compile import merged_model

            model, tokenizer = merged_model(args.base, args.adapter)
            model.save_pretrained(str(merged))
            tokenizer.save_pretrained(str(merged))
        checkpoint = args.serve_path or str(merged)
    else:
        checkpoint = args.serve_path or args.base
    result = render_model_repository(
        args.repo, model_name=args.model_name, engine_or_checkpoint_dir=checkpoint,
        max_batch_size=args.max_batch_size, max_input_len=args.max_input_len,
        max_output_len=args.max_output_len, kv_cache_free_gpu_mem_fraction=args.kv_cache_fraction,
        lora=args.lora, adapter_dir=args.adapter,
        lora_cache_gpu_memory_fraction=args.lora_cache_fraction)
    if args.fetch_runtime:
        hashes = {}
        for f in RUNTIME_FILES:
            url = RUNTIME_URL.format(tag=TRTLLM_TAG, file=f)
            with urllib.request.urlopen(url, timeout=60) as r:  # noqa: S310 (fixed https URL)
                data = r.read()
            (Path(args.repo) / result["llm_model"] / "1" / f).write_bytes(data)
            hashes[f] = hashlib.sha256(data).hexdigest()
        result["runtime_sha256"] = hashes
    validate_model_repository(args.repo, require_runtime_files=args.fetch_runtime)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    print(json.dumps(_prepare(args), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
