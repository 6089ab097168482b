"""The promotion lease: a short lock around the compare-and-set of the ``champion`` alias.

The lease is a sibling registered model ``<name>.promotion-lease`` created with ``create_registered_model``:
the registry's unique constraint on model names makes creation atomic on every SQL store (sqlite, Postgres),
which registered-model *tags* cannot offer (setting a tag is a blind overwrite, so two writers can both
"win" a tag lease). The lease carries its owner id and expiry as tags; an expired lease (owner crashed) is
broken by the next promoter. It exists only for the few REST calls of the critical section.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from covseg.retry import with_retries

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

LEASE_SUFFIX = ".promotion-lease"


class PromotionLeaseTimeout(TimeoutError):
    """Another promotion of the same registered model held the lease for longer than we would wait."""


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
