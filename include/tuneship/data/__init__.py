"""Training-data validation and versioning (the `llm_data_validation` stage).

    report = validate_dataset("path/to/dataset_dir")      # GE checks, quarantine, Data Docs
    # a task's data gate: answers must pass its declared check (AnswerCheck)
    report = validate_dataset("path/to/dataset_dir", answer_check=AnswerCheck(...))
    if report.accepted:
        version = version_dataset("path/to/dataset_dir", report)
    else:
        raise SomeFailure(report.summary())

Importing this package is cheap: Great Expectations and pandas load only inside
`validate_dataset`.
"""

from __future__ import annotations

from tuneship.data.checks import AnswerCheck, SuiteConfig, load_config
from tuneship.data.reader import DatasetError
from tuneship.data.validate import CheckResult, ValidationReport, validate_dataset
from tuneship.data.version import DatasetVersion, load_manifest, version_dataset

__all__ = [
    "AnswerCheck",
    "CheckResult",
    "DatasetError",
    "DatasetVersion",
    "SuiteConfig",
    "ValidationReport",
    "load_config",
    "load_manifest",
    "validate_dataset",
    "version_dataset",
]
