"""The model registry's vocabulary: the registered name, the aliases and the tags every version carries.

The registry code is split by concern:

- :mod:`covseg.model_logging`: log the segmenter, verify its artifacts in the store, register a version;
- :mod:`covseg.promotion`: decide ``champion`` or ``challenger`` and apply it (compare-and-set);
- :mod:`covseg.lease`: the promotion lease that makes concurrent promotions safe;
- :mod:`covseg.retry`: bounded retries of registry calls on connection errors;
- :mod:`covseg.audit` reads the tags named here.
"""

from __future__ import annotations

REGISTERED_NAME = "covseg"
CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT_NAME = "model"  # the logged model's name inside the run
LINEAGE_KEYS = ("git_commit", "data_md5", "params_hash", "pipeline_run_id")

# Version tags written by covseg.promotion.promote.
TAG_DECISION = "promotion_decision"
TAG_REASON = "promotion_reason"
TAG_CANDIDATE_DICE = "candidate_dice"
TAG_CHAMPION_DICE = "champion_dice"
TAG_CHAMPION_BEFORE = "champion_version_before"
TAG_FLOOR_FAILURES = "promotion_floor_failures"
TAG_DISPLACED_BY = "displaced_by_version"
TAG_MARGIN = "promotion_margin"
TAG_DIFFERENCE = "dice_difference"  # mean per-slice Dice, candidate minus champion, same slices
TAG_DIFFERENCE_LOW = "dice_difference_ci_low"
TAG_DIFFERENCE_HIGH = "dice_difference_ci_high"
TAG_CONFIDENCE = "dice_difference_confidence"
TAG_PAIRED_SLICES = "paired_slices"
NONE_TAG = "none"
