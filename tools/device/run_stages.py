"""Run the training chain classify -> coarse -> [gate A] -> mil -> [gate B] -> segment -> evaluate on
unpacked lungs-stage output, timing each stage (device side; also the CPU rehearsal).

    python3 tools/device/run_stages.py --work WORK --out OUT [--profile full] [--overrides JSON]

WORK holds lungs/ and ingest/ (tools/device/unpack.py); the stages write WORK/artifacts/<stage>. Calls the
stage functions of `covseg.stages` exactly as `covseg run` does, with tracking off (COVSEG_TRACKING=0: no
MLflow there). Gates run only when great_expectations imports (not on the device: skipped, and said so).
After each stage OUT/stage_times.json is rewritten, so a run cut short still reports what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

os.environ["COVSEG_TRACKING"] = "0"


def instrument_fit(loops: list[dict]) -> None:
    """Time each training loop (`covseg.training.fit`, as bound in classify / mil / segment): observation
    only, the loop itself is untouched. A stage's time minus its loops is loading + inference + labels."""
    import importlib

    import covseg.training as training

    original = training.fit

    def timed_fit(model, epochs, run_epoch, optimizer, checkpoint, desc, **options):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        history = original(model, epochs, run_epoch, optimizer, checkpoint, desc, **options)
        loops.append({"loop": desc, "epochs": len(history), "seconds": round(time.perf_counter() - t0, 2)})
        print(f"    loop {desc}: {len(history)} epochs, {loops[-1]['seconds']} s", flush=True)
        return history

    for name in ("covseg.classify", "covseg.mil", "covseg.segment"):
        module = importlib.import_module(name)
        if getattr(module, "fit", None) is original:
            module.fit = timed_fit


