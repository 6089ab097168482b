"""The README as an entry point stays true: its map names every module and folder that exists (and only
those), and each "How to change" recipe names at most three files, all of which exist."""

from __future__ import annotations

import re
import subprocess

from helpers import REPO_ROOT

README = REPO_ROOT / "README.md"


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def _first_cells(section: str) -> list[str]:
    """The first cell of every table row (without the header rows)."""
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [row.split("|")[1].strip() for row in rows if not row.startswith(("| path ", "| module "))]


def test_map_names_every_library_module_once() -> None:
    cells = _first_cells(_section("Map of the code"))
    listed = [c.strip("`") for c in cells if re.fullmatch(r"`\w+\.py`", c)]
    modules = sorted(p.name for p in (REPO_ROOT / "src" / "covseg").glob("*.py") if p.name != "__init__.py")
    assert sorted(listed) == modules


def test_map_names_every_top_level_folder() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    folders = {line.split("/")[0] for line in tracked.stdout.splitlines() if "/" in line}
    cells = _first_cells(_section("Map of the code"))
    named = {path.strip("`").split("/")[0] for cell in cells for path in cell.split(", ") if "/" in path}
    assert sorted(folders - named) == [], "top-level folders without a line in the map"
    assert sorted(named - folders) == [], "the map names folders that are not in the repository"


def test_each_recipe_names_at_most_three_existing_files() -> None:
    section = _section("How to change")
    recipes = re.findall(r"^\*\*(.+?)\*\* \((.+?)\):$", section, flags=re.MULTILINE)
    assert [title for title, _ in recipes] == [
        "Add a data source",
        "Change the Grad-CAM layer",
        "Change the promotion rule",
    ]
    for title, files in recipes:
        paths = re.findall(r"`([\w./-]+)`", files.split(";")[0])
        assert 1 <= len(paths) <= 3, title
        for path in paths:
            assert (REPO_ROOT / path).is_file(), f"{title}: {path} does not exist"
