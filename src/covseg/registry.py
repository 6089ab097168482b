"""Model registry: log + register the segmenter, and champion/challenger promotion.

Two entry points:

- :func:`log_segmenter` logs the segmenter as an MLflow pyfunc inside the active run, checks that every
  artifact really reached the artifact store, and only then registers a new version of ``covseg`` with
  its lineage tags. A version therefore never exists without its artifacts.
- :func:`promote` decides whether a registered version takes the ``champion`` alias or the
  ``challenger`` alias. The decision itself is the pure function :func:`decide`; :func:`promote` adds the
  I/O around it: it scores the current champion (outside any lock, since evaluation is slow), then under
  a short lease re-reads the alias (compare-and-set) and applies the decision only if the champion is
  still the one it scored; otherwise it scores the new champion and tries again.

The lease is a sibling registered model ``<name>.promotion-lease`` created with ``create_registered_model``:
the registry's unique constraint on model names makes creation atomic on every SQL store (sqlite, Postgres),
which registered-model *tags* cannot offer (setting a tag is a blind overwrite, so two writers can both
"win" a tag lease). The lease carries its owner id and expiry as tags; an expired lease (owner crashed) is
broken by the next promoter. It exists only for the few REST calls of the critical section.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import mlflow.pyfunc
    import torch
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

REGISTERED_NAME = "covseg"
CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT_NAME = "model"  # the logged model's name inside the run
STATE_DICT_ARTIFACT = "state_dict"  # key in context.artifacts: path of the torch state_dict file
TORCH_MODULE_ARTIFACT = "torch_module"  # key used by the default wrapper (JSON: the module's class)
LINEAGE_KEYS = ("git_commit", "data_md5", "params_hash", "pipeline_run_id")
LEASE_SUFFIX = ".promotion-lease"

# Version tags written by promote().
TAG_DECISION = "promotion_decision"
TAG_REASON = "promotion_reason"
TAG_CANDIDATE_DICE = "candidate_dice"
TAG_CHAMPION_DICE = "champion_dice"
TAG_CHAMPION_BEFORE = "champion_version_before"
TAG_FLOOR_FAILURES = "promotion_floor_failures"
TAG_DISPLACED_BY = "displaced_by_version"
NONE_TAG = "none"

T = TypeVar("T")


class RegistrationError(RuntimeError):
    """The model could not be logged/uploaded/registered; no model version was created for it."""


class PromotionLeaseTimeout(TimeoutError):
    """Another promotion of the same registered model held the lease for longer than we would wait."""


class PromotionConflict(RuntimeError):
    """The champion kept changing under us; no alias was changed by this call."""


# --------------------------------------------------------------------------------------------------
# Pure decision logic
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A registered version up for promotion.

    Attributes:
        version: model version number (string, as MLflow returns it).
        score: Dice on the evaluation set (threshold 0.5).
        metrics: other metrics checked against the floors (``dice`` defaults to ``score``).
    """

    version: str
    score: float
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Champion:
    """The version holding ``champion`` now; ``score`` is None when it cannot be scored."""

    version: str
    score: float | None


