"""The pipeline stages: pure file-in / file-out functions.

The CLI (`covseg <stage>`), `dvc.yaml` and the KFP components in `components/` are thin bindings of these
functions; tests call them directly. Each stage writes its output folder atomically (all or nothing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from covseg import gates, layout, tracking
from covseg import ingest as ingest_mod
from covseg.io import atomic_dir


def ingest(data_dir: str | Path, out_dir: str | Path, params: dict[str, Any]) -> pd.DataFrame:
    """Raw sources -> canonical cases + manifest (`out_dir/manifest.parquet`)."""
    with atomic_dir(out_dir) as scratch:
        return ingest_mod.ingest(data_dir, scratch, params)


def gate0(ingest_dir: str | Path, report: str | Path, params: dict[str, Any]) -> dict:
    """Gate 0 on the manifest; raises GateFailed (and writes the report) when the raw data is unfit."""
    manifest = pd.read_parquet(Path(ingest_dir) / ingest_mod.MANIFEST)
    return gates.run_gate("gate0", gates.gate0_tables(manifest), gates.gate0_checks(params), report)


def _write_json(path: Path, body: dict) -> None:
    import json

    path.write_text(json.dumps(body, indent=2, default=float))


def lungs(ingest_dir: str | Path, out_dir: str | Path, params: dict[str, Any]) -> pd.DataFrame:
    """Lung masks + harmonised canonical slices (`slices.npz`, `index.parquet`)."""
    from covseg.harmonise import prepare_dataset

    with atomic_dir(out_dir) as scratch:
        return prepare_dataset(ingest_dir, scratch, params)


def classify(
    lungs_dir: str | Path, out_dir: str | Path, params: dict[str, Any], checkpoint_dir: str | Path
) -> dict:
    """Train the slice classifier; `metrics.json` holds validation AUC per source and the source probe."""
    from covseg.camlayer import check_cam_layer
    from covseg.classify import train_classifier

    check_cam_layer(params)  # a Grad-CAM layer the coarse stage cannot use fails now, not after training
    with tracking.stage_run("classify", params, "classify") as run, atomic_dir(out_dir) as scratch:
        result = train_classifier(lungs_dir, scratch, params, checkpoint_dir)
        _write_json(scratch / "metrics.json", result)
        tracking.log_metrics(run, {"val_auc": result["val_auc"], "probe": result["probe"]})
        tracking.log_history(run, result["history"], "classify")
    return result


def coarse(
    lungs_dir: str | Path, classify_dir: str | Path, out_dir: str | Path, params: dict[str, Any]
) -> pd.DataFrame:
    """Grad-CAM coarse labels (`coarse.npz`) and their per-slice statistics (`coarse.parquet`)."""
    from covseg.cam import coarse_labels

    with atomic_dir(out_dir) as scratch:
        return coarse_labels(lungs_dir, classify_dir, scratch, params)


def mil(
    lungs_dir: str | Path,
    classify_dir: str | Path,
    coarse_dir: str | Path,
    out_dir: str | Path,
    params: dict[str, Any],
    checkpoint_dir: str | Path,
) -> dict:
    """MIL refinement (easy -> hard) -> fine labels (`fine.npz`, `fine.parquet`, `metrics.json`)."""
    from covseg.mil import train_mil

    with tracking.stage_run("mil", params, "mil") as run, atomic_dir(out_dir) as scratch:
        result = train_mil(lungs_dir, classify_dir, coarse_dir, scratch, params, checkpoint_dir)
        _write_json(scratch / "metrics.json", result)
        tracking.log_metrics(run, result["quality"])
        tracking.log_history(run, result["history"], "mil")
    return result


def segment(
    lungs_dir: str | Path,
    mil_dir: str | Path,
    out_dir: str | Path,
    params: dict[str, Any],
    checkpoint_dir: str | Path,
) -> dict:
    """Train the U-Net on the fine labels (`segmenter.pt`)."""
    from covseg.segment import train_segmenter

    with tracking.stage_run("segment", params, "segment") as run, atomic_dir(out_dir) as scratch:
        result = train_segmenter(
            lungs_dir, mil_dir, scratch, params, checkpoint_dir, tracking.lineage(params)
        )
        _write_json(scratch / "metrics.json", result)
        tracking.log_metrics(
            run, {"val_fine_dice": result["val_fine_dice"], "in_domain": result["in_domain"]}
        )
        tracking.log_history(run, result["history"], "segment")
    return result


def refine(
    lungs_dir: str | Path,
    coarse_dir: str | Path,
    mil_dir: str | Path,
    segment_dir: str | Path,
    out_dir: str | Path,
    params: dict[str, Any],
    checkpoint_dir: str | Path,
) -> dict:
    """Refinement rounds after the segmenter (`round<r>/`, the final `segmenter.pt`, `rounds.json`)."""
    from covseg.refine import refine as run_rounds

    with tracking.stage_run("refine", params, "refine") as run, atomic_dir(out_dir) as scratch:
        result = run_rounds(
            lungs_dir,
            coarse_dir,
            mil_dir,
            segment_dir,
            scratch,
            params,
            checkpoint_dir,
            tracking.lineage(params),
        )
        tracking.log_metrics(
            run, {"in_domain": result["in_domain"], "final_round": float(result["final_round"])}
        )
        for record in result["rounds"]:
            if "in_domain" in record:
                tracking.log_metrics(run, {f"round{record['round']}": record["in_domain"]})
    return result


def evaluate(
    ingest_dir: str | Path,
    lungs_dir: str | Path,
    coarse_dir: str | Path,
    mil_dir: str | Path,
    segment_dir: str | Path,
    refine_dir: str | Path | None,
    out_dir: str | Path,
    params: dict[str, Any],
) -> dict:
    """Table-1 rows (coarse / fine / each round / final / prior) on the evaluation slices, and the final
    model's in-domain slice ranking beside the HU-band baseline (`metrics.json`)."""
    import json

    from covseg.evaluate import evaluate_pipeline

    with tracking.stage_run("evaluate", params) as run, atomic_dir(out_dir) as scratch:
        table = evaluate_pipeline(
            ingest_dir,
            lungs_dir,
            coarse_dir,
            mil_dir,
            segment_dir,
            refine_dir,
            scratch / "panel.png",
            prior=params["fine"],
        )
        if refine_dir is not None:
            from covseg.refine import ROUNDS

            table["in_domain"] = json.loads((Path(refine_dir) / ROUNDS).read_text())["in_domain"]
        else:
            table["in_domain"] = (
                json.loads((Path(segment_dir) / "metrics.json").read_text()).get("in_domain", {})
                if (Path(segment_dir) / "metrics.json").is_file()
                else {}
            )
        _write_json(scratch / "metrics.json", table)
        tracking.log_metrics(run, table)
        if run is not None:
            import mlflow

            mlflow.log_artifact(str(scratch / "panel.png"), "figures")
    return table


