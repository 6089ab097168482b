"""Data-quality gates with Great Expectations 1.x (ephemeral context, analytics off).

A gate is a list of checks, each an expectation on one named table of per-slice statistics. `run_gate`
validates every table, always writes a JSON report, and raises :class:`GateFailed` naming each failed
expectation, so the pipeline stops before the next stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from covseg import telemetry
from covseg.errors import GateFailed
from covseg.io import atomic_write_text


@dataclass(frozen=True)
class Check:
    """One expectation: a GX expectation class name and its arguments, on the table `table`."""

    table: str
    expectation: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """The check in one line: ``table: Expectation(kwargs)``."""
        args = ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.table}: {self.expectation}({args})"


def _summary(result: Any) -> str:
    info = result.result or {}
    if "unexpected_count" in info:
        sample = info.get("partial_unexpected_list", [])[:5]
        return f"{info['unexpected_count']} unexpected value(s), e.g. {sample}"
    return f"observed {info.get('observed_value')!r}"


def run_gate(name: str, tables: dict[str, pd.DataFrame], checks: list[Check], report: str | Path) -> dict:
    """Validate `tables` against `checks`; write the JSON report; raise GateFailed on any failure."""
    telemetry.disable()
    import great_expectations as gx  # heavy (3 s): import only when a gate runs
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    datasource = context.data_sources.add_pandas(f"covseg-{name}")
    records, failures = [], []
    for table_name, frame in tables.items():
        table_checks = [c for c in checks if c.table == table_name]
        if not table_checks:
            continue
        suite = gx.ExpectationSuite(name=f"{name}-{table_name}")
        for check in table_checks:
            suite.add_expectation(getattr(gx.expectations, check.expectation)(**check.kwargs))
        suite = context.suites.add(suite)
        batch = datasource.add_dataframe_asset(table_name).add_batch_definition_whole_dataframe("all")
        result = batch.get_batch(batch_parameters={"dataframe": frame}).validate(suite)
        for check, outcome in zip(table_checks, result.results, strict=True):
            detail = _summary(outcome) if not outcome.success else "ok"
            records.append(
                {
                    "check": check.describe(),
                    "success": bool(outcome.success),
                    "detail": detail,
                    "rows": len(frame),
                }
            )
            if not outcome.success:
                failures.append(f"{check.describe()}: {detail}")
    missing = sorted({c.table for c in checks} - set(tables))
    failures += [f"{t}: table missing" for t in missing]
    body = {"gate": name, "success": not failures, "checks": records, "failures": failures}
    report = Path(report)
    atomic_write_text(report, json.dumps(body, indent=2, default=str))
    if failures:
        raise GateFailed(name, failures, report)
    return body


def gate0_checks(params: dict[str, Any]) -> list[Check]:
    """Gate 0 (raw data): intensity ranges per domain, plausible spacing, labels, no split leaks."""
    g = params["gate0"]
    spacing = {"min_value": g["spacing_min_mm"], "max_value": g["spacing_max_mm"]}
    checks = [
        Check("slices", "ExpectColumnValuesToBeUnique", {"column": "case_id"}),
        Check(
            "slices", "ExpectColumnValuesToBeBetween", {"column": "nan_count", "min_value": 0, "max_value": 0}
        ),
        Check("hu", "ExpectColumnValuesToBeBetween", {"column": "pix_min", "min_value": g["hu_min"]}),
        Check("hu", "ExpectColumnValuesToBeBetween", {"column": "pix_max", "max_value": g["hu_max"]}),
        Check("8bit", "ExpectColumnValuesToBeBetween", {"column": "pix_min", "min_value": 0}),
        Check("8bit", "ExpectColumnValuesToBeBetween", {"column": "pix_max", "max_value": 255}),
        Check("labelled", "ExpectColumnValuesToBeInSet", {"column": "label", "value_set": [0, 1]}),
        Check("labelled", "ExpectColumnValuesToBeInSet", {"column": "split", "value_set": ["train", "val"]}),
        Check("eval", "ExpectColumnValuesToBeInSet", {"column": "label", "value_set": [-1]}),
        Check("eval", "ExpectColumnValueLengthsToBeBetween", {"column": "mask_file", "min_value": 1}),
        Check("hashes", "ExpectColumnMaxToBeBetween", {"column": "n_splits", "max_value": 1}),
        Check("volumes", "ExpectColumnMaxToBeBetween", {"column": "n_splits", "max_value": 1}),
    ]
    checks += [
        Check("hu", "ExpectColumnValuesToBeBetween", {"column": f"spacing_{axis}", **spacing})
        for axis in "xyz"
    ]
    return checks


def gate0_tables(manifest: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The tables gate 0 checks, derived from the manifest."""
    raw_hash = manifest["sha256"].str.split(":").str[0]
    return {
        "slices": manifest,
        "hu": manifest[manifest["domain"] == "hu"],
        "8bit": manifest[manifest["domain"] == "8bit"],
        "labelled": manifest[manifest["role"] == "train"],
        "eval": manifest[manifest["role"] == "eval"],
        "hashes": manifest.assign(h=raw_hash)
        .groupby("h")["split"]
        .nunique()
        .rename("n_splits")
        .reset_index(),
        "volumes": manifest.groupby("volume_id")["split"].nunique().rename("n_splits").reset_index(),
    }


def label_gate_checks(gate: dict[str, Any]) -> list[Check]:
    """Gates A and B: per-slice statistics of coarse / fine labels, plus a model-quality floor."""
    return [
        Check(
            "labels",
            "ExpectColumnMeanToBeBetween",
            {"column": "area_fraction_of_lung", "min_value": gate["area_min"], "max_value": gate["area_max"]},
        ),
        Check(
            "labels", "ExpectColumnValuesToBeBetween", {"column": "inside_lung_fraction", "min_value": 1.0}
        ),
        Check(
            "labels", "ExpectColumnMeanToBeBetween", {"column": "empty", "max_value": gate["max_empty_share"]}
        ),
        Check("labels", "ExpectColumnValuesToBeInSet", {"column": "label", "value_set": [1]}),
        Check(
            "quality",
            "ExpectColumnValuesToBeBetween",
            {"column": "value", "min_value": gate["quality_floor"]},
        ),
    ]


def label_gate_tables(stats: pd.DataFrame, quality: dict[str, float]) -> dict[str, pd.DataFrame]:
    """Tables for gates A/B: the label statistics of training/validation slices and the quality numbers."""
    labels = stats[stats["split"].isin(["train", "val"])].assign(empty=lambda f: f["empty"].astype(float))
    return {
        "labels": labels,
        "quality": pd.DataFrame({"metric": list(quality), "value": list(quality.values())}),
    }
