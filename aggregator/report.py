"""result.json and audit.jsonl: what a run of a job leaves in its output folder.

result.json contract (later tasks extend it, never break it): task, parties, encrypted,
plaintext, timings_s, bytes, decryptions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedhe.aggregator.job import JobRun
from fedhe.config import JobConfig

_METRICS = ("accuracy", "loss", "train_loss", "log_loss", "auc", "mse", "r2")


def build_result(
    config: JobConfig, he: JobRun, twin: JobRun | None, test_feature_names: tuple[str, ...] = ()
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "task": config.task,
        "parties": {
            "registered": config.parties,
            "min_parties": config.min_parties,
            "per_round": [h["parties"] for h in he.history],
            # Parties by the name the user knows (party-2.csv); `names` maps the protocol ids
            # (party-1) that the key holder's records (decryptions, audit.jsonl) keep.
            "contributors": [
                {**c, "parties": [he.names.get(p, p) for p in c["parties"]]}
                for c in he.contributors
            ],
            "excluded": {he.names.get(p, p): why for p, why in he.excluded.items()},
            "names": he.names,
        },
        "summary": run_summary(config, he, len(test_feature_names)),
        "encrypted": _metrics(he),
        "plaintext": _metrics(twin) if twin else None,
        "timings_s": _rounded(he.timings_s),
        "bytes": he.bytes,
        "decryptions": [e for e in he.audit if e.get("event") == "decrypt"],
        # The key holder's chain head after this job: anchor it outside to detect a rewritten log.
        "audit_head": he.audit[-1].get("hash") if he.audit else None,
        "ckks": _ckks(he),
        "config": config.to_run_config(),
    }
    result.update(he.extras)
    if "coefficients" in he.weights:
        result["coefficients"] = {
            "names": ["intercept", *test_feature_names],
            "encrypted": he.weights["coefficients"].tolist(),
            "plaintext": twin.weights["coefficients"].tolist() if twin else None,
        }
    if twin is not None:
        result["plaintext_timings_s"] = _rounded(twin.timings_s)
        result["plaintext_bytes"] = twin.bytes
        result["agreement"] = {
            **_weight_agreement(he, twin),
            **{
                f"{metric}_diff": abs(he.final[metric] - twin.final[metric])
                for metric in _METRICS
                if metric in he.final and metric in twin.final
            },
        }
    return result


def _weight_agreement(he: JobRun, twin: JobRun) -> dict[str, float]:
    if not he.weights:
        return {}
    diff = max(float(np.max(np.abs(he.weights[k] - twin.weights[k]))) for k in he.weights)
    bounds = [r["quantization_bound"] for r in he.history if "quantization_bound" in r]
    # What rounding to the lanes' steps may add over the rounds (before training amplifies it).
    quantization = {"quantization_bound": float(sum(bounds))} if bounds else {}
    return {"max_abs_weight_diff": diff, **quantization}


def _ckks(run: JobRun) -> dict[str, Any] | None:
    if not run.params:
        return None
    slots = run.params["poly_modulus_degree"] // 2
    return {**run.params, "slots": slots} if run.encrypted else None


def write_run(out_dir: str | Path, result: dict[str, Any], audit: list[dict[str, Any]]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    with (out / "audit.jsonl").open("w") as handle:
        for entry in audit:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
    return out / "result.json"


def _metrics(run: JobRun) -> dict[str, Any]:
    final = {k: run.final[k] for k in _METRICS if k in run.final}
    history = [
        {**h, "dropped": {run.names.get(p, p): why for p, why in h["dropped"].items()}}
        if "dropped" in h
        else h
        for h in run.history
    ]
    return {**final, "history": history}


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in timings.items()}


def run_summary(config: JobConfig, run: JobRun, n_features: int = 0) -> dict[str, Any]:
    """What ran on what, and which parties it used: the head of `fedhe simulate`'s summary."""
    found = len(run.names) or config.parties
    # A party that missed a sum but is in the last one came back: it missed, it was not left out.
    last = set(run.contributors[-1]["parties"]) if run.contributors else set()
    excluded = {run.names.get(p, p): why for p, why in run.excluded.items() if p not in last}
    missed = {run.names.get(p, p): why for p, why in run.excluded.items() if p in last}
    trains = config.task in ("aggregate", "mlp", "logreg") or config.regression_mode in (
        "gradient",
        "encrypted-model",
    )
    return {
        "data": _data_text(config, n_features),
        "task": config.task,
        "mode": config.regression_mode or None,
        "rounds": config.rounds if trains else None,
        "packing": run.extras.get("update_packing"),
        "parties": {
            "expected": config.parties,
            "found": found,
            "used": found - len(excluded),
            "excluded": excluded,
            "missed": missed,
        },
        "keyholders": {
            "count": config.keyholder_count,
            "threshold": config.decryption_threshold,
            "parties_hold_keys": config.parties_hold_keys,
        },
    }


def _data_text(config: JobConfig, n_features: int) -> str:
    """The data a run read: folder and target, how its columns were encoded and filled."""
    if not config.data_dir:
        return f"{config.dataset_name} (built-in)"
    notes = [f"target {config.target}"]
    notes += [f"{n_features} features"] if n_features else []
    notes += [f"columns by {config.schema}"] if config.schema else []
    notes += ["missing cells: global means"] if config.impute == "mean" else []
    return f"{config.data_dir} ({'; '.join(notes)})"
