#!/usr/bin/env bash
# The whole GPU job in one call (see tools/device/README.md). From the repo root:
#   device:  run(command="bash tools/device/job.sh", carry=[".devcarry"], timeout_s=540)
#   CPU rehearsal (tiny):  see README.md, "Rehearse here"
# Steps: install carried wheels -> unpack the carried lungs-stage output -> classify, coarse, mil, segment,
# evaluate (full profile, tracking off; timed per stage) under a deadline -> inference benchmark of the
# segmenter -> pack results into $OUT. Every step logs to $OUT/job.log; a failed or cut-short step does not
# stop the later ones that can still run.
#
# Environment (all optional):
#   OUT                 result folder (set by the device tool; default tools/device/out)
#   DEVICE_PROFILE      params.yaml profile (full)              DEVICE_OVERRIDES  JSON merged over it
#   DEVCARRY            carry folder (.devcarry)                DEVICE_WORK       scratch (/tmp/covseg-device)
#   DEVICE_DEADLINE_S   whole-job deadline in s (500)           BENCH_RESERVE_S   kept for bench+pack (75)
#   INFER_ARGS          extra infer_bench.py arguments          PYTHON            interpreter (python3)
#   DEVICE_IMITATE=1    CPU rehearsal: block what the device lacks (tools/device/cpu_test/sitecustomize.py)
set -u -o pipefail
T0=$(date +%s)
ROOT=$(pwd)
OUT=${OUT:-$ROOT/tools/device/out}
PROFILE=${DEVICE_PROFILE:-full}
CARRY=${DEVCARRY:-$ROOT/.devcarry}
WORK=${DEVICE_WORK:-/tmp/covseg-device}
SITE=${DEVICE_SITE:-/tmp/site}
PY=${PYTHON:-python3}
DEADLINE=${DEVICE_DEADLINE_S:-500}
RESERVE=${BENCH_RESERVE_S:-75}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/job.log") 2>&1
elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo "[job $(elapsed)s] $*"; }
declare -A RC

export PYTHONUNBUFFERED=1 COVSEG_TRACKING=0 COVSEG_ROOT="$ROOT" TQDM_DISABLE=1 TQDM_MININTERVAL=60
export MLFLOW_DISABLE_TELEMETRY=true DEVICE_SITE="$SITE"
say "profile=$PROFILE carry=$CARRY work=$WORK out=$OUT deadline=${DEADLINE}s overrides=${DEVICE_OVERRIDES:-none}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv

# 1. wheels the image lacks (monai), into $SITE
[ -f "$CARRY/carry.json" ] || { say "no carry at $CARRY (run tools/device/prepare.py here, name it in carry)"; exit 2; }
rm -rf "$SITE"
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$CARRY"/wheels/*.whl
RC[wheels]=$?
PYPATH="$ROOT/src:$SITE"
if [ "${DEVICE_IMITATE:-0}" = 1 ]; then PYPATH="$ROOT/tools/device/cpu_test:$PYPATH"; fi
# SimpleITK: the real one when importable, else the shim (identical on these calls: tools/device/shim_check.py)
if PYTHONPATH="$PYPATH" $PY -c "import SimpleITK as s; assert not hasattr(s, 'IS_COVSEG_SHIM')" 2>/dev/null; then SITK=real
else SITK=shim; PYPATH="$PYPATH:$ROOT/tools/device/shim"; fi
export PYTHONPATH="$PYPATH"
say "SimpleITK: $SITK; PYTHONPATH=$PYTHONPATH"
$PY - <<'EOF' || { say "missing packages"; exit 2; }
import importlib
mods = ["torch", "numpy", "pandas", "pyarrow", "yaml", "tqdm", "PIL", "scipy", "matplotlib", "monai", "SimpleITK", "covseg"]
print("  " + ", ".join(f"{m} {getattr(importlib.import_module(m), '__version__', '?')}" for m in mods))
EOF

# 2. carried lungs-stage output -> $WORK/lungs, $WORK/ingest
T=$(date +%s)
rm -rf "$WORK/lungs" "$WORK/ingest" "$WORK/artifacts" "$WORK/checkpoints"
$PY tools/device/unpack.py "$CARRY" "$WORK"; RC[unpack]=$?
UNPACK_S=$(( $(date +%s) - T ))
say "unpacked in ${UNPACK_S}s"

# 3. the training chain, under the deadline (bench + packing keep $RESERVE s)
BUDGET=$(( DEADLINE - RESERVE - $(elapsed) ))
say "stages: budget ${BUDGET}s"
if [ "${RC[unpack]}" = 0 ] && [ "$BUDGET" -gt 30 ]; then
  timeout -k 10 "$BUDGET" $PY tools/device/run_stages.py --work "$WORK" --out "$OUT" --profile "$PROFILE" --carry "$CARRY"
  RC[stages]=$?
  [ "${RC[stages]}" = 124 ] && say "stages cut at the deadline (see stage_times.json for what finished)"
else
  RC[stages]=skipped
fi

# 4. inference benchmark: the trained segmenter if there is one, else the same architecture, random weights
T=$(date +%s)
$PY tools/device/infer_bench.py --out "$OUT/infer_bench.json" --model "$WORK/artifacts/segment" ${INFER_ARGS:-}
RC[bench]=$?
BENCH_S=$(( $(date +%s) - T ))

# 5. results back: at most 8 files in $OUT (job.log, job.json, stage_times.json, metrics.json,
#    infer_bench.json, artifacts_1.tar, artifacts_2.tar)
[ -d "$WORK/artifacts" ] && $PY tools/device/pack_outputs.py "$WORK/artifacts" "$OUT" --parts 2
RC[pack]=$?
rm -f "$OUT"/*.tmp
RCS=""; for k in "${!RC[@]}"; do RCS="$RCS$k=${RC[$k]} "; done
$PY tools/device/job_summary.py --out "$OUT" --carry "$CARRY" --profile "$PROFILE" --simpleitk "$SITK" \
  --rc "$RCS" --unpack-s "$UNPACK_S" --bench-s "$BENCH_S" --total-s "$(elapsed)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,temperature.gpu,power.draw,clocks.sm,memory.used --format=csv
say "done in $(elapsed)s"
ls -la "$OUT"
sleep 1  # let tee flush job.log
