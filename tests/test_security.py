"""Security: no unsafe deserialisation, no credentials in the repository, no secret in logs or in MLflow,
and DICOM with patient identity refused by default.

Each scanner is also run on planted examples, so a scanner that finds nothing is known to be able to.
"""

from __future__ import annotations

import ast
import logging
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml
from conftest import FAKE_AWS_ENV
from helpers import (
    BIN,
    REPO_ROOT,
    SEG_SLICES,
    copy_file,
    error_lines,
    invoke_cli,
    make_project,
    require_shared,
    sha256_tree,
)
from test_bad_input import identified_dicom
from test_dvc_remote import FAKE_KEY, FAKE_SECRET, _run, _scratch_repo
from test_dvc_remote import _env as dvc_env
from test_reliability import set_dvc_remote

from covseg.config import PROFILES, load_params

PYTHON_TREES = ("src", "components", "pipelines", "bench", "tools", "tests")

# ------------------------------------------------------------------------------------------------
# Unsafe deserialisation
# ------------------------------------------------------------------------------------------------

PICKLE_LOADERS = {
    "pickle.load",
    "pickle.loads",
    "cloudpickle.load",
    "cloudpickle.loads",
    "dill.load",
    "dill.loads",
    "joblib.load",
    "pd.read_pickle",
    "pandas.read_pickle",
    "yaml.unsafe_load",
    "yaml.full_load",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(source: str, filename: str) -> list[str]:
    """Calls that may execute pickled code: torch.load without weights_only=True, pickle-family loaders,
    np.load(allow_pickle=True), yaml.load without a safe loader."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}
        where = f"{filename}:{node.lineno}: {name}"
        if name == "torch.load" and not _is_true(kwargs.get("weights_only")):
            problems.append(f"{where} without weights_only=True")
        elif name in PICKLE_LOADERS:
            problems.append(f"{where} (pickle)")
        elif name in ("np.load", "numpy.load") and _is_true(kwargs.get("allow_pickle")):
            problems.append(f"{where} with allow_pickle=True")
        elif name == "yaml.load" and "Safe" not in _dotted(kwargs.get("Loader", ast.Name("?"))):
            problems.append(f"{where} without SafeLoader")
    return problems


def test_unsafe_load_scanner_finds_planted_calls() -> None:
    planted = "\n".join(
        [
            "torch.load(p)",
            "torch.load(p, weights_only=False)",
            "torch.load(p, weights_only=True)",
            "pickle.loads(b)",
            "np.load(p, allow_pickle=True)",
            "np.load(p)",
            "yaml.load(s)",
            "yaml.load(s, Loader=yaml.SafeLoader)",
            "yaml.safe_load(s)",
        ]
    )
    found = unsafe_loads(planted, "planted.py")
    assert [f.split(": ", 1)[0] for f in found] == [f"planted.py:{n}" for n in (1, 2, 4, 5, 7)], found


def test_no_unsafe_deserialisation_in_the_source_tree() -> None:
    files = sorted(p for tree in PYTHON_TREES for p in (REPO_ROOT / tree).rglob("*.py"))
    assert any(p.name == "registry.py" for p in files)
    problems = [
        f for p in files for f in unsafe_loads(p.read_text(encoding="utf-8"), str(p.relative_to(REPO_ROOT)))
    ]
    assert problems == [], "\n".join(problems)


# ------------------------------------------------------------------------------------------------
# Credentials in the repository
# ------------------------------------------------------------------------------------------------

SECRET_NAMES = (
    r"aws_secret_access_key|secret_access_key|secret_key|password|passwd|api_key|access_token|auth_token"
)
PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA|AGPA)[A-Z0-9]{16}\b"),
    "private key": re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----"),
    "quoted secret literal": re.compile(
        rf"(?i)\b(?:{SECRET_NAMES})\b[\"']?[ \t]*[:=][ \t]*[\"']([^\"'\s]+)[\"']"
    ),
    "env-style secret": re.compile(
        rf"(?im)^[ \t]*(?:export[ \t]+|ENV[ \t]+)?[A-Z_]*(?:{SECRET_NAMES.upper()})[ \t]*=[ \t]*([^\s#\"']+)"
    ),
    "credentials in a URL": re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@'\"]+:([^\s/@'\"]+)@"),
    "AWS secret-like value": re.compile(
        r"(?i)secret[^\n]{0,40}?[\"'=:\s]([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"
    ),
}
# The tests' fake credentials (moto accepts anything) and placeholders that stand for a value.
FAKE_VALUES = {*FAKE_AWS_ENV.values(), FAKE_KEY, FAKE_SECRET}
PLACEHOLDER = re.compile(r"^(?:\$.*|<.*>|\{.*\}|[A-Z][A-Z0-9_]*|\*+|x+|\.\.\.|changeme|example)$")


def credential_findings(text: str, filename: str) -> list[str]:
    """`file:line: kind` for each credential-like string that is neither a fake nor a placeholder."""
    found = []
    for kind, pattern in PATTERNS.items():
        for match in pattern.finditer(text):
            if pattern.groups and (match.group(1) in FAKE_VALUES or PLACEHOLDER.match(match.group(1))):
                continue
            found.append(f"{filename}:{text.count(chr(10), 0, match.start()) + 1}: {kind}")
    return found


def _repository_files() -> list[Path]:
    """Tracked files plus new files git does not ignore (what the next commit could hold)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [
        REPO_ROOT / name for name in sorted(set(out.split("\0"))) if name and (REPO_ROOT / name).is_file()
    ]


def test_credential_scanner_finds_planted_secrets() -> None:
    key_id = "AKIA" + "Q" * 16
    secret = "wJalrXUtnFEMI" + "K7MDENGbPxRfiCY" + "EXAMPLEKEY01"  # 40 characters, built at run time
    planted = "\n".join(
        [
            f"aws_access_key_id = {key_id}",
            f"AWS_SECRET_ACCESS_KEY={secret}",
            'cfg = {"pass' + 'word": "hunter22"}',  # split so that this file holds no such literal
            "dsn = 'postgresql://mlflow:" + "s3cr3t-pw@db:5432/mlflow'",
            "-----BEGIN RSA " + "PRIVATE KEY-----",
            # Fakes and placeholders: not findings.
            f'"AWS_SECRET_ACCESS_KEY": "{FAKE_SECRET}"',
            "AWS_SECRET_ACCESS_KEY=",
            "url = postgresql+psycopg2://USER:PASSWORD@HOST:5432/mlflow",
            '--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"',
        ]
    )
    found = credential_findings(planted, "planted")
    lines = sorted({int(f.split(":")[1]) for f in found})
    assert lines == [1, 2, 3, 4, 5], found


def test_no_credentials_in_repository_files() -> None:
    files = _repository_files()
    assert {"params.yaml", ".dvc/config", "infra/secrets.example.env"} <= {
        str(p.relative_to(REPO_ROOT)) for p in files
    }
    findings = []
    for path in files:
        raw = path.read_bytes()
        if b"\0" in raw[:8192] or len(raw) > 5_000_000:
            continue  # binary (images, DICOM) or large generated files
        findings += credential_findings(
            raw.decode("utf-8", errors="replace"), str(path.relative_to(REPO_ROOT))
        )
    assert findings == [], "\n".join(findings)


# ------------------------------------------------------------------------------------------------
# The S3 secret never reaches logs or MLflow
# ------------------------------------------------------------------------------------------------


def _canary() -> str:
    return f"covseg-canary-{uuid.uuid4().hex}"


def test_dvc_push_logs_do_not_contain_the_secret(moto_server: Any, tmp_path: Path) -> None:
    """A verbose push to S3 (moto) with a distinctive secret: not in its output, not in the DVC config."""
    require_shared()
    secret = _canary()
    repo = _scratch_repo(tmp_path / "repo")
    copy_file(SEG_SLICES / "coronacases_org_001_1.jpg", repo / "data" / "coronacases_org_001_1.jpg")
    dvc = str(BIN / "dvc")
    _run(repo, dvc, "add", "-q", "data")
    bucket = moto_server.create_bucket(f"covseg-canary-{uuid.uuid4().hex[:8]}")
    set_dvc_remote(repo, f"{bucket}/dvcstore", moto_server.endpoint_url)
    push = subprocess.run(
        [dvc, "push", "-v"],
        cwd=repo,
        env={**dvc_env(), "AWS_SECRET_ACCESS_KEY": secret},
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=120,
        check=False,
    )
    assert push.returncode == 0, push.stderr[-3000:]
    assert re.search(r"^\d+ files? pushed$", push.stdout + push.stderr, re.M), push.stdout
    assert secret not in push.stdout + push.stderr
    assert all(secret not in p.read_text(encoding="utf-8") for p in (repo / ".dvc").glob("config*"))
    assert all(secret.encode() not in p.read_bytes() for p in (repo / ".dvc").rglob("*") if p.is_file())


@pytest.fixture
def restore_mlflow(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo the process-wide tracking URI and active experiment that `covseg register` sets."""
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils as tracking_utils

    before = getattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setattr(fluent, "_active_experiment_id", getattr(fluent, "_active_experiment_id", None))
    yield
    mlflow.set_tracking_uri(before)


def test_register_step_never_logs_the_secret(
    mlflow_server: str,
    trained_tiny: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    restore_mlflow: None,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`covseg register` with a distinctive S3 secret in its environment, every logger at DEBUG."""
    secret, name = _canary(), f"covseg-security-{uuid.uuid4().hex[:8]}"
    project = make_project(tmp_path / "project")
    raw = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    raw["tiny"]["register"]["name"] = name
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for stage in ("ingest", "refine"):  # register takes the refine stage's model
        (project / "artifacts").mkdir(exist_ok=True)
        (project / "artifacts" / stage).symlink_to(trained_tiny.stage(stage), target_is_directory=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.delenv("COVSEG_TRACKING", raising=False)
    caplog.set_level(logging.DEBUG)

    result = invoke_cli(project, "register", "--profile", "tiny")
    assert result.exit_code == 0, result.stderr
    assert re.search(rf"^{name} v\d+: (champion|challenger) ", result.stdout, re.M), result.stdout
    captured = capfd.readouterr()
    for where, text in {
        "stdout": result.stdout,
        "stderr": result.stderr,
        "fd out": captured.out,
        "fd err": captured.err,
        "logs": caplog.text,
    }.items():
        assert secret not in text, f"the S3 secret appears in {where}"

    client = mlflow.MlflowClient(mlflow_server)
    [version] = client.search_model_versions(f"name = '{name}'")
    run = client.get_run(version.run_id)
    recorded = {**run.data.params, **run.data.tags, **version.tags}
    assert run.data.params and version.tags["eval_dice"]
    assert not [k for k, v in recorded.items() if secret in f"{k}={v}"]
    assert not [k for k in recorded if "secret" in k.lower() or k.upper().startswith("AWS_")]


# ------------------------------------------------------------------------------------------------
# PHI: identified DICOM refused unless `phi.allow_identified` (params.yaml) is switched on
# ------------------------------------------------------------------------------------------------


def test_phi_override_is_off_by_default_and_refuses_identified_dicom(tmp_path: Path) -> None:
    require_shared()
    for profile in PROFILES:
        assert load_params(profile, path=REPO_ROOT / "params.yaml")["phi"]["allow_identified"] is False

    project = tmp_path / "project"
    sources, bad, _ = identified_dicom(project / "data")
    make_project(project, sources=sources)
    raw = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    del raw["common"]["phi"]  # the code's own default, without the params.yaml setting
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    before = sha256_tree(project / "data")

    refused = invoke_cli(project, "ingest", "--profile", "tiny")
    assert refused.exit_code == 2
    [line] = error_lines(refused.stderr)
    assert line.startswith(
        f"error: {bad}: DICOM header carries patient identity (PatientName, PatientBirthDate)"
    )
    assert not (project / "artifacts" / "ingest").exists()

    raw["common"]["phi"] = {"allow_identified": True}  # the documented, explicit override
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    allowed = invoke_cli(project, "ingest", "--profile", "tiny")
    assert allowed.exit_code == 0, allowed.stderr
    assert sha256_tree(project / "data") == before, "the check must not rewrite the input"
