"""Champion/challenger promotion of a registered version, by paired evidence.

A candidate takes ``champion`` only when it is better than the current champion *on the same evaluation
slices* by more than seed noise: :func:`paired_evidence` bootstraps the mean of the per-slice Dice
differences (candidate minus champion) and the lower end of its confidence interval must clear
``register.margin`` (the seed-to-seed spread of the Dice; see the README). A candidate that is better by
less, the same model, or the same model retrained with another seed stays ``challenger``.

The decision itself is the pure function :func:`decide`; :func:`promote` adds the I/O around it: it scores
the current champion (outside any lock, since evaluation is slow), then under the promotion lease
(:mod:`covseg.lease`) re-reads the alias (compare-and-set) and applies the decision only if the champion is
still the one it scored; otherwise it scores the new champion and tries again. The difference, its interval
and the decision are tags of the candidate version (``covseg audit`` shows them).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from covseg.lease import promotion_lease
from covseg.registry import (
    CHALLENGER,
    CHAMPION,
    NONE_TAG,
    TAG_CANDIDATE_DICE,
    TAG_CHAMPION_BEFORE,
    TAG_CHAMPION_DICE,
    TAG_CONFIDENCE,
    TAG_DECISION,
    TAG_DIFFERENCE,
    TAG_DIFFERENCE_HIGH,
    TAG_DIFFERENCE_LOW,
    TAG_DISPLACED_BY,
    TAG_FLOOR_FAILURES,
    TAG_MARGIN,
    TAG_PAIRED_SLICES,
    TAG_REASON,
)
from covseg.retry import with_retries

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # the same scores always give the same interval (and decision)
TIE_TOLERANCE = 1e-9  # a lower bound within rounding error of the margin is a tie, and a tie holds


class PromotionConflict(RuntimeError):
    """The champion kept changing under us; no alias was changed by this call."""


@dataclass(frozen=True)
class Candidate:
    """A registered version up for promotion.

    Attributes:
        version: model version number (string, as MLflow returns it).
        score: mean Dice on the evaluation slices (threshold 0.5).
        per_slice: Dice of each evaluation slice, in the order the champion is scored in.
        metrics: other metrics checked against the floors (``dice`` defaults to ``score``).
    """

    version: str
    score: float
    per_slice: tuple[float, ...] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Champion:
    """The version holding ``champion`` now, scored on the candidate's slices (``per_slice``).

    Without them (``per_slice`` None: no score function) ``score`` is its recorded Dice and nothing can
    replace it.
    """

    version: str
    score: float | None
    per_slice: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Evidence:
    """Paired comparison on the same slices.

    The mean per-slice Dice difference (candidate minus champion) and its bootstrap confidence interval.
    """

    difference: float
    low: float
    high: float
    confidence: float
    n_slices: int

    def as_dict(self) -> dict[str, float | int]:
        """Plain-dict form (the ``evidence`` of :meth:`Decision.as_dict`)."""
        return {
            "difference": self.difference,
            "low": self.low,
            "high": self.high,
            "confidence": self.confidence,
            "n_slices": self.n_slices,
        }

    def describe(self) -> str:
        """The evidence in words (part of the decision's reason)."""
        return (
            f"paired Dice difference {self.difference:+.4f}, {self.confidence:.0%} CI "
            f"[{self.low:+.4f}, {self.high:+.4f}] over {self.n_slices} slices"
        )


def paired_evidence(
    candidate: Sequence[float],
    champion: Sequence[float],
    confidence: float = 0.95,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Evidence:
    """Mean of the per-slice differences ``candidate - champion`` with its two-sided bootstrap (BCa) interval.

    The slices are resampled with replacement (scipy.stats.bootstrap); identical differences on every slice
    (e.g. the same model twice) give a zero-width interval.

    Raises:
        ValueError: the two score lists differ in length, are empty, or hold a non-finite value.
    """
    from scipy.stats import DegenerateDataWarning, bootstrap

    a, b = np.asarray(candidate, dtype=np.float64), np.asarray(champion, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired scores need the same slices: {a.shape} vs {b.shape} per-slice Dice values")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("per-slice Dice values must be finite")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    diff = a - b
    mean = float(diff.mean())
    if diff.size < 2 or np.ptp(diff) == 0:
        return Evidence(mean, mean, mean, confidence, int(diff.size))
    with warnings.catch_warnings():  # an undefined BCa interval is handled below
        warnings.simplefilter("ignore", DegenerateDataWarning)
        result = bootstrap(
            (diff,),
            np.mean,
            n_resamples=n_resamples,
            confidence_level=confidence,
            method="BCa",
            rng=np.random.default_rng(seed),
        )
    low, high = (float(x) for x in (result.confidence_interval.low, result.confidence_interval.high))
    if not (math.isfinite(low) and math.isfinite(high)):  # BCa undefined (e.g. 2 slices): percentile
        result = bootstrap(
            (diff,),
            np.mean,
            n_resamples=n_resamples,
            confidence_level=confidence,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
        low, high = (float(x) for x in (result.confidence_interval.low, result.confidence_interval.high))
    return Evidence(mean, low, high, confidence, int(diff.size))


@dataclass(frozen=True)
class Decision:
    """Outcome of :func:`decide`."""

    alias: str  # CHAMPION or CHALLENGER
    reason: str
    candidate_version: str
    candidate_dice: float
    champion_version_before: str | None
    champion_dice: float | None
    margin: float
    floor_failures: tuple[str, ...] = ()
    evidence: Evidence | None = None

    @property
    def displaced(self) -> str | None:
        """The version that loses ``champion`` because of this decision, if any."""
        before = self.champion_version_before
        if self.alias == CHAMPION and before is not None and before != self.candidate_version:
            return before
        return None

    def as_tags(self) -> dict[str, str]:
        """The version tags recording this decision and its evidence."""
        ev = self.evidence
        return {
            TAG_DECISION: self.alias,
            TAG_REASON: self.reason,
            TAG_CANDIDATE_DICE: _fmt(self.candidate_dice),
            TAG_CHAMPION_DICE: _fmt(self.champion_dice),
            TAG_CHAMPION_BEFORE: self.champion_version_before or NONE_TAG,
            TAG_FLOOR_FAILURES: ";".join(self.floor_failures) or NONE_TAG,
            TAG_MARGIN: _fmt(self.margin),
            TAG_DIFFERENCE: _fmt(ev.difference if ev else None),
            TAG_DIFFERENCE_LOW: _fmt(ev.low if ev else None),
            TAG_DIFFERENCE_HIGH: _fmt(ev.high if ev else None),
            TAG_CONFIDENCE: _fmt(ev.confidence if ev else None),
            TAG_PAIRED_SLICES: str(ev.n_slices) if ev else NONE_TAG,
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
            "margin": self.margin,
            "evidence": self.evidence.as_dict() if self.evidence else None,
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
    confidence: float = 0.95,
) -> Decision:
    """Pure champion/challenger rule, by paired evidence.

    The candidate takes ``champion`` iff it passes every floor and either there is no champion, or the lower
    end of the ``confidence`` interval of its mean per-slice Dice difference to the champion (same slices,
    :func:`paired_evidence`) is above ``margin``. Otherwise it is ``challenger``. A champion without
    per-slice scores holds: nothing replaces a model we cannot compare with slice by slice. A non-finite
    candidate score never wins.

    Args:
        candidate: the version up for promotion, with its per-slice Dice.
        champion: the current champion scored on the same slices, or None if the alias is unset.
        margin: how much better than the champion the candidate must be with confidence (Dice, >= 0): the
            seed-to-seed spread, so that retraining alone does not promote.
        floors: minimum value per metric, e.g. ``{"dice": 0.3, "sensitivity": 0.5}``.
        confidence: two-sided confidence level of the interval.

    Returns:
        The decision, with the reason in words and the evidence.
    """
    if margin < 0 or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    metrics = {"dice": candidate.score, **dict(candidate.metrics)}
    failures = check_floors(metrics, floors)
    before = champion.version if champion else None
    champ_score = champion.score if champion else None

    def out(alias: str, reason: str, evidence: Evidence | None = None) -> Decision:
        return Decision(
            alias, reason, candidate.version, candidate.score, before, champ_score, margin, failures, evidence
        )

    if champion is not None and champion.version == candidate.version:
        return out(CHAMPION, "candidate already holds champion")
    if not _finite(candidate.score):
        return out(CHALLENGER, f"candidate score {candidate.score!r} is not a finite number")
    if failures:
        return out(CHALLENGER, "fails floors: " + ", ".join(failures))
    if champion is None:
        return out(CHAMPION, "no champion yet and all floors pass")
    if not champion.per_slice:
        return out(CHALLENGER, f"champion v{champion.version} was not scored on these slices; champion holds")
    evidence = paired_evidence(candidate.per_slice, champion.per_slice, confidence)
    if evidence.low > margin + TIE_TOLERANCE:
        return out(
            CHAMPION,
            f"{evidence.describe()} vs champion v{champion.version}: lower bound clears margin {margin:.4f}",
            evidence,
        )
    return out(
        CHALLENGER,
        f"{evidence.describe()} vs champion v{champion.version}: lower bound does not clear "
        f"margin {margin:.4f}",
        evidence,
    )


# --------------------------------------------------------------------------------------------------
# I/O: score the champion, compare-and-set under the lease
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
    client: MlflowClient, name: str, version: str, score_fn: Callable[[str], Sequence[float]] | None
) -> Champion:
    """Per-slice Dice of the champion on the evaluation slices (``score_fn``), else its recorded Dice only."""
    if score_fn is None:
        return Champion(version, _recorded_dice(client, name, version))
    uri = f"models:/{name}/{version}"  # pinned version, not the alias: the alias may move meanwhile
    per_slice = tuple(float(x) for x in score_fn(uri))
    return Champion(version, float(np.mean(per_slice)) if per_slice else None, per_slice)


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
    candidate: Candidate,
    *,
    score_champion: Callable[[str], Sequence[float]] | None,
    margin: float,
    floors: Mapping[str, float],
    confidence: float = 0.95,
    lease_ttl_s: float = 60.0,
    lease_timeout_s: float = 120.0,
    max_attempts: int = 5,
) -> dict[str, Any]:
    """Give version ``candidate.version`` of ``name`` the ``champion`` or the ``challenger`` alias.

    The current champion is scored with ``score_champion("models:/<name>/<champion version>")``: its Dice on
    each of the candidate's evaluation slices, in the same order. Then, under the promotion lease, the
    ``champion`` alias is re-read; if it still points at the version that was scored, :func:`decide` runs
    and its result is written (version tags ``promotion_decision``, ``promotion_reason``, ``candidate_dice``,
    ``champion_dice``, ``dice_difference`` with ``dice_difference_ci_low`` / ``_high``, ...; the alias). If
    the champion changed meanwhile, the new one is scored and the step repeats. A displaced champion is
    tagged ``displaced_by_version`` and becomes ``challenger`` (the runner-up).

    Args:
        client: MLflow client of the registry.
        name: registered model name.
        candidate: the candidate version, its mean and per-slice Dice and the metrics for the floors.
        score_champion: model URI -> per-slice Dice on the candidate's slices; None: only the champion's
            recorded Dice is known, so an existing champion holds.
        margin: required improvement over the champion, as the lower confidence bound of the paired mean
            Dice difference.
        floors: minimum per metric (``dice`` falls back to ``candidate.score``).
        confidence: two-sided confidence level of the interval.
        lease_ttl_s: lease lifetime (the critical section is a handful of REST calls).
        lease_timeout_s: how long to wait for another promotion's lease.
        max_attempts: compare-and-set rounds before giving up.

    Returns:
        :meth:`Decision.as_dict`: version, decision, reason, candidate_dice, champion_dice,
        champion_version_before, displaced_version, floor_failures, margin, evidence.

    Raises:
        PromotionConflict: the champion changed on every one of ``max_attempts`` rounds.
        PromotionLeaseTimeout: the lease could not be taken in time.
    """
    version = str(candidate.version)
    with_retries(lambda: client.get_model_version(name, version), what=f"check {name} v{version}")
    observed = _aliases(client, name).get(CHAMPION)
    champion = None if observed is None else _score_champion(client, name, observed, score_champion)
    for _ in range(max_attempts):
        with promotion_lease(client, name, ttl_s=lease_ttl_s, timeout_s=lease_timeout_s):
            aliases = _aliases(client, name)
            current = aliases.get(CHAMPION)
            if current == observed:
                decision = decide(candidate, champion, margin, floors, confidence)
                _apply(client, name, decision, aliases)
                log.info("promotion of %s v%s: %s (%s)", name, version, decision.alias, decision.reason)
                return decision.as_dict()
        log.info("champion of %s moved from v%s to v%s while scoring; re-scoring", name, observed, current)
        observed = current
        champion = None if observed is None else _score_champion(client, name, observed, score_champion)
    raise PromotionConflict(f"champion of {name!r} changed during each of {max_attempts} attempts")
