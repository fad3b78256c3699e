"""Versioned YAML training recipes, validated into one typed object before any work starts.

A bad recipe must fail in the first second with the key it is about, not after a base model
download or an hour on a GPU pod. `extra="forbid"` turns a typo into an error instead of a
silently ignored setting.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

RECIPE_VERSION = 1


class RecipeError(ValueError):
    """An invalid recipe, override or argument; the message names the key."""


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(gt=0, description="adapter rank")
    alpha: float = Field(gt=0, description="scaling numerator (scale = alpha / r)")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(min_length=1)


class Recipe(BaseModel):
    """One fine-tuning recipe. Exactly what the trainer does is a function of this + data + seed."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, le=RECIPE_VERSION)
    name: str = "unnamed"
    base_model: str = Field(min_length=1)
    lora: LoraSpec
    epochs: float | None = Field(default=None, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    learning_rate: float = Field(gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    batch_size: int = Field(gt=0)
    grad_accum: int = Field(default=1, gt=0)
    max_seq_len: int = Field(default=256, ge=8)
    packing: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="fp32", description="auto: bf16 where the device computes it natively, else fp32 "
        "(tuneship.train.trainer.compute_precision)")
    seed: int = 0
    eval_file: str | None = "eval.jsonl"
    eval_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    checkpoint_every: int = Field(default=0, ge=0, description="optimizer steps; 0 = never")
    keep_checkpoints: int = Field(default=2, gt=0)
    qlora: bool = False
    init_adapter: str | None = Field(
        default=None, description="warm start: a LoRA adapter directory to start from (a drift retrain starts "
        "from the champion's); its rank and target modules must equal `lora`'s")

    @field_validator("base_model")
    @classmethod
    def _base_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a model directory or a Hugging Face model id")
        return v

    @model_validator(mode="after")
    def _length_given(self) -> Recipe:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("set epochs or max_steps (max_steps wins when both are set)")
        return self


def describe_errors(err: ValidationError, *, top: str, schema: str) -> str:
    """A YAML file's validation errors as `key 'a.b': what is wrong; ...` (recipes, task files):
    `top` names the whole file when an error has no key, `schema` where the keys are listed."""
    parts = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"]) or top
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown key (check the spelling against {schema})"
        elif e["type"] == "missing":
            msg = "required key is missing"
        parts.append(f"key '{key}': {msg}")
    return "; ".join(parts)


def _format_validation(err: ValidationError, source: str) -> str:
    return f"invalid recipe {source}: " + describe_errors(err, top="<recipe>", schema="the recipe schema")


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply an override like `lora.r=4` to a nested dict (validation happens afterwards)."""
    keys = dotted.split(".")
    if not all(keys):
        raise RecipeError(f"override key '{dotted}' is malformed; use key=value or a.b=value")
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"override key '{dotted}': '{k}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` from the CLI; the value is read as YAML so numbers and booleans type right."""
    if "=" not in item:
        raise RecipeError(f"override '{item}' must look like key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def validate_recipe(data: Any, source: str = "<dict>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"invalid recipe {source}: top level must be a mapping of keys")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_validation(e, source)) from None


def load_recipe(
    path: str | os.PathLike[str], overrides: dict[str, Any] | None = None
) -> Recipe:
    """Read a YAML recipe, apply dotted overrides, validate. Raises RecipeError."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file {p} not found; pass --recipe with a YAML file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {p} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise RecipeError(f"invalid recipe {p}: top level must be a mapping of keys")
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return validate_recipe(data, str(p))


def recipe_hash(recipe: Recipe) -> str:
    """sha256 of the canonical JSON form: equal recipes hash equal whatever the YAML layout."""
    canon = json.dumps(recipe.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def default_recipe_path(name: str = "tiny-lora") -> Path:
    """Recipes shipped with the package (include/tuneship/train/recipes/<name>.yaml)."""
    return Path(__file__).parent / "recipes" / f"{name}.yaml"