def gate_a(
    classify_dir: str | Path, coarse_dir: str | Path, report: str | Path, params: dict[str, Any]
) -> dict:
    """Gate A between coarse and fine labels: coarse-label statistics + the floor on the classifier's
    validation AUC over lung views (same scanner, both labels: the AUC that cannot be won by the source)."""
    import json

    from covseg.cam import STATS

    stats = pd.read_parquet(Path(coarse_dir) / STATS)
    auc = json.loads((Path(classify_dir) / "metrics.json").read_text())["val_auc"]["lung"]
    tables = gates.label_gate_tables(stats, {"classifier_val_auc": auc})
    return gates.run_gate("gate_a", tables, gates.label_gate_checks(params["gate_a"]), report)


def gate_b(mil_dir: str | Path, report: str | Path, params: dict[str, Any]) -> dict:
    """Gate B after the fine labels: fine-label statistics + MIL negative-instance accuracy floor."""
    import json

    from covseg.mil import STATS

    stats = pd.read_parquet(Path(mil_dir) / STATS)
    quality = json.loads((Path(mil_dir) / "metrics.json").read_text())["quality"]
    tables = gates.label_gate_tables(
        stats, {"mil_val_negative_instance_accuracy": quality["val_negative_instance_accuracy"]}
    )
    return gates.run_gate("gate_b", tables, gates.label_gate_checks(params["gate_b"]), report)


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def register(ingest_dir: str | Path, segment_dir: str | Path, params: dict[str, Any]) -> dict:
    """Log the segmenter as the MLflow pyfunc model `covseg`, register a version, promote or not.

    Candidate and current champion are scored by the same function on the same evaluation slices; the
    candidate takes `champion` only when it passes the absolute floors and the lower `register.confidence`
    bound of its paired per-slice Dice difference to the champion clears `register.margin`, else
    `challenger`. The decision, both scores, the difference and its interval are tags on the version.
    """
    import mlflow
    import numpy as np

    from covseg import model_logging, promotion
    from covseg.evaluate import evaluate_ingested
    from covseg.predict import LesionSegmenter
    from covseg.segment import MODEL
    from covseg.serving import MODEL_CODE, SEGMENTER_META, load_registered_segmenter, signature

    cfg = params["register"]
    if not tracking.enabled():
        raise RuntimeError("register needs MLflow tracking (unset COVSEG_TRACKING=0)")
    segmenter = LesionSegmenter.load(segment_dir)
    candidate = evaluate_ingested(segmenter, ingest_dir, params.get("max_eval_slices", 0))
    with tracking.stage_run("register", params, "register") as run:
        tracking.log_metrics(run, candidate, prefix="eval.")
        weights = Path(segment_dir) / MODEL
        example = np.zeros((1, 64, 64), dtype=np.float32)
        example[0, 16:48, 8:28] = example[0, 16:48, 36:56] = 30.0  # two dark "lungs" in a bright body
        example[example == 0] = 200.0
        version = model_logging.log_segmenter(
            segmenter.model,
            model_code=MODEL_CODE,
            artifacts={SEGMENTER_META: str(weights.with_suffix(".json"))},
            input_example=example,
            signature=signature(),
            registered_name=cfg["name"],
            tags={**tracking.lineage(params), "eval_dice": f"{candidate['dice']:.4f}"},
            pip_requirements=[
                *model_logging.default_pip_requirements(),
                f"monai=={_version('monai')}",
                f"SimpleITK=={_version('SimpleITK')}",
            ],
            code_paths=[str(Path(__file__).parent)],
        )
        champion_scores = lambda uri: evaluate_ingested(  # noqa: E731
            load_registered_segmenter(uri), ingest_dir, params.get("max_eval_slices", 0)
        )["per_slice_dice"]
        decision = promotion.promote(
            mlflow.MlflowClient(),
            cfg["name"],
            promotion.Candidate(
                version.version,
                candidate["dice"],
                tuple(candidate["per_slice_dice"]),
                {k: candidate[k] for k in ("dice", "iou", "ppv", "sensitivity", "specificity")},
            ),
            score_champion=champion_scores,
            margin=cfg["margin"],
            confidence=cfg["confidence"],
            floors=cfg["floors"],
        )
        mlflow.set_tags({"promotion_decision": decision["decision"], "model_version": version.version})
    return {"version": version.version, "candidate": candidate, "decision": decision}


