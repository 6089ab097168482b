"""Log the segmenter as an MLflow pyfunc model and register it as a version of ``covseg``.

:func:`log_segmenter` logs the model inside the active run as a *model from code* (a Python file that
builds the PythonModel, plus the weights as a safetensors file), checks that every artifact really reached
the artifact store, and only then registers a new version with its lineage tags. A version therefore never
exists without its artifacts, and loading it never unpickles anything.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covseg.registry import LINEAGE_KEYS, MODEL_ARTIFACT_NAME, REGISTERED_NAME
from covseg.retry import with_retries

if TYPE_CHECKING:
    import torch
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

WEIGHTS_ARTIFACT = "weights"  # key in context.artifacts: the module's state dict as a safetensors file


class RegistrationError(RuntimeError):
    """The model could not be logged/uploaded/registered; no model version was created for it."""


def default_pip_requirements() -> list[str]:
    """Pinned requirements of the serving environment (explicit, so log_model skips inference)."""
    from importlib.metadata import version

    def pin(dist: str) -> str:
        return f"{dist}=={version(dist).split('+')[0]}"  # torch "2.13.0+cpu" -> "torch==2.13.0"

    return [pin("mlflow"), pin("torch"), pin("numpy"), pin("safetensors")]


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
    model_code: str | Path,
    artifacts: dict[str, str],
    input_example: Any,
    tags: dict[str, str],
    registered_name: str = REGISTERED_NAME,
    pip_requirements: list[str] | None = None,
    code_paths: list[str] | None = None,
    retry_attempts: int = 4,
    signature: Any = None,
) -> ModelVersion:
    """Log the segmenter as an MLflow pyfunc model from code in the active run; register a new version.

    The model's ``state_dict`` is saved with safetensors and passed as artifact ``weights``
    (``context.artifacts["weights"]`` in the PythonModel's ``load_context``), next to the caller's
    ``artifacts``. ``model_code`` is the Python file that builds the PythonModel (``mlflow.models.set_model``):
    MLflow stores the file, not a pickle of the object. Registration happens only after every artifact is
    verified in the artifact store, so a failed upload never leaves a version without artifacts.

    Args:
        model: the trained torch module (its ``state_dict`` is stored).
        model_code: the models-from-code file (e.g. :data:`covseg.serving.MODEL_CODE`).
        artifacts: extra files for the PythonModel, ``{key: local path}`` (key ``weights`` is reserved).
        input_example: a representative model input (e.g. float32 array), stored with the model.
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
        ValueError: lineage tags missing, artifact key clash, or ``model_code`` is not a Python file.
    """
    import mlflow
    from safetensors.torch import save_model

    missing = [k for k in LINEAGE_KEYS if not str(tags.get(k, "")).strip()]
    if missing:
        raise ValueError(f"lineage tags missing or empty: {missing}")
    if WEIGHTS_ARTIFACT in artifacts:
        raise ValueError(f"artifact key {WEIGHTS_ARTIFACT!r} is reserved by covseg.model_logging")
    if (
        not isinstance(model_code, str | Path)
        or Path(model_code).suffix != ".py"
        or not Path(model_code).is_file()
    ):
        raise ValueError(
            f"model_code must be the path of a Python file that calls mlflow.models.set_model "
            f"(an object would be pickled), got {model_code!r}"
        )
    run = mlflow.active_run()
    if run is None:
        raise RegistrationError("log_segmenter needs an active MLflow run (mlflow.start_run())")
    client = mlflow.MlflowClient()
    reqs = pip_requirements if pip_requirements is not None else default_pip_requirements()

    with tempfile.TemporaryDirectory(prefix="covseg-model-") as tmp:
        all_artifacts = dict(artifacts)
        all_artifacts[WEIGHTS_ARTIFACT] = str(Path(tmp, "weights.safetensors"))
        save_model(model, all_artifacts[WEIGHTS_ARTIFACT])

        def _log() -> Any:
            return mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT_NAME,
                python_model=str(model_code),
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

        # Files the store must hold: MLmodel, the code file, each artifact (with its local size).
        pyfunc_conf = info.flavors.get("python_function", {})
        code_file = pyfunc_conf.get("model_code_path")
        if not code_file or pyfunc_conf.get("python_model"):
            raise RegistrationError(f"{info.model_uri} was not logged as a model from code; not registered")
        expected: dict[str, int | None] = {"MLmodel": None, Path(code_file).name: None}
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
