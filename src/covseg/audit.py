"""Dataset-version audits of the model registry.

:func:`audit_versions` lists every registered version of a model with the data it was trained on (the
``data_md5`` tag, i.e. the md5 in ``data.dvc``, and the ``git_commit`` tag), its ``params_hash`` and
``profile``, its Dice figures (version tags ``eval_dice`` / ``candidate_dice`` / ``champion_dice`` plus the
source run's metrics), its aliases and its promotion decision.

:func:`audit_diff` answers "which data files changed between the data two versions were trained on": it
runs ``dvc diff --json <commit1> <commit2>`` in the repository on the versions' ``git_commit`` tags and keeps
the files under the data directory. It also reads ``data.dvc`` at each commit and warns when that md5 is
not the version's ``data_md5`` tag (the model was trained on data that was not committed as such).

Versions are named by number (``3``, ``v3``) or by alias (``champion``, ``@challenger``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covseg.errors import InputError
from covseg.registry import (
    REGISTERED_NAME,
    TAG_CANDIDATE_DICE,
    TAG_CHAMPION_BEFORE,
    TAG_CHAMPION_DICE,
    TAG_CONFIDENCE,
    TAG_DECISION,
    TAG_DIFFERENCE,
    TAG_DIFFERENCE_HIGH,
    TAG_DIFFERENCE_LOW,
    TAG_DISPLACED_BY,
    TAG_MARGIN,
    TAG_PAIRED_SLICES,
    TAG_REASON,
)
from covseg.telemetry import TELEMETRY_OFF

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

DICE_TAGS = ("eval_dice", TAG_CANDIDATE_DICE, TAG_CHAMPION_DICE)
EVIDENCE_TAGS = {
    "dice_difference": TAG_DIFFERENCE,
    "dice_difference_low": TAG_DIFFERENCE_LOW,
    "dice_difference_high": TAG_DIFFERENCE_HIGH,
    "dice_difference_confidence": TAG_CONFIDENCE,
    "promotion_margin": TAG_MARGIN,
}
UNKNOWN = ("", "unknown", "none")
DVC_TIMEOUT_S = 300


class AuditError(InputError):
    """An audit cannot be answered (version without lineage tags, unknown commit, dvc failure); one line."""

    def __init__(self, subject: str, problem: str):
        super().__init__(subject, problem)


# --------------------------------------------------------------------------------------------------
# audit_versions
# --------------------------------------------------------------------------------------------------


def _float_tag(value: str | None) -> float | None:
    try:
        x = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _tag(tags: dict[str, str], key: str) -> str | None:
    value = tags.get(key)
    return None if value is None or value.strip().lower() in UNKNOWN else value


def _all_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    escaped = name.replace("'", "\\'")
    found: list[ModelVersion] = []
    token = None
    while True:
        page = client.search_model_versions(f"name = '{escaped}'", max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return sorted(found, key=lambda mv: int(mv.version))


def _run_metrics(client: MlflowClient, run_id: str | None) -> dict[str, float]:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return {}
    try:
        return dict(client.get_run(run_id).data.metrics)
    except MlflowException:  # run deleted / not visible from this store
        return {}


def _aliases(client: MlflowClient, name: str) -> dict[str, list[str]]:
    """Map each version to its aliases (search results do not carry aliases; the registered model does)."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException:
        return {}
    out: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        out.setdefault(str(version), []).append(alias)
    return out