@dataclass(frozen=True)
class Decision:
    """Outcome of :func:`decide`."""

    alias: str  # CHAMPION or CHALLENGER
    reason: str
    candidate_version: str
    candidate_dice: float
    champion_version_before: str | None
    champion_dice: float | None
    floor_failures: tuple[str, ...] = ()

    @property
    def displaced(self) -> str | None:
        """The version that loses ``champion`` because of this decision, if any."""
        before = self.champion_version_before
        if self.alias == CHAMPION and before is not None and before != self.candidate_version:
            return before
        return None

    def as_tags(self) -> dict[str, str]:
        """The version tags recording this decision."""
        return {
            TAG_DECISION: self.alias,
            TAG_REASON: self.reason,
            TAG_CANDIDATE_DICE: _fmt(self.candidate_dice),
            TAG_CHAMPION_DICE: _fmt(self.champion_dice),
            TAG_CHAMPION_BEFORE: self.champion_version_before or NONE_TAG,
            TAG_FLOOR_FAILURES: ";".join(self.floor_failures) or NONE_TAG,
        }

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form (what :func:`promote` returns)."""
        return {
            "version": self.candidate_version,
            "decision": self.alias,
            "reason": self.reason,
            "candidate_dice": self.candidate_dice,
            "champion_dice": self.champion_dice,
            "champion_version_before": self.champion_version_before,
            "displaced_version": self.displaced,
            "floor_failures": list(self.floor_failures),
        }


def _fmt(x: float | None) -> str:
    return NONE_TAG if x is None else repr(float(x))


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def check_floors(metrics: Mapping[str, float], floors: Mapping[str, float]) -> tuple[str, ...]:
    """Return the floors a candidate misses (``"<metric>=<value><<floor>"`` or ``"<metric> missing"``).

    A metric that is absent or not finite fails its floor.
    """
    failures = []
    for key, floor in sorted(floors.items()):
        value = metrics.get(key)
        if value is None or not math.isfinite(float(value)):
            failures.append(f"{key} missing")
        elif float(value) < float(floor):
            failures.append(f"{key}={float(value):.4f}<{float(floor):.4f}")
    return tuple(failures)


def decide(
    candidate: Candidate,
    champion: Champion | None,
    margin: float,
    floors: Mapping[str, float],
) -> Decision:
    """Pure champion/challenger rule.

    The candidate takes ``champion`` iff it passes every floor and either there is no champion or
    ``candidate.score > champion.score + margin``; otherwise it is ``challenger``. A champion that cannot be
    scored (no score function and no recorded Dice) holds: nothing replaces a model we cannot compare with.
    A non-finite candidate score never wins.

    Args:
        candidate: the version up for promotion.
        champion: the current champion, or None if the alias is unset.
        margin: how much better than the champion the candidate must be (Dice points, >= 0).
        floors: minimum value per metric, e.g. ``{"dice": 0.3, "sensitivity": 0.5}``.

    Returns:
        The decision, with the reason in words.
    """
    if margin < 0 or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    metrics = {"dice": candidate.score, **dict(candidate.metrics)}
    failures = check_floors(metrics, floors)
    before = champion.version if champion else None
    champ_score = champion.score if champion else None

    def out(alias: str, reason: str) -> Decision:
        return Decision(alias, reason, candidate.version, candidate.score, before, champ_score, failures)

    if champion is not None and champion.version == candidate.version:
        return out(CHAMPION, "candidate already holds champion")
    if not _finite(candidate.score):
        return out(CHALLENGER, f"candidate score {candidate.score!r} is not a finite number")
    if failures:
        return out(CHALLENGER, "fails floors: " + ", ".join(failures))
    if champion is None:
        return out(CHAMPION, "no champion yet and all floors pass")
    if not _finite(champ_score):
        return out(CHALLENGER, f"champion v{champion.version} has no usable score; champion holds")
    assert champ_score is not None
    if candidate.score > champ_score + margin:
        return out(
            CHAMPION,
            f"dice {candidate.score:.4f} > champion v{champion.version} {champ_score:.4f} + margin {margin:.4f}",
        )
    return out(
        CHALLENGER,
        f"dice {candidate.score:.4f} <= champion v{champion.version} {champ_score:.4f} + margin {margin:.4f}",
    )


# --------------------------------------------------------------------------------------------------
# Retries
# --------------------------------------------------------------------------------------------------

_TRANSIENT_MLFLOW_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` (or anything in its cause/context chain) is a connection-level failure."""
    transient: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import requests

        transient += [
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError,
        ]
    except ImportError:  # pragma: no cover
        pass
    try:
        import urllib3

        transient += [
            urllib3.exceptions.ProtocolError,
            urllib3.exceptions.NewConnectionError,
            urllib3.exceptions.MaxRetryError,
            urllib3.exceptions.TimeoutError,
        ]
    except ImportError:  # pragma: no cover
        pass
    try:
        import botocore.exceptions as bx

        transient += [
            bx.ConnectionError,
            bx.ConnectionClosedError,
            bx.ReadTimeoutError,
            bx.ConnectTimeoutError,
        ]
    except ImportError:  # pragma: no cover
        pass
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, tuple(transient)):
            return True
        if getattr(cur, "error_code", None) in _TRANSIENT_MLFLOW_CODES:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = 4,
    base_delay_s: float = 0.5,
    max_delay_s: float = 8.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn``; on a transient (connection) error retry with jittered exponential backoff.

    Non-transient errors propagate at once. After ``attempts`` tries the last error propagates.
    Note that the MLflow REST client already retries each HTTP request itself
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``); this loop adds retries around whole operations.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            log.warning(
                "%s failed (attempt %d/%d, transient: %s); retrying in %.1f s",
                what,
                attempt,
                attempts,
                exc,
                delay,
            )
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------------------------------
# Logging + registration
# --------------------------------------------------------------------------------------------------


