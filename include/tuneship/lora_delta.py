"""Serve a task's LoRA adapter on a shared base model, with no merged copy per task.

`tuneship.compile` ships one merged model per fine-tune: every task pays a full copy of the
base weights on disk and in every Triton instance's memory. Here the base is built once with
*LoRA slots* and each fine-tune ships only its adapter (a few hundred KB against the base's
size), activated per request with ONNX Runtime GenAI's Adapters API
(`og.Adapters(model)`, `adapters.load(path, name)`, `generator.set_active_adapter(adapters, name)`).

How the slots are made (the recipe of Microsoft Olive's ExtractAdapters pass):

1. ONNX Runtime GenAI's model builder with `--extra_options adapter_path=<peft dir>` emits each
   adapted projection as `MatMul(x, W) + MatMul(MatMul(x, A^T), (s*B)^T)` with A and B as
   initializers named `model.layers.<i>.{attn,mlp}.<proj>.lora_{A,B}.MatMul.weight`
   (`builders/base.py: make_matmul_lora`; s = lora_alpha / r is folded into B).
2. Those initializers become graph inputs whose defaults are *empty* tensors (the rank axis
   is 0, symbolic `lora_r` in the input's type): with no adapter active the LoRA path adds
   a zero matrix, so the graph is the base model; a rank-8 or rank-64 adapter fits the same
   slots, so a shared base is tied to the base weights and the adapted modules, not the rank.
3. The adapter's A^T and (s*B)^T go into an `.onnx_adapter` file with onnxruntime's
   `AdapterFormat`; at run time ONNX Runtime GenAI adds the active adapter to the run options
   (`RunOptions::AddActiveLoraAdapter`) and its tensors override the empty defaults.

Serving: `package_for_triton` turns a shared base into a Triton model directory (the merged
build's config.pbtxt, whose optional ADAPTER input names a request's adapter; model.py, which
loads every `adapters/<name>.onnx_adapter` once and activates the named one on each request's
own generator). Every task's adapter then shares one loaded base in one Triton model.

fp32 only: the builder's int4/int8 paths would quantize the LoRA MatMuls too, and a quantized
slot cannot take an fp32 adapter. `build_shared_base` proves on every build that
`export_adapter`'s mapping from peft's tensors to slots reproduces what the builder baked
in, so adapters exported later (no rebuild) are placed exactly as the builder would place them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tuneship import atomic
from tuneship.basemodel import sha256_file
from tuneship.compile import (
    BUILD_FILES,
    TRITON_TEMPLATE_DIR,
    build_genai_model,
    generation_config,
    load_triton_model_module,
    merged_model,
    model_sha256,
    publish_model_dir,
)

# Where model.py (what Triton runs) looks for adapters: one home for the layout.
ADAPTER_SUFFIX: str = load_triton_model_module().ADAPTER_SUFFIX
ADAPTERS_DIR: str = load_triton_model_module().ADAPTERS_DIR
SLOTS_FILE = "lora_slots.json"
RANK_DIM = "lora_r"
# The builder's LoRA weight names (make_matmul_float: the node name with "/" -> ".").
_SLOT_RE = re.compile(r"^model\.layers\.\d+\.(attn|mlp)\.\w+\.lora_[AB]\.MatMul\.weight$")
# peft's saved tensor names for one adapted Linear of a decoder layer.
_PEFT_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
# peft options that change what a LoRA layer computes beyond x A^T B^T * alpha/r; the builder's
# make_matmul_lora implements none of them, so such an adapter is refused, not served wrong.
_UNSUPPORTED = {"use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
                "bias": "none", "fan_in_fan_out": False, "layers_to_transform": None}
MAPPING_TOLERANCE = 1e-6


class AdapterShapeError(ValueError):
    """The adapter does not fit the shared base's LoRA slots (other modules or layers)."""


