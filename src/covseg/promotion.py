"""Champion/challenger promotion of a registered version.

The decision itself is the pure function :func:`decide`; :func:`promote` adds the I/O around it: it scores
the current champion (outside any lock, since evaluation is slow), then under the promotion lease
(:mod:`covseg.lease`) re-reads the alias (compare-and-set) and applies the decision only if the champion is
still the one it scored; otherwise it scores the new champion and tries again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from covseg.lease import promotion_lease
from covseg.registry import (
    CHALLENGER,
    CHAMPION,
    NONE_TAG,
    TAG_CANDIDATE_DICE,
    TAG_CHAMPION_BEFORE,
    TAG_CHAMPION_DICE,
    TAG_DECISION,
    TAG_DISPLACED_BY,
    TAG_FLOOR_FAILURES,
    TAG_REASON,
)
from covseg.retry import with_retries

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


class PromotionConflict(RuntimeError):
    """The champion kept changing under us; no alias was changed by this call."""


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