def default_pip_requirements() -> list[str]:
    """Pinned requirements of the serving environment (explicit, so log_model skips inference)."""
    from importlib.metadata import version

    def pin(dist: str) -> str:
        return f"{dist}=={version(dist).split('+')[0]}"  # torch "2.13.0+cpu" -> "torch==2.13.0"

    return [pin("mlflow"), pin("torch"), pin("numpy"), pin("cloudpickle")]


def _torch_module_pyfunc() -> mlflow.pyfunc.PythonModel:
    """Default wrapper when no PythonModel is given: rebuild the nn.Module from its class and state_dict.

    Input: a float32 array shaped like the module's input; output: the module's output as an array.
    The module's class must be importable where the model is loaded and take no constructor arguments;
    weights load with ``weights_only=True`` (no pickled code from the artifact store is executed).
    """
    import mlflow.pyfunc

    class TorchModulePyfunc(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            import importlib
            import json

            import torch

            spec = json.loads(Path(context.artifacts[TORCH_MODULE_ARTIFACT]).read_text())
            cls: Any = importlib.import_module(spec["module"])
            for part in spec["qualname"].split("."):
                cls = getattr(cls, part)
            self.module = cls()
            state = torch.load(context.artifacts[STATE_DICT_ARTIFACT], map_location="cpu", weights_only=True)
            self.module.load_state_dict(state)
            self.module.eval()

        def predict(self, context, model_input, params=None):
            import numpy as np
            import torch

            with torch.no_grad():
                out = self.module(torch.as_tensor(np.asarray(model_input, dtype=np.float32)))
            return out.numpy()

    return TorchModulePyfunc()


def _check_uploaded(client: MlflowClient, model_id: str, expected: Mapping[str, int | None]) -> None:
    """Raise RegistrationError unless every expected file is in the store (with the local size)."""
    missing = []
    by_dir: dict[str, dict[str, Any]] = {}
    for rel, size in expected.items():
        parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
        if parent not in by_dir:
            listing = with_retries(
                lambda p=parent: client.list_logged_model_artifacts(model_id, p or None),
                what=f"list artifacts of {model_id}/{parent}",
            )
            by_dir[parent] = {f.path.rsplit("/", 1)[-1]: f for f in listing}
        info = by_dir[parent].get(rel.rsplit("/", 1)[-1])
        if info is None:
            missing.append(f"{rel} (absent)")
        elif size is not None and not info.is_dir and info.file_size != size:
            missing.append(f"{rel} (size {info.file_size} != local {size})")
    if missing:
        raise RegistrationError(
            f"logged model {model_id} is incomplete in the artifact store: {', '.join(missing)}; not registered"
        )


def log_segmenter(
    model: torch.nn.Module,
    *,
    pyfunc_model: mlflow.pyfunc.PythonModel | None,
    artifacts: dict[str, str],
    input_example: Any,
    tags: dict[str, str],
    registered_name: str = REGISTERED_NAME,
    pip_requirements: list[str] | None = None,
    code_paths: list[str] | None = None,
    retry_attempts: int = 4,
    signature: Any = None,
) -> ModelVersion:
    """Log the segmenter as an MLflow pyfunc in the active run and register it as a new version.

    The model's ``state_dict`` is saved and passed as artifact ``state_dict`` (``context.artifacts
    ["state_dict"]`` in the PythonModel's ``load_context``), next to the caller's ``artifacts``. The
    signature is inferred by MLflow from ``input_example``. Registration happens only after every artifact
    is verified in the artifact store, so a failed upload never leaves a version without artifacts.

    Args:
        model: the trained torch module (its ``state_dict`` is stored).
        pyfunc_model: PythonModel wrapping the predict path; None uses a generic wrapper that rebuilds the
            module from its class (importable, no constructor arguments) and ``state_dict``.
        artifacts: extra files for the PythonModel, ``{key: local path}`` (key ``state_dict`` is reserved).
        input_example: a representative model input (e.g. float32 array), used for the signature.
        signature: an explicit ModelSignature (e.g. variable image sizes); default: inferred.
        tags: lineage tags for the version; must include ``git_commit``, ``data_md5``, ``params_hash`` and
            ``pipeline_run_id``; any other keys are added as given.
        registered_name: registered model name.
        pip_requirements: serving requirements; default :func:`default_pip_requirements`.
        code_paths: local code to ship with the model (e.g. the covseg package dir), if any.
        retry_attempts: tries per operation on connection errors (bounded exponential backoff).

    Returns:
        The new ModelVersion (status READY), with the lineage tags set.

    Raises:
        RegistrationError: no active run, logging/upload failed, or artifacts missing after upload.
        ValueError: lineage tags missing or artifact key clash.
    """
    import mlflow
    import torch

    missing = [k for k in LINEAGE_KEYS if not str(tags.get(k, "")).strip()]
    if missing:
        raise ValueError(f"lineage tags missing or empty: {missing}")
    for reserved in (STATE_DICT_ARTIFACT, TORCH_MODULE_ARTIFACT):
        if reserved in artifacts:
            raise ValueError(f"artifact key {reserved!r} is reserved by covseg.registry")
    run = mlflow.active_run()
    if run is None:
        raise RegistrationError("log_segmenter needs an active MLflow run (mlflow.start_run())")
    client = mlflow.MlflowClient()
    reqs = pip_requirements if pip_requirements is not None else default_pip_requirements()

    with tempfile.TemporaryDirectory(prefix="covseg-model-") as tmp:
        all_artifacts = dict(artifacts)
        all_artifacts[STATE_DICT_ARTIFACT] = str(Path(tmp, "state_dict.pt"))
        torch.save(model.state_dict(), all_artifacts[STATE_DICT_ARTIFACT])
        python_model = pyfunc_model
        if python_model is None:
            all_artifacts[TORCH_MODULE_ARTIFACT] = str(Path(tmp, "module.json"))
            cls = type(model)
            Path(all_artifacts[TORCH_MODULE_ARTIFACT]).write_text(
                json.dumps({"module": cls.__module__, "qualname": cls.__qualname__}))
            python_model = _torch_module_pyfunc()

        def _log() -> Any:
            return mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT_NAME,
                python_model=python_model,
                artifacts=all_artifacts,
                input_example=input_example,
                signature=signature,
                pip_requirements=reqs,
                code_paths=code_paths,
            )

        try:
            info = with_retries(_log, what="log_model", attempts=retry_attempts)
        except Exception as exc:
            raise RegistrationError(
                f"logging/uploading the model for {registered_name!r} failed ({type(exc).__name__}: {exc}); "
                "nothing was registered"
            ) from exc

        # Files the store must hold: MLmodel, the PythonModel (pickle or code file), each artifact (same size).
        pyfunc_conf = info.flavors.get("python_function", {})
        expected: dict[str, int | None] = {"MLmodel": None}
        if pyfunc_conf.get("python_model"):
            expected[pyfunc_conf["python_model"]] = None
        saved = pyfunc_conf.get("artifacts", {})
        for key, local in all_artifacts.items():
            rel = saved.get(key, {}).get("path")
            if rel is None:
                raise RegistrationError(f"artifact {key!r} not recorded in the MLmodel; not registered")
            expected[rel] = os.path.getsize(local) if os.path.isfile(local) else None
    if not info.model_id:
        raise RegistrationError(f"MLflow returned no logged-model id for {info.model_uri}; not registered")
    _check_uploaded(client, info.model_id, expected)

    str_tags = {k: str(v) for k, v in tags.items()}

    def _register() -> ModelVersion:
        # Idempotent on retry: a previous attempt may have registered before the connection dropped.
        for mv in client.search_model_versions(
            f"name = '{registered_name}' and run_id = '{run.info.run_id}'"
        ):
            if mv.source == info.model_uri or getattr(mv, "model_id", None) == info.model_id:
                return mv
        return mlflow.register_model(info.model_uri, registered_name, tags=str_tags)

    try:
        mv = with_retries(_register, what="register_model", attempts=retry_attempts)
    except Exception as exc:
        raise RegistrationError(f"registering {info.model_uri} as {registered_name!r} failed: {exc}") from exc
    for key, value in str_tags.items():  # no-ops for a fresh version; fills tags if a retry found it
        if mv.tags.get(key) != value:
            with_retries(
                lambda k=key, v=value: client.set_model_version_tag(registered_name, mv.version, k, v),
                what="set_model_version_tag",
            )
    log.info("registered %s v%s from %s", registered_name, mv.version, info.model_uri)
    return client.get_model_version(registered_name, mv.version)


