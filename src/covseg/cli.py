"""`covseg` command line: one command per stage, each a thin binding of `covseg.stages`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from covseg.config import load_params, repo_root

EXIT_BAD_INPUT = 2


def _friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn bad input and failed gates into one clear line on stderr and a non-zero exit."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from covseg.gates import GateFailed
        from covseg.io import InputError

        try:
            return func(*args, **kwargs)
        except InputError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except GateFailed as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_BAD_INPUT)

    return wrapper


def _artifacts(params: dict[str, Any], *parts: str) -> Path:
    return repo_root() / params["artifacts_dir"] / Path(*parts)


profile_option = click.option("--profile", default=None, help="params.yaml profile: tiny | quick | full.")


@click.group()
def main() -> None:
    """Weakly-supervised COVID-19 lesion segmentation for chest CT."""


@main.group()
def data() -> None:
    """Raw data under DVC."""


@data.command("import")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--to", "target", type=click.Path(path_type=Path), default=None, help="Default: ./data")
@_friendly_errors
def data_import(source: Path, target: Path | None) -> None:
    """Copy raw sources (e.g. ../shared/datasets) into data/ and track it with DVC."""
    from covseg.data import import_sources

    target = target or repo_root() / "data"
    count = import_sources(source, target)
    click.echo(f"imported {count} files into {target}")


@main.command()
@profile_option
@_friendly_errors
def ingest(profile: str | None) -> None:
    """Read every source in data/ into artifacts/ingest (cases + manifest.parquet)."""
    from covseg import stages
    from covseg.ingest import summary_table

    params = load_params(profile)
    frame = stages.ingest(repo_root() / params["data_dir"], _artifacts(params, "ingest"), params)
    click.echo(summary_table(frame).to_string(index=False))


@main.command()
@profile_option
@_friendly_errors
def gate0(profile: str | None) -> None:
    """Gate 0 (Great Expectations) on the raw-data manifest."""
    from covseg import stages

    params = load_params(profile)
    result = stages.gate0(_artifacts(params, "ingest"), _artifacts(params, "gates", "gate0.json"), params)
    click.echo(f"gate0 passed: {len(result['checks'])} expectations")


@main.command("params")
@profile_option
def show_params(profile: str | None) -> None:
    """Print the merged parameters of a profile."""
    click.echo(json.dumps(load_params(profile), indent=2))


if __name__ == "__main__":
    main()