def _model_format(mv: ModelVersion) -> str | None:
    """How the version's model is stored, read from its MLmodel.

    ``code`` (model from code), ``pickle`` (a CloudPickle of the PythonModel, before models from code),
    ``other``; None when the MLmodel cannot be read.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.models import get_model_info

    from covseg.serving import storage_format

    try:
        info = get_model_info(f"models:/{mv.name}/{mv.version}")
    except (MlflowException, OSError):
        return None
    return storage_format(info.flavors.get("python_function", {}))


def _row(client: MlflowClient, mv: ModelVersion, aliases: list[str]) -> dict[str, Any]:
    tags = dict(mv.tags or {})
    created = None
    if mv.creation_timestamp:
        created = datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC).isoformat(timespec="seconds")
    return {
        "name": mv.name,
        "version": str(mv.version),
        "aliases": sorted(set(aliases) | set(mv.aliases or [])),
        "status": mv.status,
        "created": created,
        "run_id": mv.run_id,
        "git_commit": _tag(tags, "git_commit"),
        "data_md5": _tag(tags, "data_md5"),
        "params_hash": _tag(tags, "params_hash"),
        "profile": _tag(tags, "profile"),
        "pipeline_run_id": _tag(tags, "pipeline_run_id"),
        **{key: _float_tag(tags.get(key)) for key in DICE_TAGS},
        "promotion_decision": _tag(tags, TAG_DECISION),
        "promotion_reason": _tag(tags, TAG_REASON),
        "champion_version_before": _tag(tags, TAG_CHAMPION_BEFORE),
        "displaced_by_version": _tag(tags, TAG_DISPLACED_BY),
        **{key: _float_tag(tags.get(tag)) for key, tag in EVIDENCE_TAGS.items()},
        "paired_slices": int(tags[TAG_PAIRED_SLICES]) if tags.get(TAG_PAIRED_SLICES, "").isdigit() else None,
        "model_format": _model_format(mv),
        "run_metrics": _run_metrics(client, mv.run_id),
    }


def audit_versions(client: MlflowClient, name: str = REGISTERED_NAME) -> list[dict[str, Any]]:
    """Every registered version of ``name`` (oldest first) with its data version, params, metrics and aliases.

    Args:
        client: MLflow client of the registry.
        name: registered model name.

    Returns:
        One dict per version: ``name, version, aliases, status, created, run_id, git_commit, data_md5,
        params_hash, profile, pipeline_run_id, eval_dice, candidate_dice, champion_dice, promotion_decision,
        promotion_reason, champion_version_before, displaced_by_version, dice_difference,
        dice_difference_low, dice_difference_high, dice_difference_confidence, promotion_margin,
        paired_slices, model_format, run_metrics`` (the ``dice_difference*`` fields: the paired per-slice
        Dice gain over the champion it was compared with, and its confidence interval).
        Missing tags are None (``unknown`` / ``none`` tags too); ``run_metrics`` is ``{}`` when the source
        run is gone; ``model_format`` is ``code``, ``pickle`` (logged before models from code: covseg loads
        it from its weight files, never from the pickle) or None when its MLmodel cannot be read.
    """
    versions = _all_versions(client, name)
    aliases = _aliases(client, name) if versions else {}
    return [_row(client, mv, aliases.get(str(mv.version), [])) for mv in versions]


def _cell(value: Any, width: int | None = None) -> str:
    if value is None or value == []:
        text = "-"
    elif isinstance(value, float):
        text = f"{value:.4f}"
    elif isinstance(value, list):
        text = ",".join(str(v) for v in value)
    else:
        text = str(value)
    return text[:width] if width else text


def _dice(row: dict[str, Any]) -> float | None:
    """The version's own Dice: the promotion's candidate Dice, else the registration-time eval Dice."""
    for key in ("candidate_dice", "eval_dice"):
        if row.get(key) is not None:
            return row[key]
    return row.get("run_metrics", {}).get("eval.dice")


def _gain(row: dict[str, Any]) -> str:
    """The paired Dice gain over the champion with its interval, e.g. ``+0.0310 [+0.0120, +0.0500]``."""
    diff, low, high = (row.get(k) for k in ("dice_difference", "dice_difference_low", "dice_difference_high"))
    if diff is None:
        return "-"
    return (
        f"{diff:+.4f} [{low:+.4f}, {high:+.4f}]" if low is not None and high is not None else f"{diff:+.4f}"
    )


def format_audit(rows: list[dict[str, Any]]) -> str:
    """A readable table of :func:`audit_versions` rows, then which versions share each data version."""
    if not rows:
        return "no registered versions"
    header = (
        "version",
        "aliases",
        "decision",
        "dice",
        "champ_dice",
        "gain [CI]",
        "margin",
        "data_md5",
        "commit",
        "params_hash",
        "profile",
        "format",
        "created",
    )
    table = [header]
    for r in rows:
        table.append(
            (
                f"v{r['version']}",
                _cell(r["aliases"]),
                _cell(r["promotion_decision"]),
                _cell(_dice(r)),
                _cell(r["champion_dice"]),
                _gain(r),
                _cell(r.get("promotion_margin")),
                _cell(r["data_md5"], 12),
                _cell(r["git_commit"], 8),
                _cell(r["params_hash"]),
                _cell(r["profile"]),
                _cell(r.get("model_format")),
                _cell(r["created"]),
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table]
    by_data: dict[str, list[str]] = {}
    for r in rows:
        by_data.setdefault(r["data_md5"] or "unknown", []).append(f"v{r['version']}")
    lines.append("")
    plural = lambda n, word: f"{n} {word}" + ("" if n == 1 else "s")  # noqa: E731
    lines.append(
        f"{rows[0]['name']}: {plural(len(rows), 'version')} on {plural(len(by_data), 'data version')}"
    )
    lines += [f"  data {md5}: {', '.join(versions)}" for md5, versions in by_data.items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# audit_diff
# --------------------------------------------------------------------------------------------------


def _resolve(client: MlflowClient, name: str, ref: str | int) -> ModelVersion:
    """A version by number (``3``, ``v3``) or alias (``champion``, ``@champion``)."""
    from mlflow.exceptions import MlflowException

    text = str(ref).strip()
    number = text[1:] if text[:1] in ("v", "V") and text[1:].isdigit() else text
    try:
        if number.isdigit():
            return client.get_model_version(name, number)
        return client.get_model_version_by_alias(name, text.lstrip("@"))
    except MlflowException as exc:
        raise AuditError(f"{name} {text}", "no such registered model version or alias") from exc


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)


def _commit_of(mv: ModelVersion, repo: Path) -> str:
    subject = f"{mv.name} v{mv.version}"
    commit = _tag(dict(mv.tags or {}), "git_commit")
    if commit is None:
        raise AuditError(subject, "has no git_commit tag; its data version cannot be traced")
    found = _git(repo, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    if found.returncode != 0:
        raise AuditError(subject, f"git_commit {commit} is not a commit of the repository {repo}")
    return found.stdout.strip()


def _md5_at(repo: Path, commit: str, dvc_file: str) -> str | None:
    """The md5 of the first out of ``dvc_file`` at ``commit`` (None when the file is not there)."""
    import yaml

    shown = _git(repo, "show", f"{commit}:{dvc_file}")
    if shown.returncode != 0:
        return None
    try:
        outs = (yaml.safe_load(shown.stdout) or {}).get("outs") or [{}]
    except yaml.YAMLError:
        return None
    md5 = outs[0].get("md5")
    return str(md5) if md5 else None


def _dvc_diff(repo: Path, a: str, b: str) -> dict[str, Any]:
    env = {**os.environ, **TELEMETRY_OFF}
    cmd = [sys.executable, "-m", "dvc", "diff", "--json", a, b]
    try:
        done = subprocess.run(
            cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=DVC_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise AuditError(str(repo), f"dvc diff {a[:8]} {b[:8]} took over {DVC_TIMEOUT_S} s") from exc
    if done.returncode != 0:
        errors = [ln.strip() for ln in done.stderr.splitlines() if ln.strip().startswith("ERROR")]
        last = (errors or [ln.strip() for ln in done.stderr.splitlines() if ln.strip()] or ["no output"])[0]
        raise AuditError(str(repo), f"dvc diff {a[:8]} {b[:8]} failed: {last}")
    try:
        return json.loads(done.stdout) if done.stdout.strip() else {}
    except json.JSONDecodeError as exc:
        raise AuditError(str(repo), f"dvc diff printed no JSON: {done.stdout[:200]!r}") from exc


def _under(path: str, data_path: str | None) -> bool:
    if data_path is None:
        return True
    prefix = data_path.strip("/")
    return path == prefix or path.startswith(prefix + "/")


def audit_diff(
    client: MlflowClient,
    v1: str | int,
    v2: str | int,
    repo: str | Path = ".",
    name: str = REGISTERED_NAME,
    *,
    data_path: str | None = "data",
    dvc_file: str = "data.dvc",
) -> dict[str, Any]:
    """Which data files changed between the data versions that model versions ``v1`` and ``v2`` saw.

    Runs ``dvc diff --json <git_commit of v1> <git_commit of v2>`` in ``repo`` (which needs the DVC cache
    or remote of both versions for a file-level answer; files dvc cannot list are in ``not_in_cache``).

    Args:
        client: MLflow client of the registry.
        v1: the older version (number, ``v<number>`` or alias).
        v2: the newer version.
        repo: the git + DVC repository the versions were trained from.
        name: registered model name.
        data_path: keep only files under this directory (None: every DVC-tracked file).
        dvc_file: the ``.dvc`` file whose md5 is the data version.

    Returns:
        ``{"name", "from": {...}, "to": {...}, "same_data", "added", "deleted", "modified", "renamed",
        "not_in_cache", "warnings"}``; ``from``/``to`` hold ``version, git_commit, data_md5`` (tag) and
        ``data_md5_at_commit`` (``dvc_file`` at that commit); file lists are sorted repo-relative paths,
        ``renamed`` is a list of ``{"old", "new"}``.

    Raises:
        AuditError: a version does not exist or lacks ``git_commit``, a commit is unknown to the repo,
            or ``dvc diff`` failed.
    """
    root = Path(repo).resolve()
    if _git(root, "rev-parse", "--git-dir").returncode != 0:
        raise AuditError(str(root), "not a git repository")
    ends: list[dict[str, Any]] = []
    commits: list[str] = []
    warnings: list[str] = []
    for ref in (v1, v2):
        mv = _resolve(client, name, ref)
        commit = _commit_of(mv, root)
        tag_md5 = _tag(dict(mv.tags or {}), "data_md5")
        at_commit = _md5_at(root, commit, dvc_file)
        if at_commit is None:
            warnings.append(f"v{mv.version}: no {dvc_file} at commit {commit[:8]}")
        elif tag_md5 is not None and tag_md5 != at_commit:
            warnings.append(
                f"v{mv.version}: data_md5 tag {tag_md5} differs from {dvc_file} at commit "
                f"{commit[:8]} ({at_commit}); it was trained on uncommitted data"
            )
        if tag_md5 is None:
            warnings.append(f"v{mv.version}: no data_md5 tag")
        commits.append(commit)
        ends.append(
            {
                "version": str(mv.version),
                "git_commit": commit,
                "data_md5": tag_md5,
                "data_md5_at_commit": at_commit,
            }
        )
    raw = _dvc_diff(root, commits[0], commits[1]) if commits[0] != commits[1] else {}

    def paths(key: str) -> list[str]:
        return sorted(
            e["path"]
            for e in raw.get(key, [])
            if isinstance(e.get("path"), str) and not e["path"].endswith("/") and _under(e["path"], data_path)
        )

    renamed = sorted(
        (
            {"old": e["path"]["old"], "new": e["path"]["new"]}
            for e in raw.get("renamed", [])
            if _under(e["path"]["old"], data_path) or _under(e["path"]["new"], data_path)
        ),
        key=lambda r: (r["old"], r["new"]),
    )
    md5s = [e["data_md5_at_commit"] or e["data_md5"] for e in ends]
    return {
        "name": name,
        "from": ends[0],
        "to": ends[1],
        "same_data": md5s[0] is not None and md5s[0] == md5s[1],
        "added": paths("added"),
        "deleted": paths("deleted"),
        "modified": paths("modified"),
        "renamed": renamed,
        "not_in_cache": paths("not in cache"),
        "warnings": warnings,
    }


def format_diff(diff: dict[str, Any]) -> str:
    """A readable summary of :func:`audit_diff`: both data versions, then one line per changed file."""
    a, b = diff["from"], diff["to"]
    lines = [f"{diff['name']} v{a['version']} -> v{b['version']}"]
    for end in (a, b):
        lines.append(
            f"  v{end['version']:<5} commit {end['git_commit'][:12]}  data_md5 {end['data_md5'] or '-'}"
        )
    counts = {k: len(diff[k]) for k in ("added", "deleted", "modified", "renamed")}
    total = sum(counts.values())
    if total == 0:
        lines.append("same data" if diff["same_data"] else "no data file changed")
    else:
        lines.append(f"{total} data files changed: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    lines += [f"  A {p}" for p in diff["added"]]
    lines += [f"  D {p}" for p in diff["deleted"]]
    lines += [f"  M {p}" for p in diff["modified"]]
    lines += [f"  R {r['old']} -> {r['new']}" for r in diff["renamed"]]
    if diff["not_in_cache"]:
        lines.append(
            f"{len(diff['not_in_cache'])} files not in the DVC cache (run `dvc fetch` for both "
            "commits for a file-level answer):"
        )
        lines += [f"  ? {p}" for p in diff["not_in_cache"]]
    lines += [f"warning: {w}" for w in diff["warnings"]]
    return "\n".join(lines)
