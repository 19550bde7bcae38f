"""HE-FedAvg (CKKS secure aggregation) against its plaintext FedAvg twin: in process (the
protocol alone, a ~100k-parameter torch MLP on digits, per-phase times and bytes; skipped by
``--flower-only``) and through Flower (``--flower``: ``fedhe simulate aggregate`` end to end,
round time and bytes per parameter from result.json). Methods: simulations/README.md.
Run: python simulations/bench_aggregate.py --parties 10 [--flower | --flower-only]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _bench as bench  # simulations/_bench.py, beside this script
import numpy as np
import torch
from _bench import stats, target
from rich.console import Console

from fedhe import crypto, learning
from fedhe.crypto import AGGREGATION_PARAMS as PARAMS
from fedhe.data import load_builtin, partition_iid
from fedhe.keyholder import DecryptionRequest, KeyHolder
from fedhe.keyholder.inprocess import TaggedParties
from fedhe.keyholder.keyholder import DEFAULT_FLOODING_BITS
from fedhe.learning import ModelSpec, build_model, get_weights
from fedhe.tasks import aggregate

TARGET_ROUND_RATIO = 1.5
TARGET_BYTES_PER_PARAM = 32.0
MODES = ("plaintext", "he")
DIRECTIONS = ("party->aggregator", "aggregator->party", "aggregator->keyholder")
DIRECTIONS += ("keyholder->aggregator",)
PHASES = ("train", "encrypt", "transfer", "compute", "decrypt", "keygen", "total")
RATIOS = ("round_sequential", "round_critical_path", "overhead_critical_path")
RATIOS += ("overhead_sequential",)


PER_PARTY = ("train_s", "encrypt_s", "tag_s", "upload_bytes", "tag_bytes")


def round_summary(r: dict[str, Any]) -> dict[str, Any]:
    """What one FedAvg round of one mode cost, from its per-party lists (`PER_PARTY`: encrypt_s
    holds contribution + tag; tag_s 0 for the twin) and its aggregator and key-holder figures."""
    party = max(a + b for a, b in zip(r["train_s"], r["encrypt_s"], strict=True))
    protect = r["aggregate_s"] + r["decrypt_s"]  # + encryption: the cost of protecting
    uploads = stats("upload_bytes_per_party", r["upload_bytes"], "median", "max")
    return {
        **stats("train_s", r["train_s"], "median", "max", "total"),
        **stats("encrypt_s", r["encrypt_s"], "median", "max", "total"),
        **stats("tag_s", r["tag_s"]),
        **{key: r[key] for key in ("aggregate_s", "decrypt_s", "apply_s")},
        "round_sequential_s": r["sequential_s"],
        "round_critical_path_s": party + protect,
        "precompute_s_per_party": r["precompute_s"] / len(r["train_s"]),
        "overhead_critical_path_s": statistics.median(r["encrypt_s"]) + protect,
        "overhead_sequential_s": sum(r["encrypt_s"]) + protect,
        **{key: int(value) for key, value in uploads.items()},
        "upload_bytes_total": sum(r["upload_bytes"]),
        "tag_bytes_per_party_median": int(statistics.median(r["tag_bytes"])),
        "sum_bytes_to_keyholder": r["sum_bytes"],
        "decrypted_bytes_to_aggregator": r["decrypted_bytes"],
    }


@dataclass
class Mode:
    """One job (HE or plaintext): its key holder declaration, context and global weights."""

    name: str
    job_id: str
    context: crypto.PublicContext | None
    weights: dict[str, np.ndarray]
    parties: TaggedParties
    declared: dict[str, Any]  # keygen_s, register_s, public_context_bytes
    rounds: list[dict[str, Any]] = field(default_factory=list)  # `round_summary`s
    updates: list[np.ndarray] = field(default_factory=list)  # flat, one per measured round


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench.command_line(__doc__, "runs/bench_aggregate.json")
    add = parser.add_argument
    add("--parties", type=int, default=10, help="number of parties (10)")
    add("--rounds", type=int, default=1, help="measured rounds per mode (1)")
    add("--warmup", type=int, default=1, help="unmeasured warm-up rounds per mode (1)")
    add("--hidden", type=int, nargs="*", default=[512, 128], help="MLP widths (≈100k params)")
    add("--clip", type=float, default=10.0, help="clip Δw per coordinate (10)")
    add("--epochs", type=int, default=1, help="local epochs per round (1)")
    add("--batch-size", type=int, default=32)
    add("--lr", type=float, default=0.1)
    add("--min-parties", type=int, default=None, help="job's min_parties (default: all parties)")
    add("--threads", type=int, default=1, help="torch threads, fair on a small machine (1)")
    add("--seed", type=int, default=0)
    add("--flower", action="store_true", help="also run the job through Flower's simulation")
    add("--flower-only", action="store_true", help="run only the Flower mode")
    add("--flower-rounds", type=int, default=12, help="rounds of the Flower job (12)")
    packings = ("auto", "quantized", "complex")
    add("--packing", choices=packings, default="auto", help="updates in slots (auto: the job's)")
    default = bench.REPO / "runs/bench_aggregate_flower"
    add("--flower-out", type=Path, default=default, help="the Flower job's output folder")
    args = bench.parse(parser, argv)
    args.flower = args.flower or args.flower_only
    if args.parties < 2 or args.rounds < 1 or args.warmup < 0 or args.flower_rounds < 1:
        parser.error("--parties must be ≥ 2, --rounds and --flower-rounds ≥ 1, --warmup ≥ 0.")
    args.min_parties = args.min_parties or args.parties
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=150)
    report: dict[str, Any] = {} if args.flower_only else run_in_process(console, args)
    if args.flower:
        report = report or {
            "benchmark": "HE-FedAvg vs plaintext FedAvg through Flower's simulation engine",
            "config": {"dataset": "digits", "parties": args.parties, "seed": args.seed},
            "machine": bench.machine_info(),
        }
        report["flower"] = run_flower(console, args)
    targets = report.get("targets", {}) | report.get("flower", {}).get("targets", {})
    bench.show_targets(console, targets)
    bench.write_json(args.out, report, console)
    return 0


# -- in process ------------------------------------------------------------------------------


def run_in_process(console: Console, args: argparse.Namespace) -> dict[str, Any]:
    train, _ = load_builtin("digits", seed=args.seed)
    X = learning.standardize(train.X, train.X.mean(axis=0), (train.X**2).mean(axis=0))
    parts = partition_iid(train.n_samples, args.parties, seed=args.seed)
    party_data = [(X[idx], train.y[idx]) for idx in parts]
    samples = sum(len(idx) for idx in parts)
    args.sum_bound = args.clip * samples  # as aggregator/fedavg.py: |Σ n_i·Δw_i| ≤ c·Σn_i
    spec = ModelSpec(train.n_features, train.n_classes, tuple(args.hidden))
    initial = get_weights(build_model(spec, seed=args.seed))
    layout = aggregate.Layout.of(initial)
    sizes = {"sum_bound": args.sum_bound, "parties": args.parties, "total_samples": samples}
    # what the job would use (auto resolved)
    args.update_packing = aggregate.choose_packing(args.packing, layout, PARAMS, **sizes)
    console.print(f"{layout.n_params:,} parameters, {args.parties} parties, {samples} samples")
    with tempfile.TemporaryDirectory(prefix="fedhe-bench-") as state_dir:
        keyholder = KeyHolder(state_dir)
        modes = [declare(keyholder, name, layout, initial, args) for name in MODES]
        for index in range(-args.warmup, args.rounds):
            for mode in modes:  # interleaved, so drift of a noisy machine hits both alike
                summary, update = fedavg_round(
                    mode, keyholder, spec, layout, party_data, index, args
                )
                if index >= 0:
                    mode.rounds.append(summary)
                    mode.updates.append(update)
                    change = layout.unflatten(update)
                    mode.weights = {k: mode.weights[k] + v for k, v in change.items()}
    return in_process_report(dict(zip(MODES, modes, strict=True)), layout, spec, samples, args)


def declare(
    keyholder: KeyHolder, name: str, layout: aggregate.Layout, weights: dict, args: Any
) -> Mode:
    job_id = f"bench-{name}"
    outputs = {aggregate.OUTPUT: (args.warmup + args.rounds, layout)}
    declaration = aggregate.declare(
        job_id, outputs=outputs, min_parties=args.min_parties, encrypted=name == "he"
    )
    public, keygen_s = bench.timed_call(keyholder.declare_job, declaration)
    # The parties register once per job, outside the rounds (the twin registers nothing).
    names = [f"party-{i}" for i in range(args.parties)]
    parties, register_s = bench.register(keyholder, job_id, names)
    declared = {"keygen_s": keygen_s, "register_s": register_s, "public_context_bytes": len(public)}
    return Mode(name, job_id, bench.context_of(public), dict(weights), parties, declared)


def fedavg_round(
    mode: Mode,
    keyholder: KeyHolder,
    spec: ModelSpec,
    layout: aggregate.Layout,
    party_data: list[tuple[np.ndarray, np.ndarray]],
    index: int,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], np.ndarray]:
    """One round of `mode` (round number max(index, 0) + 1, release label index + warmup): its
    `round_summary` and the update it produced (flat)."""
    r: dict[str, Any] = {key: [] for key in PER_PARTY}
    label, contributions, tags = index + args.warmup, {}, {}
    encoding = {"sum_bound": args.sum_bound, "packing": args.update_packing}
    encoding["parties"] = args.parties
    # Parties at their own sites make their next Enc(0)s while idle between rounds: here the
    # pools fill after the round (timed apart as `precompute_s`), never during the round.
    with crypto.pause_precompute(), bench.timed(r, "sequential_s"):
        for i, (X, y) in enumerate(party_data):
            name = mode.parties.names[i]
            model = build_model(spec, seed=0)
            learning.set_weights(model, mode.weights)
            seed = args.seed * 1000 + (max(index, 0) + 1) * 100 + i
            config = learning.TrainConfig(args.epochs, args.batch_size, args.lr, seed=seed)
            with bench.timed(r, "train_s"):
                learning.local_train(model, X, y, config)
            new, clip = get_weights(model), args.clip
            delta = {k: np.clip(new[k] - w, -clip, clip) for k, w in mode.weights.items()}
            tag = b""  # the plaintext twin has no MAC key: nothing to tag
            with bench.timed(r, "encrypt_s"):
                contributions[name] = data = aggregate.party_contribution(
                    delta, len(y), layout, mode.context, **encoding
                )
                started = time.perf_counter()
                if mode.context is not None:
                    tag = mode.parties.tag(name, aggregate.OUTPUT, data, label)
                r["tag_s"].append(time.perf_counter() - started if tag else 0.0)
            tags[name] = tag
            r["upload_bytes"].append(len(data) + len(tag))
            r["tag_bytes"].append(len(tag))
        with bench.timed(r, "aggregate_s"):
            total = aggregate.aggregator_sum(
                contributions, layout, mode.context, min_parties=args.min_parties, **encoding
            )
        # The aggregator forwards the sum with the tags of the parties it summed.
        relayed = {n: tags[n] for n in total.contributors} if mode.context is not None else {}
        r["sum_bytes"] = len(total.tensor) + sum(len(tag) for tag in relayed.values())
        with bench.timed(r, "decrypt_s"):
            request = DecryptionRequest(
                mode.job_id, aggregate.OUTPUT, total.contributors, total.tensor, label, relayed
            )
            flat = aggregate.keyholder_decrypt_sum(keyholder, request)
        r["decrypted_bytes"] = 8 * int(np.asarray(flat).size)
        with bench.timed(r, "apply_s"):
            update, _ = aggregate.average_update(flat, layout)
            model = build_model(spec, seed=0)
            learning.set_weights(model, {k: mode.weights[k] + update[k] for k in mode.weights})
    with bench.timed(r, "precompute_s"):
        crypto.wait_for_precompute()
    return round_summary(r), layout.flatten(update)


def in_process_report(
    modes: dict[str, Mode], layout: aggregate.Layout, spec: ModelSpec, samples: int, args: Any
) -> dict[str, Any]:
    per_mode: dict[str, Any] = {}
    for name, mode in modes.items():
        summary = {k: statistics.median(s[k] for s in mode.rounds) for k in mode.rounds[0]}
        per_param = summary["upload_bytes_per_party_median"] / layout.n_params
        summary["bytes_per_param_upload"] = per_param
        per_mode[name] = {"encrypted": name == "he", **mode.declared, "summary": summary}
        per_mode[name]["rounds"] = mode.rounds
    hs, ps = per_mode["he"]["summary"], per_mode["plaintext"]["summary"]
    ratios = {key: hs[f"{key}_s"] / ps[f"{key}_s"] for key in RATIOS}
    ratios["upload_bytes"] = (
        hs["upload_bytes_per_party_median"] / ps["upload_bytes_per_party_median"]
    )
    he, plain = modes["he"].updates, modes["plaintext"].updates
    diffs = [float(np.max(np.abs(h - p))) for h, p in zip(he, plain, strict=True)]
    level, scale_bits = PARAMS.encoding_for(args.sum_bound)
    keys = ("parties", "rounds", "clip", "epochs", "batch_size", "lr", "min_parties", "seed")
    config = {k: getattr(args, k) for k in keys} | {"warmup_rounds": args.warmup}
    config |= {"model": spec.to_dict(), "torch_threads": args.threads, "total_samples": samples}
    config |= {"sum_bound": args.sum_bound, "packing": args.update_packing}
    config["encoding"] = encoding_text(layout, args.sum_bound, args.update_packing, args.parties)
    config["keyholder_flooding_bits"] = DEFAULT_FLOODING_BITS
    config["timing"] = (
        "time.perf_counter; median over measured rounds; per-party phases summarized over parties"
    )
    sequential, critical = ratios["round_sequential"], ratios["round_critical_path"]
    return {
        "benchmark": "HE-FedAvg vs plaintext FedAvg, one in-process round (no Flower)",
        "config": {"dataset": "digits", **config},
        "n_params": layout.n_params,
        "layout_size": layout.size,
        "ckks_params": PARAMS.to_dict(),
        # What fedhe.crypto.encrypt uses for this bound: the level, and the scale grown into it.
        "ckks_level": level,
        "ckks_scale_bits": scale_bits,
        "modes": per_mode,
        "ratios_he_over_plaintext": ratios,
        "targets": {
            "round_time_ratio_sequential": target(sequential, TARGET_ROUND_RATIO),
            "round_time_ratio_critical_path": target(critical, TARGET_ROUND_RATIO),
            "bytes_per_param_upload": target(hs["bytes_per_param_upload"], TARGET_BYTES_PER_PARAM),
        },
        "max_abs_diff": max(diffs),
        "max_abs_diff_per_round": diffs,
        "machine": bench.machine_info(),
    }


# -- through Flower --------------------------------------------------------------------------


def run_flower(console: Console, args: argparse.Namespace) -> dict[str, Any]:
    from fedhe.cli import simulate
    from fedhe.config import JobConfig

    logging.getLogger("flwr").setLevel(logging.WARNING)
    job = {"parties": args.parties, "min_parties": max(2, args.parties // 2), "dataset": "digits"}
    job |= {"rounds": args.flower_rounds, "hidden": ",".join(map(str, args.hidden))}
    job |= {"local_epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr}
    job |= {"clip": args.clip, "seed": args.seed, "out": str(args.flower_out)}
    # the comparison needs the twin (off by default since deploy)
    config = JobConfig.of(task="aggregate", packing=args.packing, plaintext_twin=True, **job)
    # simulate() only checks that result.json exists: never read a previous run's file.
    (args.flower_out / "result.json").unlink(missing_ok=True)
    console.print(f"Flower: {config.parties} parties, HE job then plaintext twin → {config.out}")
    started = time.perf_counter()
    path = simulate(config)
    wall_s = time.perf_counter() - started
    return flower_report(json.loads(path.read_text()), path, wall_s, config)


def flower_report(result: dict[str, Any], path: Any, wall_s: float, config: Any) -> dict:
    """The figures of one result.json, with the update uploads separated from the moments."""
    from fedhe.tasks.moments import OUTPUT as MOMENTS
    from fedhe.tasks.moments import SUM_BOUND as MOMENTS_BOUND

    if result.get("plaintext") is None:
        raise bench.BenchError(f"{path} has no plaintext twin run: rerun with the twin on.")
    _, test = load_builtin(config.dataset, seed=config.seed)
    spec = ModelSpec(test.n_features, max(test.n_classes, 2), config.hidden_widths)
    layout = aggregate.Layout.of(get_weights(build_model(spec, seed=config.seed)))
    n_params = layout.n_params
    contributors = result["parties"]["contributors"]
    moments_parties = next((c["parties"] for c in contributors if c["output"] == MOMENTS), [])
    indices = [int(name.rsplit("-", 1)[1]) for name in moments_parties]
    public = crypto.generate_keys(PARAMS).public()
    twin = (result.get("plaintext_timings_s", {}), result.get("plaintext_bytes", {}), None)
    runs = {
        "he": (result["encrypted"], result["timings_s"], result["bytes"], public),
        "plaintext": (result["plaintext"], *twin),
    }
    per_run: dict[str, Any] = {}
    for name, (metrics, timings, sent, context) in runs.items():
        history = metrics["history"]
        round_s = [h["round_s"] for h in history]
        uploads = sum(h["parties"] for h in history)
        moments = moments_upload_bytes(config, indices, len(moments_parties), context)
        uploaded = sent.get("party->aggregator", 0)
        update_bytes = (uploaded - moments) / max(uploads, 1)
        per_run[name] = {
            "round_s": round_s,
            "round_s_median": statistics.median(round_s),
            "timings_s": timings,
            "bytes": sent,
            "moments_uploads": len(moments_parties),
            "moments_upload_bytes_rebuilt": moments,
            "update_uploads": uploads,
            "update_upload_bytes": update_bytes,
            "bytes_per_param_update_upload": update_bytes / n_params,
            "bytes_per_param_all_uploads": uploaded / (n_params * max(uploads, 1)),
            "final": {k: metrics[k] for k in ("accuracy", "loss", "train_loss") if k in metrics},
            "history": history,
        }
    he, plain = per_run["he"], per_run["plaintext"]
    ratio = he["round_s_median"] / plain["round_s_median"]
    bound = config.training.clip * result["encrypted"]["history"][0]["samples"]
    packing = result.get("update_packing", config.fedavg.packing)  # what auto chose
    update = encoding(bound) | {"encoding": encoding_text(layout, bound, packing, config.parties)}
    per_round = [h / p for h, p in zip(he["round_s"], plain["round_s"], strict=True)]
    per_param = he["bytes_per_param_update_upload"]
    return {
        "measures": "fedhe.cli.simulate end to end: round_s = the aggregator's wall time of a "
        "round (Flower messaging, local training, encryption, sum, key-holder decryption, "
        "averaging, test evaluation); timings_s are job totals (moments + all rounds)",
        "result_json": str(path),
        "simulate_wall_s": wall_s,
        "config": config.to_run_config(),
        "n_params": n_params,
        "ckks": {"params": PARAMS.to_dict(), "update": update, "moments": encoding(MOMENTS_BOUND)},
        "he": he,
        "plaintext": plain,
        "phases": ordered(PHASES, he["timings_s"], plain["timings_s"]),
        "directions": ordered(DIRECTIONS, he["bytes"], plain["bytes"]),
        "ratios_he_over_plaintext": {
            "round_s_median": ratio,
            "round_s_per_round": per_round,
            "update_upload_bytes": he["update_upload_bytes"] / plain["update_upload_bytes"],
        },
        "bytes_per_param_note": "party->aggregator minus the feature-moments uploads (rebuilt "
        "here with the job's layout, bound and parameters; CKKS sizes of the rebuilt moments "
        "ciphertexts may differ from the sent ones by a few bytes of compression), divided by "
        "the update uploads (Σ parties per round) and n_params; all_uploads keeps the moments",
        "agreement": result.get("agreement", {}),
        "targets": {
            "round_time_ratio_median": target(ratio, TARGET_ROUND_RATIO),
            "bytes_per_param_update_upload": target(per_param, TARGET_BYTES_PER_PARAM),
        },
    }


def ordered(known: tuple[str, ...], *blocks: dict[str, Any]) -> list[str]:
    """The keys of `blocks`: those of `known` in its order, then the others sorted."""
    present = set().union(*blocks)
    return [k for k in known if k in present] + sorted(present - set(known))


def moments_upload_bytes(
    config: Any, indices: list[int], n_terms: int, context: crypto.PublicContext | None
) -> int:
    """Bytes of the feature-moments uploads of parties `indices`, built as clients/party.py does."""
    from fedhe.data.sources import DataSource, party_data
    from fedhe.tasks.moments import SUM_BOUND

    source = DataSource(config.dataset, "", "", config.seed, config.parties)
    total = 0
    for data in (party_data(source, index) for index in indices):
        arrays = [data.X.mean(axis=0), (data.X**2).mean(axis=0)]
        layout, bound = aggregate.Layout.of(arrays), {"sum_bound": SUM_BOUND, "n_terms": n_terms}
        total += len(aggregate.party_contribution(arrays, data.n_samples, layout, context, **bound))
    return total


def encoding(sum_bound: float) -> dict[str, Any]:
    level, scale_bits = PARAMS.encoding_for(sum_bound)
    return {"sum_bound": sum_bound, "level": level, "scale_bits": scale_bits}


def encoding_text(layout: aggregate.Layout, sum_bound: float, packing: str, parties: int) -> str:
    """How an update sits in the ciphertexts, in words."""
    if packing == "quantized":
        lanes = aggregate.lanes_for(layout, PARAMS, sum_bound=sum_bound, parties=parties)
        return (
            f"quantized: 4 values per slot, guard 2^{lanes.guard_bits}, "
            f"{lanes.lane_bits}-bit lanes, step 2^{lanes.steps[0][1]}"
        )
    level, scale_bits = PARAMS.encoding_for(sum_bound)
    return f"complex: 2 values per slot, level {level}, scale 2^{scale_bits}"


if __name__ == "__main__":
    raise SystemExit(main())