# --------------------------------------------------------------------------------------------------
# Promotion
# --------------------------------------------------------------------------------------------------


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    rm = with_retries(lambda: client.get_registered_model(name), what=f"get_registered_model {name}")
    return {alias: str(v) for alias, v in (rm.aliases or {}).items()}


def _recorded_dice(client: MlflowClient, name: str, version: str) -> float | None:
    mv = with_retries(lambda: client.get_model_version(name, version), what=f"get_model_version {version}")
    try:
        value = float(mv.tags.get(TAG_CANDIDATE_DICE, "nan"))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _score_champion(
    client: MlflowClient, name: str, version: str, score_fn: Callable[[str], float] | None
) -> Champion:
    """Score the champion on the evaluation set (``score_fn``) or fall back to its recorded Dice."""
    if score_fn is None:
        return Champion(version, _recorded_dice(client, name, version))
    uri = f"models:/{name}/{version}"  # pinned version, not the alias: the alias may move meanwhile
    return Champion(version, float(score_fn(uri)))


def _lease_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"


def _read_lease(client: MlflowClient, lease_name: str) -> tuple[str, float] | None:
    from mlflow.exceptions import MlflowException

    try:
        rm = client.get_registered_model(lease_name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    try:
        expires = float(rm.tags.get("lease_expires_at", "0"))
    except ValueError:
        expires = 0.0
    return rm.tags.get("lease_owner", "?"), expires


def _delete_lease(client: MlflowClient, lease_name: str, owner: str) -> None:
    """Delete the lease if ``owner`` still holds it (best effort; a vanished lease is fine)."""
    from mlflow.exceptions import MlflowException

    held = _read_lease(client, lease_name)
    if held is None or held[0] != owner:
        return
    try:
        client.delete_registered_model(lease_name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


@contextmanager
def promotion_lease(
    client: MlflowClient, name: str, *, ttl_s: float = 60.0, timeout_s: float = 120.0, poll_s: float = 0.2
) -> Iterator[str]:
    """Hold the promotion lease of registered model ``name``; yields the owner id.

    The lease is the registered model ``<name>.promotion-lease``; creating it is atomic (unique name),
    its tags hold the owner id and the expiry (epoch seconds). An expired lease is broken and retaken.

    Raises:
        PromotionLeaseTimeout: the lease stayed held (and unexpired) for ``timeout_s``.
    """
    from mlflow.exceptions import MlflowException

    lease_name = f"{name}{LEASE_SUFFIX}"
    owner = _lease_owner()
    deadline = time.monotonic() + timeout_s
    while True:
        expires = time.time() + ttl_s
        try:
            with_retries(
                lambda e=expires: client.create_registered_model(
                    lease_name,
                    tags={"lease_owner": owner, "lease_expires_at": f"{e:.3f}", "lease_for": name},
                    description=f"covseg promotion lease for {name!r}; safe to delete if expired",
                ),
                what="acquire promotion lease",
            )
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        held = _read_lease(client, lease_name)
        if held is not None and held[0] == owner:  # our create landed, but its reply was lost (retried)
            break
        if held is not None and held[1] < time.time():
            log.warning("breaking expired promotion lease of %s held by %s", name, held[0])
            _delete_lease(client, lease_name, held[0])
            continue
        if time.monotonic() > deadline:
            holder = held[0] if held else "?"
            raise PromotionLeaseTimeout(
                f"promotion lease of {name!r} held by {holder} for over {timeout_s} s"
            )
        time.sleep(poll_s * (0.5 + random.random()))
    try:
        yield owner
    finally:
        _delete_lease(client, lease_name, owner)


def _apply(client: MlflowClient, name: str, decision: Decision, aliases: Mapping[str, str]) -> None:
    """Write the decision: tags first (so a visible alias always has its record), then aliases."""

    def call(fn: Callable[[], Any], what: str) -> None:
        with_retries(fn, what=what)

    v = decision.candidate_version
    for key, value in decision.as_tags().items():
        call(lambda k=key, val=value: client.set_model_version_tag(name, v, k, val), f"tag v{v} {key}")
    if decision.alias == CHAMPION:
        displaced = decision.displaced
        if displaced is not None:
            call(lambda: client.set_model_version_tag(name, displaced, TAG_DISPLACED_BY, v), "tag displaced")
        call(lambda: client.set_registered_model_alias(name, CHAMPION, v), "set champion alias")
        if displaced is not None:  # the displaced champion is the runner-up
            call(
                lambda: client.set_registered_model_alias(name, CHALLENGER, displaced), "set challenger alias"
            )
        elif aliases.get(CHALLENGER) == v:
            call(lambda: client.delete_registered_model_alias(name, CHALLENGER), "drop challenger alias")
    else:
        call(lambda: client.set_registered_model_alias(name, CHALLENGER, v), "set challenger alias")


def promote(
    client: MlflowClient,
    name: str,
    version: str | int,
    candidate_score: float,
    *,
    score_fn_for_champion: Callable[[str], float] | None,
    margin: float,
    floors: dict[str, float],
    candidate_metrics: dict[str, float],
    lease_ttl_s: float = 60.0,
    lease_timeout_s: float = 120.0,
    max_attempts: int = 5,
) -> dict[str, Any]:
    """Give version ``version`` of ``name`` the ``champion`` or the ``challenger`` alias.

    The current champion is scored with ``score_fn_for_champion("models:/<name>/<champion version>")``
    (Dice on the same evaluation set as ``candidate_score``), or, without a function, from its recorded
    ``candidate_dice`` tag. Then, under the promotion lease, the ``champion`` alias is re-read; if it still
    points at the version that was scored, :func:`decide` runs and its result is written (version tags
    ``promotion_decision``, ``candidate_dice``, ``champion_dice``, ``champion_version_before``, ...; the
    alias). If the champion changed meanwhile, the new one is scored and the step repeats. A displaced
    champion is tagged ``displaced_by_version`` and becomes ``challenger`` (the runner-up).

    Args:
        client: MLflow client of the registry.
        name: registered model name.
        version: the candidate version.
        candidate_score: the candidate's Dice on the evaluation set.
        score_fn_for_champion: model URI -> Dice on the same evaluation set; None to use the recorded tag.
        margin: required improvement over the champion's Dice.
        floors: minimum per metric (``dice`` falls back to ``candidate_score``).
        candidate_metrics: the candidate's metrics checked against ``floors``.
        lease_ttl_s: lease lifetime (the critical section is a handful of REST calls).
        lease_timeout_s: how long to wait for another promotion's lease.
        max_attempts: compare-and-set rounds before giving up.

    Returns:
        :meth:`Decision.as_dict`: version, decision, reason, candidate_dice, champion_dice,
        champion_version_before, displaced_version, floor_failures.

    Raises:
        PromotionConflict: the champion changed on every one of ``max_attempts`` rounds.
        PromotionLeaseTimeout: the lease could not be taken in time.
    """
    version = str(version)
    candidate = Candidate(version, float(candidate_score), dict(candidate_metrics))
    with_retries(lambda: client.get_model_version(name, version), what=f"check {name} v{version}")
    observed = _aliases(client, name).get(CHAMPION)
    champion = None if observed is None else _score_champion(client, name, observed, score_fn_for_champion)
    for _ in range(max_attempts):
        with promotion_lease(client, name, ttl_s=lease_ttl_s, timeout_s=lease_timeout_s):
            aliases = _aliases(client, name)
            current = aliases.get(CHAMPION)
            if current == observed:
                decision = decide(candidate, champion, margin, floors)
                _apply(client, name, decision, aliases)
                log.info("promotion of %s v%s: %s (%s)", name, version, decision.alias, decision.reason)
                return decision.as_dict()
        log.info("champion of %s moved from v%s to v%s while scoring; re-scoring", name, observed, current)
        observed = current
        champion = (
            None if observed is None else _score_champion(client, name, observed, score_fn_for_champion)
        )
    raise PromotionConflict(f"champion of {name!r} changed during each of {max_attempts} attempts")