def run_stage(name: str, artifacts: str | Path, data: str | Path, params: dict[str, Any]) -> Any:
    """Run one stage on the artifacts folder (inputs read from it, output written into it)."""
    item, artifacts = layout.stage(name), Path(artifacts)
    args: list[Any] = [Path(data) if i == layout.DATA else artifacts / i for i in item.inputs]
    if item.output is not None:
        args.append(artifacts / item.output)
    args.append(params)
    if item.trains:
        args.append(artifacts / layout.CHECKPOINTS)
    return globals()[name](*args)


def run_all(
    artifacts: str | Path,
    data: str | Path,
    params: dict[str, Any],
    until: str = "evaluate",
    start: str = "ingest",
) -> dict[str, Any]:
    """Run the stages from `start` to `until` (inclusive) in order; returns each stage's result."""
    names = [s.name for s in layout.STAGES]
    return {
        name: run_stage(name, artifacts, data, params)
        for name in names[names.index(start) : names.index(until) + 1]
    }


def run_training_task(
    name: str,
    inputs: dict[str, Any],
    output: Any,
    params: dict[str, Any],
    checkpoint_root: str,
    s3_endpoint_url: str,
    num_nodes: int = 1,
    gpus_per_node: int = 1,
) -> dict:
    """What a pipeline training task runs (classify, mil, segment, refine; `components/`).

    `inputs` maps the stage's input names (`covseg.layout`) to artifacts and `output` is the output
    artifact: anything with `.path` and `.uri` (KFP's). With one process in all (`num_nodes` x
    `gpus_per_node` == 1) the stage trains here, its epoch checkpoints kept under `checkpoint_root`
    (`checkpoint_store.durable_checkpoints`); otherwise a PyTorchJob trains it (`trainjob.train_in_job`)
    and its output is brought into `output.path`. Returns the stage's result either way.
    """
    if num_nodes * gpus_per_node > 1:
        from covseg.trainjob import train_in_job

        uris = {key: artifact.uri for key, artifact in inputs.items()}
        return train_in_job(
            name,
            uris,
            output.uri,
            output.path,
            params,
            num_nodes,
            gpus_per_node,
            checkpoint_root,
            s3_endpoint_url,
        )
    from covseg.checkpoint_store import durable_checkpoints

    item = layout.stage(name)
    with durable_checkpoints(checkpoint_root, name, s3_endpoint_url) as checkpoints:
        return globals()[name](*[inputs[i].path for i in item.inputs], output.path, params, checkpoints)
