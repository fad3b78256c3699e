"""Great Expectations 1.x over the per-row feature frames.

One ephemeral (in-memory) context per validation, analytics off, no default temp Data Docs
site; one pandas datasource with a dataframe asset per split; one suite per split built
from the YAML config; one validation definition per split (its result lands in the
in-memory results store); Data Docs HTML rendered once, into the validation workdir. Each expectation carries `meta.check`/`meta.severity`, which
is how results are mapped back to the checks of the report.

GE is imported lazily (it takes seconds) and only here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneship.data.checks import SuiteConfig

SITE_NAME = "tuneship"


@dataclass
class ExpectationOutcome:
    """One GE expectation result, reduced to what the report needs."""

    check: str
    split: str
    expectation: str
    column: str | None
    success: bool
    figures: dict[str, Any] = field(default_factory=dict)


def _plain(v: Any) -> Any:
    """GE hands back numpy scalars; reports must be plain JSON."""
    if hasattr(v, "item") and callable(v.item):
        try:
            return v.item()
        except (ValueError, TypeError):
            return str(v)
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def _gx():
    """Import GE with analytics forced off before its first import."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    import great_expectations as gx

    return gx


def _expectations(cfg: SuiteConfig, split: str, shape: str) -> list[Any]:
    """The suite for one split, from the config. Thresholds become GE's `mostly`/bounds."""
    import great_expectations.expectations as gxe

    c = cfg.checks
    out: list[Any] = []

    def meta(check: str) -> dict[str, Any]:
        return {"check": check, "severity": cfg.severity(check), "split": split}

    def mostly(check: str) -> float:
        return 1.0 - float(c.get(check).max_fraction)

    if c.schema_.enabled:
        out.append(
            gxe.ExpectColumnValuesToBeInSet(
                column="schema", value_set=[shape], mostly=mostly("schema"), meta=meta("schema")
            )
        )
    if c.required_fields.enabled:
        out.append(
            gxe.ExpectColumnValuesToBeBetween(
                column="empty_fields",
                min_value=0,
                max_value=0,
                mostly=mostly("required_fields"),
                meta=meta("required_fields"),
            )
        )
    if c.role_order.enabled:
        out.append(
            gxe.ExpectColumnValuesToBeBetween(
                column="role_problems",
                min_value=0,
                max_value=0,
                mostly=mostly("role_order"),
                meta=meta("role_order"),
            )
        )
    if c.text_encoding.enabled:
        out.append(
            gxe.ExpectColumnValuesToBeBetween(
                column="bad_chars",
                min_value=0,
                max_value=0,
                mostly=mostly("text_encoding"),
                meta=meta("text_encoding"),
            )
        )
    if c.length.enabled:
        for col, b in (
            ("prompt_tokens", c.length.prompt_tokens),
            ("completion_tokens", c.length.completion_tokens),
        ):
            out.append(
                gxe.ExpectColumnValuesToBeBetween(
                    column=col,
                    min_value=b.min,
                    max_value=b.max,
                    mostly=mostly("length"),
                    meta=meta("length"),
                )
            )
    if c.duplicates.enabled:
        # distinct/rows == 1 - duplicate rate, since repeats are what is not distinct
        out.append(
            gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(
                column="row_key",
                min_value=mostly("duplicates"),
                max_value=1.0,
                meta=meta("duplicates"),
            )
        )
    if c.leakage.enabled and split == "eval":
        out.append(
            gxe.ExpectColumnValuesToBeInSet(
                column="leaked", value_set=[False], mostly=mostly("leakage"), meta=meta("leakage")
            )
        )
    if c.pii.enabled:
        out.append(
            gxe.ExpectColumnValuesToBeBetween(
                column="pii_hits", min_value=0, max_value=0, mostly=mostly("pii"), meta=meta("pii")
            )
        )
    if c.prompt_injection.enabled:
        out.append(
            gxe.ExpectColumnValuesToBeBetween(
                column="injection_hits",
                min_value=0,
                max_value=0,
                mostly=mostly("prompt_injection"),
                meta=meta("prompt_injection"),
            )
        )
    if c.answer_format.enabled:  # on only with a task's AnswerCheck (checks.with_answer_check)
        out.append(
            gxe.ExpectColumnValuesToBeBetween(
                column="answer_misfit",
                min_value=0,
                max_value=0,
                mostly=mostly("answer_format"),
                meta=meta("answer_format"),
            )
        )
    # Quarantine budget: the share of rows failing any error check.
    out.append(
        gxe.ExpectColumnValuesToBeInSet(
            column="quarantined",
            value_set=[False],
            mostly=1.0 - cfg.quarantine.max_fraction,
            meta=meta("quarantine"),
        )
    )
    if c.min_rows.enabled:
        out.append(
            gxe.ExpectColumnSumToBeBetween(
                column="accepted",
                min_value=getattr(c.min_rows, split),
                max_value=None,
                meta=meta("min_rows"),
            )
        )
    return out


def run_expectations(
    frames: dict[str, Any], cfg: SuiteConfig, shape: str, docs_dir: Path
) -> list[ExpectationOutcome]:
    """Validate each split's feature frame; render Data Docs into `docs_dir`."""
    gx = _gx()
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    project_config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={
            SITE_NAME: {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    context = gx.get_context(project_config=project_config, mode="ephemeral")
    datasource = context.data_sources.add_pandas(name="training_data")
    outcomes: list[ExpectationOutcome] = []
    for split, frame in frames.items():
        asset = datasource.add_dataframe_asset(name=f"{split}_rows")
        batch_def = asset.add_batch_definition_whole_dataframe(name=f"{split}_all_rows")
        suite = context.suites.add(
            gx.ExpectationSuite(
                name=f"{cfg.name}.{split}",
                expectations=_expectations(cfg, split, shape),
                meta={"tuneship": {"config": cfg.path, "config_version": cfg.version}},
            )
        )
        vd = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{cfg.name}.{split}", data=batch_def, suite=suite)
        )
        # VD.run stores the result in the (in-memory) results store; Data Docs are built once
        # below for both splits, which is half the rendering cost of a docs action per split.
        suite_result = vd.run(batch_parameters={"dataframe": frame}, result_format="BASIC")
        for r in suite_result.results:
            conf = r.expectation_config
            res = dict(r.result or {})
            figures = {
                k: _plain(res[k])
                for k in (
                    "observed_value",
                    "element_count",
                    "unexpected_count",
                    "unexpected_percent",
                    "missing_count",
                )
                if k in res and res[k] is not None
            }
            if r.exception_info and r.exception_info.get("raised_exception"):
                figures["exception"] = r.exception_info.get("exception_message")
            outcomes.append(
                ExpectationOutcome(
                    check=conf.meta.get("check", conf.type),
                    split=split,
                    expectation=conf.type,
                    column=conf.kwargs.get("column"),
                    success=bool(r.success),
                    figures=figures,
                )
            )
    context.build_data_docs(site_names=[SITE_NAME])
    return outcomes