def adapter_shape(adapter_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """What a shared base is built for: the adapted modules (and, for the record, rank and
    alpha) from adapter_config.json; refuses peft options the builder's LoRA graph ignores."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json; pass OUT_DIR/adapter")
    cfg = json.loads(path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise AdapterShapeError(f"{adapter_dir}: peft_type {cfg.get('peft_type')!r}, only LORA adapters have slots")
    odd = {k: cfg[k] for k, default in _UNSUPPORTED.items() if cfg.get(k, default) not in (default, None, {}, [])}
    if odd:
        raise AdapterShapeError(f"{adapter_dir}: peft options the LoRA graph cannot express: {odd}")
    targets = cfg.get("target_modules")
    return {"target_modules": sorted(targets) if isinstance(targets, list) else targets,
            "r": int(cfg["r"]), "lora_alpha": float(cfg["lora_alpha"]),
            "use_rslora": bool(cfg.get("use_rslora", False))}


def _scaling(shape: dict[str, Any]) -> float:
    """peft's LoRA scaling (the factor the builder folds into B)."""
    r = shape["r"]
    return shape["lora_alpha"] / (r ** 0.5 if shape["use_rslora"] else r)


def adapter_tensors(adapter_dir: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """peft's adapter weights laid out as the shared base's slots expect them: A^T [in, r] and
    (scaling * B)^T [r, out], named as the model builder names its LoRA initializers."""
    from safetensors.numpy import load_file

    shape = adapter_shape(adapter_dir)
    file = Path(adapter_dir) / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{adapter_dir} has no adapter_model.safetensors")
    scale = _scaling(shape)
    out: dict[str, np.ndarray] = {}
    for key, value in load_file(str(file)).items():
        m = _PEFT_RE.search(key)
        if m is None:
            raise AdapterShapeError(f"{file}: tensor {key!r} is not a decoder-layer LoRA A/B weight")
        layer, block, proj, ab = m.groups()
        name = f"model.layers.{layer}.{'attn' if block == 'self_attn' else 'mlp'}.{proj}.lora_{ab}.MatMul.weight"
        weight = value.astype(np.float32) * (scale if ab == "B" else 1.0)
        out[name] = np.ascontiguousarray(weight.T)
    return out


def _slot_the_lora_weights(build_dir: Path, out_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, list[Any]]]:
    """Rewrite the builder's model so its LoRA initializers are overridable graph inputs with
    empty defaults; returns (the builder's baked LoRA weights, slot name -> [dims])."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(build_dir / "model.onnx"))  # with its external data
    graph = model.graph
    baked: dict[str, np.ndarray] = {}
    slots: dict[str, list[Any]] = {}
    for init in graph.initializer:
        if ".lora_A." not in init.name and ".lora_B." not in init.name:
            continue
        if not _SLOT_RE.match(init.name) or init.data_type != TensorProto.FLOAT:
            raise RuntimeError(f"unexpected LoRA initializer from the model builder: {init.name} (type {init.data_type})")
        baked[init.name] = numpy_helper.to_array(init).copy()
        rank_axis = 1 if ".lora_A." in init.name else 0  # A^T is [in, r], B^T is [r, out]
        dims: list[Any] = list(baked[init.name].shape)
        empty = list(dims)
        empty[rank_axis], dims[rank_axis] = 0, RANK_DIM
        # float_data, no raw_data: an empty tensor stays inline (as external data ONNX Runtime
        # fails to read a zero-length extent: "RandomAccessFile::Read: unexpected end of file")
        init.CopyFrom(helper.make_tensor(init.name, TensorProto.FLOAT, empty, []))
        graph.input.append(helper.make_tensor_value_info(init.name, TensorProto.FLOAT, dims))
        slots[init.name] = dims
    if not baked:
        raise RuntimeError("the model builder emitted no LoRA weights; was adapter_path passed?")
    # The builder's shape annotations fix the rank at the adapter's; drop those of the LoRA
    # weights and of the rank-sized intermediate (x A^T) so another rank is not contradicted.
    stale = [v for v in graph.value_info if v.name in baked or "/lora_A/" in v.name]
    for v in stale:
        graph.value_info.remove(v)
    onnx.save_model(model, str(out_dir / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    return baked, slots


def _write_adapter(tensors: dict[str, np.ndarray], path: Path, adapter_version: int, model_version: int) -> None:
    """An `.onnx_adapter` file (onnxruntime's AdapterFormat, flatbuffers), written atomically."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(int(adapter_version))
    fmt.set_model_version(int(model_version))
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fmt.export_adapter(str(tmp))
    os.replace(tmp, path)


def _check_fits(tensors: dict[str, np.ndarray], slots: dict[str, list[Any]], where: str) -> int:
    """Refuse an adapter that does not fill exactly the shared base's slots; returns its rank."""
    missing, extra = sorted(set(slots) - set(tensors)), sorted(set(tensors) - set(slots))
    if missing or extra:
        raise AdapterShapeError(f"{where} does not fit the shared base's LoRA slots: missing {missing[:4]}"
                                f"{'...' if len(missing) > 4 else ''}, not in the base {extra[:4]}"
                                f"{'...' if len(extra) > 4 else ''} ({len(missing)} missing, {len(extra)} extra)")
    ranks = set()
    for name, dims in slots.items():
        got = list(tensors[name].shape)
        fixed = [(g, d) for g, d in zip(got, dims, strict=True) if d != RANK_DIM]
        if any(g != d for g, d in fixed):
            raise AdapterShapeError(f"{where}: {name} has shape {got}, the slot is {dims}")
        ranks.add(got[dims.index(RANK_DIM)])
    if len(ranks) != 1:
        raise AdapterShapeError(f"{where}: LoRA weights of different ranks {sorted(ranks)}")
    return ranks.pop()


def export_adapter(adapter_dir: str | os.PathLike[str], shared_base_dir: str | os.PathLike[str],
                   name: str, *, adapter_version: int = 1) -> dict[str, Any]:
    """Write `<shared base>/adapters/<name>.onnx_adapter` for a peft LoRA adapter that adapts
    the same modules as the shared base's slots (any rank); the base model is not touched."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"adapter name must be [A-Za-z0-9_.-]+, got {name!r}")
    base = Path(shared_base_dir)
    info = json.loads((base / SLOTS_FILE).read_text())
    tensors = adapter_tensors(adapter_dir)
    rank = _check_fits(tensors, info["slots"], str(adapter_dir))
    path = base / ADAPTERS_DIR / f"{name}{ADAPTER_SUFFIX}"
    _write_adapter(tensors, path, adapter_version, info["model_version"])
    return {"name": name, "path": str(path), "bytes": path.stat().st_size, "rank": rank,
            "parameters": int(sum(t.size for t in tensors.values())),
            "adapter_sha256": sha256_file(Path(adapter_dir) / "adapter_model.safetensors")}


def build_shared_base(base_ref: str, adapter_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                      work_dir: str | os.PathLike[str], *, adapter_name: str = "default",
                      max_new_tokens: int = 16) -> dict[str, Any]:
    """Build the base model with LoRA slots for `adapter_dir`'s modules into out_dir (staged
    and renamed into place), plus `adapters/<adapter_name>.onnx_adapter`; returns a report.

    The model builder runs on the plain base with `adapter_path`, so the graph gets one LoRA
    path per adapted projection; the slotted graph is the base model when no adapter is active.
    Later adapters of the same modules go in with `export_adapter`, with no rebuild."""
    shape = adapter_shape(adapter_dir)
    out, work = Path(out_dir), Path(work_dir)
    model, tokenizer = merged_model(base_ref, None)  # the plain base: the builder adds the LoRA path
    work.mkdir(parents=True, exist_ok=True)
    build_dir = work / "build"
    build_s = build_genai_model(model, tokenizer, build_dir, work,
                                extra_options={"adapter_path": Path(adapter_dir).resolve()})

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        baked, slots = _slot_the_lora_weights(build_dir, stage)
        shutil.copy2(build_dir / "genai_config.json", stage / "genai_config.json")
        tokenizer.backend_tokenizer.save(str(stage / "tokenizer.json"))
        (stage / "generation.json").write_text(
            json.dumps(generation_config(tokenizer, model.config, max_new_tokens), indent=2, sort_keys=True))
        # The mapping export_adapter uses must be the builder's: same names, same values.
        mapped = adapter_tensors(adapter_dir)
        _check_fits(mapped, slots, str(adapter_dir))
        mapping_diff = max(float(np.abs(mapped[k] - baked[k]).max()) for k in baked)
        if mapping_diff > MAPPING_TOLERANCE:
            raise RuntimeError(f"export_adapter's tensors differ from the builder's LoRA weights by {mapping_diff:.3g}")
        base_sha = model_sha256(stage)
        model_version = int(base_sha[:7], 16)  # ties an adapter file to the base it was made for
        info = {"base_model": base_ref, "onnx_sha256": base_sha, "model_version": model_version,
                "target_modules": shape["target_modules"], "rank_dim": RANK_DIM, "slots": slots}
        (stage / SLOTS_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        adapter_path = stage / ADAPTERS_DIR / f"{adapter_name}{ADAPTER_SUFFIX}"
        _write_adapter(baked, adapter_path, 1, model_version)
        os.chmod(stage, 0o755)
        atomic.replace_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return {
        "model_dir": str(out),
        "adapter": {"name": adapter_name, "path": str(out / ADAPTERS_DIR / f"{adapter_name}{ADAPTER_SUFFIX}"),
                    "bytes": (out / ADAPTERS_DIR / f"{adapter_name}{ADAPTER_SUFFIX}").stat().st_size,
                    "rank": shape["r"]},
        "base_bytes": sum((out / n).stat().st_size for n in BUILD_FILES[:2]),
        "slots": len(slots),
        "target_modules": shape["target_modules"],
        "onnx_sha256": base_sha,
        "mapping_max_diff": mapping_diff,
        "build_seconds": round(build_s, 2),
    }


def package_for_triton(shared_base_dir: str | os.PathLike[str], repo_dir: str | os.PathLike[str],
                       model_name: str, *, version: int = 1, adapters: list[str] | None = None,
                       deployment: dict[str, Any] | None = None, instances: int = 2) -> dict[str, Any]:
    """Triton's model directory for a shared base: repo_dir/model_name/{config.pbtxt,
    <version>/...} with the slotted base, its `adapters` (None: all of them) and model.py, which
    loads each adapter once and applies the one a request names in its ADAPTER input.

    The config is `compile.render_config`'s, the merged build's (its optional ADAPTER input is
    what selects an adapter here); deployment.json records each adapter's file digest. Staged
    next to its destination and swapped in with a rename, like `compile_for_triton`."""
    if version < 1:
        raise ValueError(f"version must be >= 1 (Triton numbering), got {version}")
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    base = Path(shared_base_dir)
    info = json.loads((base / SLOTS_FILE).read_text())
    available = {p.name[: -len(ADAPTER_SUFFIX)]: p for p in (base / ADAPTERS_DIR).glob(f"*{ADAPTER_SUFFIX}")}
    names = sorted(available) if adapters is None else list(adapters)
    unknown = sorted(set(names) - set(available))
    if unknown or not names:
        raise ValueError(f"adapters {unknown or names} not in {base / ADAPTERS_DIR} (there: {sorted(available)})")
    repo = Path(repo_dir)
    repo.mkdir(parents=True, exist_ok=True)
    final = repo / model_name
    stage = Path(tempfile.mkdtemp(prefix=f".{model_name}.staging-", dir=repo))
    try:
        vdir = stage / str(version)
        (vdir / ADAPTERS_DIR).mkdir(parents=True)
        for name in (*BUILD_FILES, "tokenizer.json", "generation.json", SLOTS_FILE):
            shutil.copy2(base / name, vdir / name)
        for name in names:
            shutil.copy2(available[name], vdir / ADAPTERS_DIR / available[name].name)
        shutil.copy2(TRITON_TEMPLATE_DIR / "model.py", vdir / "model.py")
        if model_sha256(vdir) != info["onnx_sha256"]:
            raise RuntimeError(f"{base}'s model files are not the ones its {SLOTS_FILE} was written for")
        files = {name: {"sha256": sha256_file(vdir / ADAPTERS_DIR / available[name].name),
                        "bytes": available[name].stat().st_size} for name in names}
        deployment = {**(deployment or {}), "base_model": info["base_model"], "onnx_sha256": info["onnx_sha256"],
                      "precision": "fp32", "adapters": files}
        publish_model_dir(stage, final, model_name, version, deployment, instances)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    vfinal = final / str(version)
    return {
        "model_dir": str(final),
        "model_name": model_name,
        "version": version,
        "adapters": sorted(names),
        "onnx_sha256": info["onnx_sha256"],
        "base_bytes": sum((vfinal / n).stat().st_size for n in BUILD_FILES[:2]),
        "adapter_bytes": {n: f["bytes"] for n, f in files.items()},
        "package_bytes": sum(p.stat().st_size for p in final.rglob("*") if p.is_file()),
    }