def write_json(path: Path, body: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=2, default=float))
    tmp.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--profile", default="full")
    parser.add_argument(
        "--overrides",
        default=os.environ.get("DEVICE_OVERRIDES", ""),
        help='JSON merged over the profile, e.g. \'{"segment": {"epochs": 30}}\'',
    )
    parser.add_argument(
        "--stages",
        default="classify,coarse,gate_a,mil,gate_b,segment,evaluate",
        help="comma-separated; 'none' = the checks only",
    )
    parser.add_argument("--carry", default=None, help="carry folder: check its lungs key against this tree")
    args = parser.parse_args()

    import torch

    from covseg import stages
    from covseg.config import load_params, params_hash

    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = json.loads(args.overrides) if args.overrides.strip() else None
    params = load_params(args.profile, overrides=overrides)
    art = work / "artifacts"
    paths = {
        name: art / name for name in ("classify", "coarse", "mil", "segment", "refine", "evaluate", "gates")
    }
    lungs, ingest, checkpoints = work / "lungs", work / "ingest", work / "checkpoints"

    index_size = __import__("numpy").load(lungs / "slices.npz")["image"].shape[-1]
    if index_size != params["image_size"]:
        print(
            f"error: carried lungs are {index_size} px, profile {args.profile} wants {params['image_size']}: "
            "rerun tools/device/prepare.py",
            file=sys.stderr,
        )
        return 2

    carry_check: dict[str, object] = {}
    if args.carry:  # was the carried lungs output made from this tree's lungs code, params and manifest?
        from prepare import lungs_key

        carried = json.loads((Path(args.carry) / "carry.json").read_text())["lungs_key"]
        expected = f"lungs-{args.profile}-{lungs_key(params, Path(args.carry) / 'ingest')}"
        carry_check = {"carried": carried, "this_tree": expected, "matches": carried == expected}
        if carried != expected:
            print(
                f"warning: carried lungs output {carried} was not made from this tree ({expected}): "
                "rerun tools/device/prepare.py (the job goes on with what was carried)",
                flush=True,
            )

    try:
        import great_expectations  # noqa: F401

        have_gx = True
    except ImportError:
        have_gx = False

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    record: dict[str, object] = {
        "profile": args.profile,
        "overrides": overrides,
        "params_hash": params_hash(params),
        "epochs": {k: params[k]["epochs"] for k in ("classify", "mil", "segment")},
        "probe_epochs": params["classify"]["probe_epochs"],
        "draws_per_epoch": {k: params[k]["draws_per_epoch"] for k in ("classify", "mil", "segment")},
        "image_size": params["image_size"],
        "device": dev,
        "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "carry_check": carry_check,
        "stages": {},
        "seconds": {},
        "status": "running",
    }

    calls = {
        "classify": lambda: stages.classify(lungs, paths["classify"], params, checkpoints),
        "coarse": lambda: stages.coarse(lungs, paths["classify"], paths["coarse"], params),
        "gate_a": lambda: stages.gate_a(
            paths["classify"], paths["coarse"], paths["gates"] / "gate_a.json", params
        ),
        "mil": lambda: stages.mil(
            lungs, paths["classify"], paths["coarse"], paths["mil"], params, checkpoints
        ),
        "gate_b": lambda: stages.gate_b(paths["mil"], paths["gates"] / "gate_b.json", params),
        "segment": lambda: stages.segment(lungs, paths["mil"], paths["segment"], params, checkpoints),
        "refine": lambda: stages.refine(
            lungs, paths["coarse"], paths["mil"], paths["segment"], paths["refine"], params, checkpoints
        ),
        "evaluate": lambda: stages.evaluate(
            ingest,
            lungs,
            paths["coarse"],
            paths["mil"],
            paths["segment"],
            paths["refine"],
            paths["evaluate"],
            params,
        ),
    }
    loops: list[dict] = []
    instrument_fit(loops)
    current = {"stage": None}

    def on_deadline(signum: int, frame: object) -> None:  # job.sh's `timeout` sends SIGTERM
        record["status"] = f"cut at the deadline during {current['stage']}"
        write_json(out / "stage_times.json", record)
        print(f"=== cut at the deadline during {current['stage']}", flush=True)
        os._exit(124)

    signal.signal(signal.SIGTERM, on_deadline)
    t_all = time.perf_counter()
    for name in [] if args.stages == "none" else args.stages.split(","):
        if name.startswith("gate") and not have_gx:
            record["stages"][name] = {
                "status": "skipped: great_expectations is not installed here; run "
                "tools/device/gates_here.py on the returned artifacts"
            }
            write_json(out / "stage_times.json", record)
            continue
        print(f"=== {name} ===", flush=True)
        current["stage"] = name
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        n_loops = len(loops)
        try:
            result = calls[name]()
        except Exception as exc:  # record, then stop the chain: later stages need this one's output
            record["stages"][name] = {
                "status": f"failed: {type(exc).__name__}: {exc}",
                "seconds": time.perf_counter() - t0,
            }
            record["status"] = f"failed at {name}"
            write_json(out / "stage_times.json", record)
            traceback.print_exc()
            return 1
        seconds = time.perf_counter() - t0
        entry: dict[str, object] = {"status": "ok", "seconds": round(seconds, 2)}
        if len(loops) > n_loops:
            entry["training_loops"] = loops[n_loops:]
            entry["outside_loops_s"] = round(seconds - sum(lp["seconds"] for lp in loops[n_loops:]), 2)
        if dev == "cuda":
            entry["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        if name in ("classify", "mil", "segment") and isinstance(result, dict):
            history = result.get("history") or []
            entry["epochs_run"] = len(history)
            entry["last_loss"] = history[-1].get("loss") if history else None
        if name == "classify":
            entry["val_auc"] = result["val_auc"]
            entry["probe"] = result["probe"]
        if name == "mil":
            entry["quality"] = result["quality"]
        if name.startswith("gate"):
            entry["passed"] = result.get("passed", result.get("success"))
        record["stages"][name] = entry
        record["seconds"][name] = entry["seconds"]
        print(f"=== {name}: {seconds:.1f} s", flush=True)
        write_json(out / "stage_times.json", record)
        if name == "evaluate":
            write_json(out / "metrics.json", result)
    record["seconds"]["total"] = round(time.perf_counter() - t_all, 2)
    record["status"] = "ok"
    write_json(out / "stage_times.json", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
