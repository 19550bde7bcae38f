"""Benchmark HE-FedAvg (CKKS secure aggregation) against its plaintext FedAvg twin, two ways.

Mode 1, in process (default; skipped by ``--flower-only``): the protocol's own cost. No Flower,
no network, no Ray; the parties run one after another in this process.

* A torch MLP of about 100k parameters (``--hidden 512 128``) on scikit-learn's built-in
  ``digits`` data (64 features, 10 classes), split IID over ``--parties`` parties (10).
* ``--rounds`` FedAvg rounds per mode (1), both modes through the same code path of
  ``fedhe.tasks.aggregate`` (``context=None`` is the plaintext twin): every party trains one
  local epoch from the same global weights, clips Δw to ±clip (as ``clients/party.py`` does),
  builds its contribution (``party_contribution``) and (HE) tags it for the round's release
  and seals the tag to the key holder (``fedhe.keyholder.inprocess.TaggedParties``, the
  parties registered with the key holder at declaration, outside every round); the aggregator
  sums (``aggregator_sum``); the key holder verifies the tags of the summed parties and
  decrypts (``keyholder_decrypt_sum``, round label = the round's index, warm-up included); the
  aggregator averages and applies.
* Per phase wall time (``time.perf_counter``): train and encrypt per party (encrypt includes
  the tagging, also reported alone as "tag"), aggregate, decrypt (tag checks included); bytes
  party→aggregator (contribution + sealed tag), aggregator→key holder (the sum + the summed
  parties' sealed tags), key holder→aggregator (float64, 8·size), and the public context once;
  bytes per model parameter of one party's upload (its tag included).
* The round time two ways: "sequential" (the whole round's wall time here, the parties one
  after another) and "critical path" (max over parties of train+encrypt, plus aggregate and
  decrypt: parties running in parallel at their own sites). Ratios HE/plaintext, checked
  against the targets round time ≤ 1.5× plaintext and ≤ 32 bytes per parameter on the wire.
* Correctness: max |HE averaged update − plaintext averaged update| (same seeds, so local
  training is identical in both modes).

Before the measured rounds, each mode runs ``--warmup`` unmeasured rounds (imports, torch and
TenSEAL first-call costs); key generation happens at job declaration, outside any round.
Features are standardized with the training set's moments, computed in the clear.

Mode 2, Flower (``--flower`` or ``--flower-only``): the federated job end to end. It calls
``fedhe.cli.simulate`` (the library behind ``fedhe simulate aggregate``) with the same model,
data, clip and seed: ``--parties`` party SuperNodes plus one key-holder SuperNode in Flower's
simulation engine (Ray; as many concurrent nodes as this machine has CPUs), ``--flower-rounds``
rounds (3), min_parties = max(2, parties // 2), the HE job first and then its plaintext twin
over the same nodes (so the HE job's first round also pays the nodes' first-call costs, e.g.
torch in each Ray actor; the median over ≥ 3 rounds leaves that round out). No warm-up round:
what is measured is the job as a user runs it. Read back from the job's result.json:

* Round time: ``history[i].round_s``, the aggregator's wall time of round i (send the global
  weights, local training, encryption, replies through Flower, homomorphic sum, decryption at
  the key holder, averaging, test-set evaluation); median over rounds, HE vs plaintext, checked
  against round time ≤ 1.5× plaintext. This is the round time of the federated setting.
* Per phase: the job's ``timings_s`` (totals over the feature-moments secure sum and all rounds;
  train and encrypt count the slowest party of each exchange, transfer the rest of its wall
  time, compute the aggregator's sum).
* Bytes per direction as the aggregator counted them (fedhe payloads and weights, not Flower's
  framing). party→aggregator holds one feature-moments upload per party plus one update per
  party per round; the moments uploads are rebuilt here (same layout, bound and encryption) and
  subtracted to get bytes per update upload and bytes per parameter.
* Final test accuracy of both runs and ``agreement.max_abs_weight_diff`` of their final weights.

Run:  .venv/bin/python simulations/bench_aggregate.py --parties 10 [--flower | --flower-only]
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

import numpy as np
import torch
from machine import fmt_bytes, machine_info  # simulations/machine.py, beside this script
from rich.console import Console
from rich.table import Table

from fedhe.crypto import (
    AGGREGATION_PARAMS,
    PublicContext,
    generate_keys,
    pause_precompute,
    wait_for_precompute,
)
from fedhe.data import load_builtin, partition_iid
from fedhe.keyholder import DecryptionRequest, KeyHolder
from fedhe.keyholder.inprocess import TaggedParties
from fedhe.keyholder.keyholder import DEFAULT_FLOODING_BITS
from fedhe.learning import (
    ModelSpec,
    TrainConfig,
    build_model,
    get_weights,
    local_train,
    set_weights,
    standardize,
)
from fedhe.tasks import aggregate

TARGET_ROUND_RATIO = 1.5
TARGET_BYTES_PER_PARAM = 32.0
MODES = ("plaintext", "he")


@dataclass
class RoundResult:
    """What one FedAvg round of one mode cost, and the update it produced."""

    train_s: list[float] = field(default_factory=list)
    encrypt_s: list[float] = field(default_factory=list)  # contribution + tag (HE)
    tag_s: list[float] = field(default_factory=list)  # the tag alone (0 for the twin)
    upload_bytes: list[int] = field(default_factory=list)  # contribution + sealed tag
    tag_bytes: list[int] = field(default_factory=list)
    aggregate_s: float = 0.0
    decrypt_s: float = 0.0
    apply_s: float = 0.0
    sequential_s: float = 0.0
    precompute_s: float = 0.0  # all parties' Enc(0)s for the next round, made while idle
    sum_bytes: int = 0
    decrypted_bytes: int = 0
    update: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def critical_path_s(self) -> float:
        party = max(t + e for t, e in zip(self.train_s, self.encrypt_s, strict=True))
        return party + self.aggregate_s + self.decrypt_s

    def summary(self) -> dict[str, Any]:
        return {
            "train_s_median": statistics.median(self.train_s),
            "train_s_max": max(self.train_s),
            "train_s_total": sum(self.train_s),
            "encrypt_s_median": statistics.median(self.encrypt_s),
            "encrypt_s_max": max(self.encrypt_s),
            "encrypt_s_total": sum(self.encrypt_s),
            "tag_s_median": statistics.median(self.tag_s),
            "tag_s_total": sum(self.tag_s),
            "aggregate_s": self.aggregate_s,
            "decrypt_s": self.decrypt_s,
            "apply_s": self.apply_s,
            "round_sequential_s": self.sequential_s,
            "round_critical_path_s": self.critical_path_s,
            "precompute_s_per_party": self.precompute_s / len(self.train_s),
            # The cost of protecting the update: encrypt (or serialize) + sum + decrypt (or load).
            "overhead_critical_path_s": (
                statistics.median(self.encrypt_s) + self.aggregate_s + self.decrypt_s
            ),
            "overhead_sequential_s": sum(self.encrypt_s) + self.aggregate_s + self.decrypt_s,
            "upload_bytes_per_party_median": int(statistics.median(self.upload_bytes)),
            "upload_bytes_per_party_max": max(self.upload_bytes),
            "upload_bytes_total": sum(self.upload_bytes),
            "tag_bytes_per_party_median": int(statistics.median(self.tag_bytes)),
            "sum_bytes_to_keyholder": self.sum_bytes,
            "decrypted_bytes_to_aggregator": self.decrypted_bytes,
        }


@dataclass
class Mode:
    """One job (HE or plaintext): its key holder declaration, context and global weights."""

    name: str
    encrypted: bool
    job_id: str
    context: PublicContext | None
    public_bytes: int
    keygen_s: float
    weights: dict[str, np.ndarray]
    parties: TaggedParties
    register_s: float
    rounds: list[RoundResult] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parties", type=int, default=10, help="number of parties (10)")
    parser.add_argument("--rounds", type=int, default=1, help="measured rounds per mode (1)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="unmeasured warm-up rounds per mode, update discarded (1)",
    )
    parser.add_argument(
        "--hidden",
        type=int,
        nargs="*",
        default=[512, 128],
        help="hidden layer widths of the MLP (512 128: ≈100k parameters)",
    )
    parser.add_argument("--clip", type=float, default=10.0, help="clip Δw per coordinate (10)")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round (1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument(
        "--min-parties", type=int, default=None, help="job's min_parties (default: all parties)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads for fairness on a small, noisy machine (1)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_aggregate.json"))
    parser.add_argument(
        "--flower",
        action="store_true",
        help="also run the job end to end in Flower's simulation engine (fedhe.cli.simulate)",
    )
    parser.add_argument(
        "--flower-only", action="store_true", help="run only the Flower mode (implies --flower)"
    )
    parser.add_argument(
        "--flower-rounds", type=int, default=12, help="rounds of the Flower job (12)"
    )
    parser.add_argument(
        "--packing",
        choices=("auto", "quantized", "complex"),
        default="auto",
        help="how updates sit in slots: auto (the job's default), quantized (4 per slot), complex",
    )
    parser.add_argument(
        "--flower-out",
        type=Path,
        default=Path("runs/bench_aggregate_flower"),
        help="output folder of the Flower job: result.json, audit.jsonl",
    )
    args = parser.parse_args(argv)
    args.flower = args.flower or args.flower_only
    if args.parties < 2:
        parser.error("--parties must be at least 2 (the key holder's floor).")
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be ≥ 1 and --warmup ≥ 0.")
    if args.flower_rounds < 1:
        parser.error("--flower-rounds must be ≥ 1.")
    if args.min_parties is None:
        args.min_parties = args.parties
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console()
    report: dict[str, Any] = {}
    if not args.flower_only:
        report = _run_in_process(console, args)
    if args.flower:
        flower = _run_flower(console, args)
        if not report:
            report = {
                "benchmark": "HE-FedAvg vs plaintext FedAvg through Flower's simulation engine",
                "config": {"dataset": "digits", "parties": args.parties, "seed": args.seed},
                "machine": machine_info(),
            }
        report["flower"] = flower
    _print(console, report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


def _run_in_process(console: Console, args: argparse.Namespace) -> dict[str, Any]:
    """Mode 1: the protocol alone, in this process (see the module docstring)."""
    train, _ = load_builtin("digits", seed=args.seed)
    X = standardize(train.X, train.X.mean(axis=0), (train.X**2).mean(axis=0))
    parts = partition_iid(train.n_samples, args.parties, seed=args.seed)
    party_data = [(X[idx], train.y[idx]) for idx in parts]
    total_samples = sum(len(idx) for idx in parts)
    sum_bound = args.clip * total_samples  # as aggregator/fedavg.py: |Σ n_i·Δw_i| ≤ c·Σn_i

    spec = ModelSpec(train.n_features, train.n_classes, tuple(args.hidden))
    initial = get_weights(build_model(spec, seed=args.seed))
    layout = aggregate.Layout.of(initial)
    n_params = layout.n_params
    args.update_packing = aggregate.choose_packing(  # what the job would use (auto resolved)
        args.packing,
        layout,
        AGGREGATION_PARAMS,
        sum_bound=sum_bound,
        parties=args.parties,
        total_samples=total_samples,
    )
    console.print(
        f"model {spec.to_dict()}: [bold]{n_params:,}[/bold] parameters; "
        f"{args.parties} parties, {total_samples} samples, sum bound {sum_bound:g}"
    )

    with tempfile.TemporaryDirectory(prefix="fedhe-bench-") as state_dir:
        keyholder = KeyHolder(state_dir)
        modes = [_declare(keyholder, name, name == "he", layout, initial, args) for name in MODES]
        for round_index in range(-args.warmup, args.rounds):
            for mode in modes:  # interleaved, so drift of a noisy machine hits both alike
                result = _fedavg_round(
                    mode,
                    keyholder,
                    spec,
                    layout,
                    party_data,
                    sum_bound,
                    round_number=max(round_index, 0) + 1,
                    label=round_index + args.warmup,  # the release's round: each once
                    args=args,
                )
                if round_index >= 0:
                    mode.rounds.append(result)
                    mode.weights = {
                        k: mode.weights[k] + v for k, v in layout.unflatten(result.update).items()
                    }

    by_name = {mode.name: mode for mode in modes}
    return _report(by_name, n_params, layout, spec, total_samples, sum_bound, args)


def _declare(
    keyholder: KeyHolder,
    name: str,
    encrypted: bool,
    layout: aggregate.Layout,
    weights: dict[str, np.ndarray],
    args: argparse.Namespace,
) -> Mode:
    job_id = f"bench-{name}"
    declaration = aggregate.declare(
        job_id,
        outputs={aggregate.OUTPUT: (args.warmup + args.rounds, layout)},
        min_parties=args.min_parties,
        encrypted=encrypted,
    )
    started = time.perf_counter()
    public = keyholder.declare_job(declaration)
    keygen_s = time.perf_counter() - started
    context = PublicContext.from_bytes(public) if public else None
    # The parties register once per job (sealed seeds → the job's MAC key), outside the rounds;
    # the plaintext twin registers nothing.
    started = time.perf_counter()
    parties = TaggedParties(keyholder, job_id, [f"party-{i}" for i in range(args.parties)])
    register_s = time.perf_counter() - started
    if parties.refused:
        raise RuntimeError(f"the key holder refused parties at registration: {parties.refused}")
    return Mode(
        name,
        encrypted,
        job_id,
        context,
        len(public),
        keygen_s,
        dict(weights),
        parties,
        register_s,
    )


def _fedavg_round(
    mode: Mode,
    keyholder: KeyHolder,
    spec: ModelSpec,
    layout: aggregate.Layout,
    party_data: list[tuple[np.ndarray, np.ndarray]],
    sum_bound: float,
    *,
    round_number: int,
    label: int,
    args: argparse.Namespace,
) -> RoundResult:
    result = RoundResult()
    global_weights = mode.weights
    round_started = time.perf_counter()
    contributions: dict[str, bytes] = {}
    tags: dict[str, bytes] = {}
    # Parties at their own sites make their next Enc(0)s while idle between rounds: here the
    # pools fill after the round (timed apart as `precompute_s`), never during the round.
    with pause_precompute():
        for index, (X, y) in enumerate(party_data):
            name = mode.parties.names[index]
            contributions[name], tags[name] = _party_step(
                mode,
                spec,
                layout,
                X,
                y,
                global_weights,
                sum_bound,
                index,
                round_number,
                label,
                args,
                result,
            )

        started = time.perf_counter()
        total = aggregate.aggregator_sum(
            contributions,
            layout,
            mode.context,
            sum_bound=sum_bound,
            min_parties=args.min_parties,
            packing=args.update_packing,
            parties=len(party_data),
        )
        result.aggregate_s = time.perf_counter() - started
        # The aggregator forwards the sum with the tags of the parties it summed.
        relayed = {name: tags[name] for name in total.contributors} if mode.encrypted else {}
        result.sum_bytes = len(total.tensor) + sum(len(tag) for tag in relayed.values())

        started = time.perf_counter()
        request = DecryptionRequest(
            mode.job_id, aggregate.OUTPUT, total.contributors, total.tensor, label, relayed
        )
        flat = aggregate.keyholder_decrypt_sum(keyholder, request)
        result.decrypt_s = time.perf_counter() - started
        result.decrypted_bytes = 8 * int(np.asarray(flat).size)

        started = time.perf_counter()
        update, _ = aggregate.average_update(flat, layout)
        model = build_model(spec, seed=0)
        set_weights(model, {k: global_weights[k] + update[k] for k in global_weights})
        result.apply_s = time.perf_counter() - started
        result.sequential_s = time.perf_counter() - round_started
        result.update = layout.flatten(update)
    started = time.perf_counter()
    wait_for_precompute()
    result.precompute_s = time.perf_counter() - started
    return result


def _party_step(
    mode: Mode,
    spec: ModelSpec,
    layout: aggregate.Layout,
    X: np.ndarray,
    y: np.ndarray,
    global_weights: dict[str, np.ndarray],
    sum_bound: float,
    index: int,
    round_number: int,
    label: int,
    args: argparse.Namespace,
    result: RoundResult,
) -> tuple[bytes, bytes]:
    """One party's local training, contribution and (HE) sealed tag for the release of round
    `label`, timed into `result` (encrypt: contribution + tag; tag: the tag alone)."""
    model = build_model(spec, seed=0)
    set_weights(model, global_weights)
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed * 1000 + round_number * 100 + index,
    )
    started = time.perf_counter()
    local_train(model, X, y, config)
    result.train_s.append(time.perf_counter() - started)
    new_weights = get_weights(model)
    delta = {
        k: np.clip(new_weights[k] - global_weights[k], -args.clip, args.clip)
        for k in global_weights
    }
    started = time.perf_counter()
    contribution = aggregate.party_contribution(
        delta,
        len(y),
        layout,
        mode.context,
        sum_bound=sum_bound,
        packing=args.update_packing,
        parties=args.parties,
    )
    tag, tag_s = b"", 0.0  # the plaintext twin has no MAC key: nothing to tag
    if mode.encrypted:
        tagged = time.perf_counter()
        tag = mode.parties.tag(mode.parties.names[index], aggregate.OUTPUT, contribution, label)
        tag_s = time.perf_counter() - tagged
    result.encrypt_s.append(time.perf_counter() - started)
    result.tag_s.append(tag_s)
    result.upload_bytes.append(len(contribution) + len(tag))
    result.tag_bytes.append(len(tag))
    return contribution, tag


def _median_over_rounds(rounds: list[RoundResult]) -> dict[str, Any]:
    summaries = [r.summary() for r in rounds]
    return {k: statistics.median(s[k] for s in summaries) for k in summaries[0]}


def _report(
    modes: dict[str, Mode],
    n_params: int,
    layout: aggregate.Layout,
    spec: ModelSpec,
    total_samples: int,
    sum_bound: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    he, plain = modes["he"], modes["plaintext"]
    level, scale_bits = AGGREGATION_PARAMS.encoding_for(sum_bound)
    per_mode: dict[str, Any] = {}
    for name, mode in modes.items():
        summary = _median_over_rounds(mode.rounds)
        summary["bytes_per_param_upload"] = summary["upload_bytes_per_party_median"] / n_params
        per_mode[name] = {
            "encrypted": mode.encrypted,
            "keygen_s": mode.keygen_s,
            "register_s": mode.register_s,
            "public_context_bytes": mode.public_bytes,
            "summary": summary,
            "rounds": [r.summary() for r in mode.rounds],
        }
    hs, ps = per_mode["he"]["summary"], per_mode["plaintext"]["summary"]
    ratios = {
        "round_sequential": hs["round_sequential_s"] / ps["round_sequential_s"],
        "round_critical_path": hs["round_critical_path_s"] / ps["round_critical_path_s"],
        "overhead_critical_path": hs["overhead_critical_path_s"] / ps["overhead_critical_path_s"],
        "overhead_sequential": hs["overhead_sequential_s"] / ps["overhead_sequential_s"],
        "upload_bytes": hs["upload_bytes_per_party_median"] / ps["upload_bytes_per_party_median"],
    }
    diffs = [
        float(np.max(np.abs(h.update - p.update)))
        for h, p in zip(he.rounds, plain.rounds, strict=True)
    ]
    targets = {
        "round_time_ratio_sequential": _target(ratios["round_sequential"], TARGET_ROUND_RATIO),
        "round_time_ratio_critical_path": _target(
            ratios["round_critical_path"], TARGET_ROUND_RATIO
        ),
        "bytes_per_param_upload": _target(hs["bytes_per_param_upload"], TARGET_BYTES_PER_PARAM),
    }
    return {
        "benchmark": "HE-FedAvg vs plaintext FedAvg, one in-process round (no Flower)",
        "config": {
            "dataset": "digits",
            "parties": args.parties,
            "rounds": args.rounds,
            "warmup_rounds": args.warmup,
            "model": spec.to_dict(),
            "clip": args.clip,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "min_parties": args.min_parties,
            "seed": args.seed,
            "torch_threads": args.threads,
            "total_samples": total_samples,
            "sum_bound": sum_bound,
            "packing": args.update_packing,
            "encoding": _encoding_text(layout, sum_bound, args.update_packing, args.parties),
            "keyholder_flooding_bits": DEFAULT_FLOODING_BITS,
            "timing": "time.perf_counter; median over measured rounds; per-party phases "
            "summarized over parties",
        },
        "n_params": n_params,
        "layout_size": layout.size,
        "ckks_params": AGGREGATION_PARAMS.to_dict(),
        # What fedhe.crypto.encrypt uses for this bound: the level, and the scale grown into it.
        "ckks_level": level,
        "ckks_scale_bits": scale_bits,
        "modes": per_mode,
        "ratios_he_over_plaintext": ratios,
        "targets": targets,
        "max_abs_diff": max(diffs),
        "max_abs_diff_per_round": diffs,
        "machine": machine_info(),
    }


def _run_flower(console: Console, args: argparse.Namespace) -> dict[str, Any]:
    """Mode 2: the job end to end in Flower's simulation engine (see the module docstring)."""
    from fedhe.cli import simulate
    from fedhe.config import JobConfig

    logging.getLogger("flwr").setLevel(logging.WARNING)
    config = JobConfig(
        task="aggregate",
        parties=args.parties,
        min_parties=max(2, args.parties // 2),
        rounds=args.flower_rounds,
        dataset="digits",
        hidden=",".join(str(w) for w in args.hidden),
        local_epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        clip=args.clip,
        seed=args.seed,
        out=str(args.flower_out),
        packing=args.packing,
        plaintext_twin=True,  # the comparison needs the twin (off by default since deploy)
    )
    # simulate() only checks that result.json exists: never read a previous run's file.
    (args.flower_out / "result.json").unlink(missing_ok=True)
    console.print(
        f"Flower: {config.parties} parties + key holder, {config.rounds} round(s), "
        f"min_parties {config.min_parties}, HE job then plaintext twin → {config.out}"
    )
    started = time.perf_counter()
    path = simulate(config)
    wall_s = time.perf_counter() - started
    return _flower_report(json.loads(path.read_text()), path, wall_s, config)


def _flower_report(
    result: dict[str, Any], path: Path, wall_s: float, config: Any
) -> dict[str, Any]:
    """The figures of one result.json, with the update uploads separated from the moments."""
    from fedhe.tasks.moments import OUTPUT as MOMENTS
    from fedhe.tasks.moments import SUM_BOUND as MOMENTS_SUM_BOUND

    if result.get("plaintext") is None:
        raise RuntimeError(f"{path} has no plaintext twin run to compare with.")
    _, test = load_builtin(config.dataset, seed=config.seed)
    spec = ModelSpec(test.n_features, max(test.n_classes, 2), config.hidden_widths)
    layout = aggregate.Layout.of(get_weights(build_model(spec, seed=config.seed)))
    n_params = layout.n_params

    moments_parties = next(
        (c["parties"] for c in result["parties"]["contributors"] if c["output"] == MOMENTS), []
    )
    indices = [int(name.rsplit("-", 1)[1]) for name in moments_parties]
    public = generate_keys(AGGREGATION_PARAMS).public()
    runs = {
        "he": (result["encrypted"], result["timings_s"], result["bytes"], public),
        "plaintext": (
            result["plaintext"],
            result.get("plaintext_timings_s", {}),
            result.get("plaintext_bytes", {}),
            None,
        ),
    }
    per_run: dict[str, Any] = {}
    for name, (metrics, timings, sent, context) in runs.items():
        history = metrics["history"]
        round_s = [h["round_s"] for h in history]
        update_uploads = sum(h["parties"] for h in history)
        moments_bytes = _moments_upload_bytes(config, indices, len(moments_parties), context)
        uploaded = sent.get("party->aggregator", 0)
        update_bytes = (uploaded - moments_bytes) / max(update_uploads, 1)
        per_run[name] = {
            "round_s": round_s,
            "round_s_median": statistics.median(round_s),
            "timings_s": timings,
            "bytes": sent,
            "moments_uploads": len(moments_parties),
            "moments_upload_bytes_rebuilt": moments_bytes,
            "update_uploads": update_uploads,
            "update_upload_bytes": update_bytes,
            "bytes_per_param_update_upload": update_bytes / n_params,
            "bytes_per_param_all_uploads": uploaded / (n_params * max(update_uploads, 1)),
            "final": {k: metrics[k] for k in ("accuracy", "loss", "train_loss") if k in metrics},
            "history": history,
        }
    he, plain = per_run["he"], per_run["plaintext"]
    ratio = he["round_s_median"] / plain["round_s_median"]
    update_bound = config.clip * result["encrypted"]["history"][0]["samples"]
    known_phases = ("train", "encrypt", "transfer", "compute", "decrypt", "keygen", "total")
    phases = [p for p in known_phases if p in he["timings_s"] or p in plain["timings_s"]]
    phases += sorted((set(he["timings_s"]) | set(plain["timings_s"])) - set(phases))
    known_directions = (
        "party->aggregator",
        "aggregator->party",
        "aggregator->keyholder",
        "keyholder->aggregator",
    )
    directions = [d for d in known_directions if d in he["bytes"] or d in plain["bytes"]]
    directions += sorted((set(he["bytes"]) | set(plain["bytes"])) - set(directions))
    return {
        "measures": "fedhe.cli.simulate end to end: round_s = the aggregator's wall time of a "
        "round (Flower messaging, local training, encryption, sum, key-holder decryption, "
        "averaging, test evaluation); timings_s are job totals (moments + all rounds)",
        "result_json": str(path),
        "simulate_wall_s": wall_s,
        "config": config.to_run_config(),
        "n_params": n_params,
        "ckks": {
            "params": AGGREGATION_PARAMS.to_dict(),
            "update": {
                **_encoding(update_bound),
                "encoding": _encoding_text(
                    layout,
                    update_bound,
                    result.get("update_packing", config.packing),  # what auto chose
                    config.parties,
                ),
            },
            "moments": _encoding(MOMENTS_SUM_BOUND),
        },
        "he": he,
        "plaintext": plain,
        "phases": phases,
        "directions": directions,
        "ratios_he_over_plaintext": {
            "round_s_median": ratio,
            "round_s_per_round": [
                h / p for h, p in zip(he["round_s"], plain["round_s"], strict=True)
            ],
            "update_upload_bytes": he["update_upload_bytes"] / plain["update_upload_bytes"],
        },
        "bytes_per_param_note": "party->aggregator minus the feature-moments uploads (rebuilt "
        "here with the job's layout, bound and parameters; CKKS sizes of the rebuilt moments "
        "ciphertexts may differ from the sent ones by a few bytes of compression), divided by "
        "the update uploads (Σ parties per round) and n_params; all_uploads keeps the moments",
        "agreement": result.get("agreement", {}),
        "targets": {
            "round_time_ratio_median": _target(ratio, TARGET_ROUND_RATIO),
            "bytes_per_param_update_upload": _target(
                he["bytes_per_param_update_upload"], TARGET_BYTES_PER_PARAM
            ),
        },
    }


def _moments_upload_bytes(
    config: Any, indices: list[int], n_terms: int, context: PublicContext | None
) -> int:
    """Bytes of the feature-moments uploads of parties `indices`, built as clients/party.py does."""
    from fedhe.data.sources import DataSource, party_data
    from fedhe.tasks.moments import SUM_BOUND as MOMENTS_SUM_BOUND

    source = DataSource(config.dataset, "", "", config.seed, config.parties)
    total = 0
    for index in indices:
        data = party_data(source, index)
        arrays = [data.X.mean(axis=0), (data.X**2).mean(axis=0)]
        total += len(
            aggregate.party_contribution(
                arrays,
                data.n_samples,
                aggregate.Layout.of(arrays),
                context,
                sum_bound=MOMENTS_SUM_BOUND,
                n_terms=n_terms,
            )
        )
    return total


def _encoding(sum_bound: float) -> dict[str, Any]:
    level, scale_bits = AGGREGATION_PARAMS.encoding_for(sum_bound)
    return {"sum_bound": sum_bound, "level": level, "scale_bits": scale_bits}


def _encoding_text(layout: aggregate.Layout, sum_bound: float, packing: str, parties: int) -> str:
    """How an update sits in the ciphertexts, in words."""
    if packing == "quantized":
        lanes = aggregate.lanes_for(
            layout, AGGREGATION_PARAMS, sum_bound=sum_bound, parties=parties
        )
        return (
            f"quantized: 4 values per slot, guard 2^{lanes.guard_bits}, "
            f"{lanes.lane_bits}-bit lanes, step 2^{lanes.steps[0][1]}"
        )
    level, scale_bits = AGGREGATION_PARAMS.encoding_for(sum_bound)
    return f"complex: 2 values per slot, level {level}, scale 2^{scale_bits}"


def _target(value: float, limit: float) -> dict[str, Any]:
    return {"value": value, "limit": limit, "pass": bool(value <= limit)}


def _print(console: Console, report: dict[str, Any]) -> None:
    target_rows: list[tuple[str, dict[str, Any]]] = []
    if "modes" in report:
        _print_in_process(console, report)
        labels = {
            "round_time_ratio_sequential": "in process, no Flower: round HE/plain, sequential",
            "round_time_ratio_critical_path": "in process, no Flower: round HE/plain, critical",
            "bytes_per_param_upload": "bytes per parameter on the wire (upload)",
        }
        target_rows += [(labels[k], t) for k, t in report["targets"].items()]
    if "flower" in report:
        _print_flower(console, report["flower"])
        labels = {
            "round_time_ratio_median": "Flower: round time HE/plain (median round_s)",
            "bytes_per_param_update_upload": "Flower: bytes per parameter (update upload)",
        }
        target_rows += [(labels[k], t) for k, t in report["flower"]["targets"].items()]

    targets = Table(title="Targets")
    targets.add_column("target")
    targets.add_column("measured", justify="right")
    targets.add_column("limit", justify="right")
    targets.add_column("result")
    for label, target in target_rows:
        result = "[green]PASS[/green]" if target["pass"] else "[red]MISS[/red]"
        targets.add_row(label, f"{target['value']:.2f}", f"≤ {target['limit']:g}", result)
    console.print(targets)

    if "modes" in report:
        console.print(
            f"in process: max |HE update − plaintext update| = {report['max_abs_diff']:.3e}; "
            f"CKKS N={report['ckks_params']['poly_modulus_degree']}, "
            f"{report['config']['encoding']} (sum bound {report['config']['sum_bound']:g}); "
            f"torch threads {report['config']['torch_threads']}; "
            f"{report['config']['warmup_rounds']} unmeasured warm-up round(s) per mode"
        )
    if "flower" in report:
        flower = report["flower"]
        agreement = flower["agreement"]
        update, moments = flower["ckks"]["update"], flower["ckks"]["moments"]
        console.print(
            f"Flower: max |HE weights − plaintext weights| = "
            f"{agreement.get('max_abs_weight_diff', float('nan')):.3e}, "
            f"|Δ accuracy| = {agreement.get('accuracy_diff', float('nan')):.4f}; "
            f"updates {update['encoding']} (sum bound {update['sum_bound']:g}), "
            f"moments at level {moments['level']}, "
            f"scale 2^{moments['scale_bits']}; {flower['config']['parties']} parties + key "
            f"holder, {flower['config']['rounds']} round(s), simulate() took "
            f"{flower['simulate_wall_s']:.1f} s (Ray start included); {flower['result_json']}"
        )


def _print_in_process(console: Console, report: dict[str, Any]) -> None:
    ps = report["modes"]["plaintext"]["summary"]
    hs = report["modes"]["he"]["summary"]
    n = report["n_params"]
    table = Table(
        title=f"In process (protocol only) HE-FedAvg vs FedAvg: {n:,} params, "
        f"{report['config']['parties']} parties, "
        f"{report['config']['rounds']} round(s)"
    )
    table.add_column("metric")
    table.add_column("plaintext", justify="right")
    table.add_column("HE (CKKS)", justify="right")
    table.add_column("HE / plain", justify="right")

    def ms(key: str, label: str) -> None:
        table.add_row(
            label, f"{ps[key] * 1e3:.1f} ms", f"{hs[key] * 1e3:.1f} ms", _ratio(hs[key], ps[key])
        )

    def size(key: str, label: str) -> None:
        table.add_row(label, fmt_bytes(ps[key]), fmt_bytes(hs[key]), _ratio(hs[key], ps[key]))

    ms("train_s_median", "train / party (median)")
    ms("encrypt_s_median", "encrypt + tag / party (median)")
    table.add_row("  of which tag + seal / party", "-", f"{hs['tag_s_median'] * 1e3:.1f} ms", "")
    ms("precompute_s_per_party", "Enc(0)s made while idle / party")
    ms("aggregate_s", "aggregate (sum)")
    ms("decrypt_s", "verify tags + decrypt (key holder)")
    ms("apply_s", "average + apply")
    ms("overhead_critical_path_s", "overhead: enc(median)+sum+dec")
    ms("overhead_sequential_s", "overhead: Σenc+sum+dec")
    ms("round_sequential_s", "[bold]round, sequential[/bold]")
    ms("round_critical_path_s", "[bold]round, critical path[/bold]")
    size("upload_bytes_per_party_median", "party → aggregator / party")
    table.add_row(
        "  of which sealed tag / party", "-", fmt_bytes(hs["tag_bytes_per_party_median"]), ""
    )
    size("upload_bytes_total", "party → aggregator, all")
    size("sum_bytes_to_keyholder", "aggregator → key holder")
    size("decrypted_bytes_to_aggregator", "key holder → aggregator")
    table.add_row(
        "[bold]bytes / parameter (upload)[/bold]",
        f"{ps['bytes_per_param_upload']:.2f}",
        f"{hs['bytes_per_param_upload']:.2f}",
        _ratio(hs["bytes_per_param_upload"], ps["bytes_per_param_upload"]),
    )
    table.add_row(
        "public context (once)", "-", fmt_bytes(report["modes"]["he"]["public_context_bytes"]), ""
    )
    table.add_row(
        "keygen at declare (once)", "-", f"{report['modes']['he']['keygen_s'] * 1e3:.1f} ms", ""
    )
    table.add_row(
        "party registration (once)",
        "-",
        f"{report['modes']['he']['register_s'] * 1e3:.1f} ms",
        "",
    )
    console.print(table)


def _print_flower(console: Console, flower: dict[str, Any]) -> None:
    he, plain = flower["he"], flower["plaintext"]
    config = flower["config"]
    table = Table(
        title=f"Flower simulation (end to end) HE-FedAvg vs FedAvg: {flower['n_params']:,} "
        f"params, {config['parties']} parties + key holder, {config['rounds']} round(s)",
        caption="round time: the aggregator's round_s (median over rounds); phases: job totals "
        "over the moments sum and all rounds; uploads per update: party→aggregator minus the "
        "rebuilt moments uploads",
    )
    table.add_column("metric")
    table.add_column("plaintext", justify="right")
    table.add_column("HE (CKKS)", justify="right")
    table.add_column("HE / plain", justify="right")

    def seconds(label: str, h: float | None, p: float | None) -> None:
        table.add_row(label, _secs(p), _secs(h), _ratio(h, p) if h is not None and p else "-")

    seconds("[bold]round time, median[/bold]", he["round_s_median"], plain["round_s_median"])
    table.add_row(
        "round time per round, s",
        "/".join(f"{t:.2f}" for t in plain["round_s"]),
        "/".join(f"{t:.2f}" for t in he["round_s"]),
        "",
    )
    for phase in flower["phases"]:
        seconds(
            f"{phase}, job Σ",
            he["timings_s"].get(phase),
            plain["timings_s"].get(phase),
        )
    for direction in flower["directions"]:
        h, p = he["bytes"].get(direction, 0), plain["bytes"].get(direction, 0)
        label = direction.replace("->", "→").replace("aggregator", "agg")
        table.add_row(f"bytes {label}", fmt_bytes(p), fmt_bytes(h), _ratio(h, p))
    h, p = he["update_upload_bytes"], plain["update_upload_bytes"]
    table.add_row("bytes / update upload", fmt_bytes(p), fmt_bytes(h), _ratio(h, p))
    h, p = he["bytes_per_param_update_upload"], plain["bytes_per_param_update_upload"]
    table.add_row("[bold]B/param, update upload[/bold]", f"{p:.2f}", f"{h:.2f}", _ratio(h, p))
    h, p = he["bytes_per_param_all_uploads"], plain["bytes_per_param_all_uploads"]
    table.add_row("B/param, + moments", f"{p:.2f}", f"{h:.2f}", _ratio(h, p))
    for metric in ("accuracy", "loss"):
        h, p = he["final"].get(metric), plain["final"].get(metric)
        if h is not None and p is not None:
            table.add_row(f"final test {metric}", f"{p:.4f}", f"{h:.4f}", "")
    console.print(table)


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "-"


if __name__ == "__main__":
    raise SystemExit(main())
