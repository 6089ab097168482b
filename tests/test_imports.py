"""The house rules of the import graph, checked on the source (ast) and in fresh interpreters.

- The library (``src/covseg``) never imports its bindings (``components/``, ``pipelines/``); the one binding
  that lives in the package, the CLI (``covseg.cli``, the console script), may.
- No import cycle among the project's modules. Imports inside functions count too: a lazy import is still
  a dependency, and the cycle this rule was written for (ingest component -> covseg.pipeline ->
  pipelines.training -> ingest component) ran through one.
- Light commands stay light: ``covseg --help``, ``covseg params``, ``covseg pipeline compile`` and the
  modules behind them never import SimpleITK, torch, MONAI or Great Expectations.
In the spirit of kubeflow/pipelines' ``check_imports.py``; each checker also runs on planted bad code.
"""

from __future__ import annotations

import ast
import graphlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import BIN, REPO_ROOT, cli_env, make_project

PACKAGES = {
    "covseg": REPO_ROOT / "src" / "covseg",
    "components": REPO_ROOT / "components",
    "pipelines": REPO_ROOT / "pipelines",
}
BINDINGS = ("components", "pipelines")
BINDINGS_IN_THE_LIBRARY = {"covseg.cli"}
"""Bindings that live inside the package: the CLI is the console script's entry point."""
HEAVY = ("SimpleITK", "torch", "monai", "great_expectations")


def _modules(packages: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the given package folders."""
    found = {}
    for package, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imported_names(module: str, path: Path) -> Iterator[str]:
    """Every module name `module` imports, wherever the import stands; `importlib.import_module("x")` too."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            yield str(node.args[0].value)


def import_graph(packages: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (names that are not project modules are dropped)."""
    modules = _modules(packages)
    graph = {}
    for module, path in modules.items():
        graph[module] = {name for name in _imported_names(module, path) if name in modules and name != module}
    return graph


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """``library -> binding`` edges: a covseg module importing from components/ or pipelines/."""
    return sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.split(".")[0] == "covseg" and module not in BINDINGS_IN_THE_LIBRARY
        for target in targets
        if target.split(".")[0] in BINDINGS
    )


def import_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle (``[a, b, ..., a]``), or [] when the graph has none."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        return list(err.args[1])
    return []


def test_the_library_never_imports_its_bindings() -> None:
    graph = import_graph(PACKAGES)
    assert {"covseg.stages", "components.ingest", "pipelines.train_pipeline"} <= graph.keys()
    assert layering_violations(graph) == []


def test_no_import_cycle_among_the_project_modules() -> None:
    graph = import_graph(PACKAGES)
    assert "components.ingest" in graph["pipelines.train_pipeline"]  # the graph sees the bindings' edges
    assert import_cycle(graph) == []


def _plant(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return {package: root / package for package in ("covseg", "components", "pipelines")}


def test_the_checkers_catch_a_planted_cycle_and_a_planted_binding_import(tmp_path: Path) -> None:
    """The cycle this file was written for, rebuilt from lazy imports, and a library module reaching out."""
    packages = _plant(
        tmp_path,
        {
            "covseg/__init__.py": "",
            "covseg/pipeline.py": "def compile():\n    import importlib\n"
            "    return importlib.import_module('pipelines.training')\n",
            "covseg/cli.py": "from pipelines import training\n",
            "components/__init__.py": "",
            "components/ingest.py": "def ingest():\n    from covseg.pipeline import fetch_data\n",
            "pipelines/__init__.py": "",
            "pipelines/training.py": "from components.ingest import ingest\nfrom .helpers import tidy\n",
            "pipelines/helpers.py": "def tidy():\n    pass\n",
        },
    )
    graph = import_graph(packages)
    assert graph["pipelines.training"] == {
        "components.ingest",
        "pipelines.helpers",
    }  # relative import resolved
    assert layering_violations(graph) == ["covseg.pipeline -> pipelines.training"]  # not the CLI's import
    cycle = import_cycle(graph)
    assert cycle[0] == cycle[-1] and set(cycle) == {
        "covseg.pipeline",
        "pipelines.training",
        "components.ingest",
    }


# --- light commands --------------------------------------------------------------------------------------------

CLI_PROBE = """
import json, sys
args, watch = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sys.argv = ["covseg", *args]
outcome = 0
try:
    from covseg.cli import main
    main()
except SystemExit as exit_:
    outcome = exit_.code or 0
except BaseException as exc:
    outcome = type(exc).__name__
finally:
    print(json.dumps({"outcome": outcome, "heavy": sorted(m for m in sys.modules if m.split(".")[0] in watch)}))
"""
MODULE_PROBE = """
import importlib, json, sys
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in json.loads(sys.argv[2]))))
"""


def _last_json_line(result: subprocess.CompletedProcess[str]) -> object:
    assert result.stdout.strip(), result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def cli_probe(project: Path, *args: str) -> tuple[object, list[str]]:
    """(exit code or exception name, heavy modules loaded) of one CLI invocation in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", CLI_PROBE, json.dumps(args), json.dumps(HEAVY)],
        cwd=project,
        env=cli_env(project),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = _last_json_line(result)
    return report["outcome"], report["heavy"]


def heavy_modules(*modules: str) -> list[str]:
    """Heavy modules loaded by importing `modules` in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", MODULE_PROBE, json.dumps(modules), json.dumps(HEAVY)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return _last_json_line(result)


LIGHT_COMMANDS = [
    ("--help",),
    ("params", "--profile", "tiny"),
    ("pipeline", "compile", "--out", "compiled.yaml"),
    ("schedule", "create", "--help"),
    ("audit", "--help"),
    ("data", "import", "--help"),
]


@pytest.mark.parametrize("args", LIGHT_COMMANDS, ids=lambda args: " ".join(args[:2]))
def test_light_commands_import_no_heavy_library(args: tuple[str, ...], tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    assert cli_probe(project, *args) == (0, [])
    if args[0] == "pipeline":
        assert (project / "compiled.yaml").stat().st_size > 0  # it really compiled


LIGHT_MODULES = (
    "covseg.cli",
    "covseg.config",
    "covseg.errors",
    "covseg.data",
    "covseg.gpu_pool",
    "covseg.checkpoint_store",
    "covseg.schedule",
    "covseg.tracking",
    "covseg.audit",
    "pipelines.runner",
    "pipelines.train_pipeline",
    *sorted(m for m in _modules(PACKAGES) if m.startswith("components")),
)
"""Modules whose top must stay light: the CLI, configuration, scheduling, and everything compiling needs."""


def test_light_modules_import_no_heavy_library() -> None:
    # One interpreter for all: a heavy import anywhere fails the test, naming what got loaded.
    assert heavy_modules(*LIGHT_MODULES) == []


def test_the_light_checks_see_heavy_imports(tmp_path: Path) -> None:
    assert "SimpleITK" in heavy_modules("covseg.stages")  # the stages read CT
    project = make_project(tmp_path / "project")
    outcome, heavy = cli_probe(project, "evaluate", "--model", "nowhere", "--data", "nowhere")
    assert outcome != 0 and {"torch", "SimpleITK"} <= set(heavy)


def test_renamed_stage_command_keeps_a_hidden_deprecated_alias(trained_tiny, tmp_path: Path) -> None:
    """`covseg evaluate-stage` (was `evaluate-pipeline`): the old name still runs, after a one-line notice."""
    project = make_project(tmp_path / "project")
    artifacts = project / "artifacts"
    artifacts.mkdir()
    for stage in ("ingest", "lungs", "coarse", "mil", "segment", "refine"):
        (artifacts / stage).symlink_to(trained_tiny.stage(stage), target_is_directory=True)
    env = cli_env(project, COVSEG_TRACKING="0")
    listing = subprocess.run(
        [str(BIN / "covseg"), "--help"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "evaluate-stage" in listing and "evaluate-pipeline" not in listing
    old = subprocess.run(
        [str(BIN / "covseg"), "evaluate-pipeline", "--profile", "tiny"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert old.returncode == 0, old.stderr[-3000:]
    notices = [line for line in old.stderr.splitlines() if "deprecated" in line]
    assert notices == [
        "DeprecationWarning: The command 'evaluate-pipeline' is deprecated. Use 'covseg evaluate-stage'."
    ], old.stderr[-2000:]
    assert "threshold 0.5" in old.stdout
    assert json.loads((artifacts / "evaluate" / "metrics.json").read_text())["final"]["n_slices"] > 0
