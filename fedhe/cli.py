"""The `fedhe` command: `fedhe simulate TASK [options]` runs a job in Flower's simulation engine."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fedhe.config import (
    CONSTRAINTS,
    SECTION_OF,
    SECTIONS,
    TASKS,
    JobConfig,
    setting_key,
)
from fedhe.errors import FedHEError
from fedhe.simulation import simulate

_HELP = {
    "parties": "number of parties (data owners); --keyholders more nodes hold the key",
    "min_parties": "fewest parties a sum may cover; the job stops below it",
    "rounds": "training rounds",
    "dataset": "built-in dataset: breast_cancer, iris, wine, digits, diabetes, synthetic "
    "(default: breast_cancer; diabetes for linreg, digits for mlp)",
    "mode": "linreg: exact (masked normal equations, default), gradient or encrypted-model; "
    "logreg: gradient (default) or encrypted-model",
    "l2": "L2 penalty per sample on standardized coefficients",
    "data_dir": "folder with party-*.csv (one per party) and test.csv, instead of --dataset",
    "target": "label column of the CSV files (with --data-dir)",
    "schema": "schema.json shared by all sites: column types, categories (one-hot encoded the "
    "same way everywhere), units; columns are matched by name",
    "impute": "none (a missing cell is an error) or mean (missing feature cells get the global "
    "column mean, computed by the secure moments sum)",
    "seed": "seed for splits, model initialization and local training",
    "out": "output folder for result.json and audit.jsonl",
    "local_epochs": "local epochs per round",
    "batch_size": "mini-batch size per party and step (gradient mode: 0 = all local samples)",
    "lr": "local SGD learning rate",
    "clip": "clip each update coordinate to ±clip (bounds the encrypted sum)",
    "hidden": "MLP hidden widths, e.g. 32,16 (default: logistic/softmax regression; mlp: 32)",
    "drop_party": "simulate a fault: this party index fails every training round",
    "timeout_s": "seconds to wait for replies to one message",
    "keyholder_retries": "more tries when the key holder does not answer (never on a refusal)",
    "keyholders": "holders of the job's key: 1 (one key holder), a count K (a key-holder group; "
    "no holder can decrypt alone), or parties (each party holds a share: no third party)",
    "threshold": "key holders needed to decrypt (≥ 2 for a group; 0: all of them)",
    "k": "neighbours per query",
    "query": "plain (the aggregator sees the query) or encrypted (it does not)",
    "query_batch": "queries per batch (one ranking and one vote release each)",
    "queries": "ask only the querier's first N test rows (0: all)",
    "querier": "index of the party that asks the queries (it holds the test set)",
    "standardize": "measure distances on globally standardized features (true/false)",
    "keep_store": "keep the encrypted store and the key holder's state under --out, so that "
    "`fedhe predict` can ask as many new queries as the job did (true/false; whoever holds the "
    "kept state can decrypt the store)",
    "activation": "hidden activation: relu, or square, relu-poly, silu-poly (encryptable; "
    "mlp default: square)",
    "alpha": "Dirichlet(alpha) label skew across parties for built-in data (0: IID)",
    "single_queries": "test samples also sent one at a time (single-sample latency path)",
    "optimizer": "local training optimizer: sgd or adam",
    "packing": "model-update sums: quantized (4 values per slot, rounded to ~2^-17 of the "
    "bound), complex (2 per slot, CKKS precision) or auto (quantized while the rounding stays "
    "≤ 1e-3 per round)",
    "resume": "continue an interrupted job from the checkpoint in --out (true/false)",
}
_SIMULATION_ONLY = {"task", "keyholder_partition_id", "plaintext_twin"}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "audit":
        return _verify_audit(args.path, segment=args.segment)
    if args.command == "identity":
        return _show_identity(args.path, args.passphrase_file)
    if args.command == "predict":
        from fedhe import predict

        return predict.main(args)
    if args.command == "deploy":
        from fedhe.deploy_cli import deploy

        try:
            return deploy(args)
        except FedHEError as err:
            print(f"fedhe: error: {err}", file=sys.stderr)
            return 2
    _configure_logging(args.verbose)
    try:
        config = JobConfig.of(
            **{name: getattr(args, name) for name in _cli_settings()},
            task=args.task,
            plaintext_twin=not args.encrypted_only,
        )
        result_path = simulate(config, workers=args.workers)
    except FedHEError as err:
        print(f"fedhe: error: {err}", file=sys.stderr)
        return 2
    _print_summary(result_path)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedhe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser("simulate", help="run a job in Flower's simulation engine")
    sim.add_argument("task", choices=TASKS)
    _add_settings(sim)
    sim.add_argument(
        "--encrypted-only",
        action="store_true",
        help="skip the plaintext twin run (which `fedhe simulate` runs by default)",
    )
    sim.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Ray actors running the nodes (default: one per CPU core)",
    )
    sim.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's logs")
    audit = commands.add_parser("audit", help="check a key holder's audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser("verify", help="check the log's hash chain")
    verify.add_argument("path", help="a key holder's audit.jsonl")
    verify.add_argument(
        "--segment",
        action="store_true",
        help="the file holds one job's records (a run folder's audit.jsonl)",
    )
    identity = commands.add_parser(
        "identity",
        help="print a site's end-to-end identity (public key and fingerprint) for pinning",
    )
    identity.add_argument(
        "path",
        help="the identity file: a party's identity-path, or the key holder's "
        "<data-path>/keyholder/identity.key (made on first use)",
    )
    identity.add_argument("--passphrase-file", default="", help="the key holder's passphrase")
    from fedhe.deploy_cli import add_deploy_commands
    from fedhe.predict import add_predict_command

    add_deploy_commands(commands)
    add_predict_command(commands)
    return parser


def _cli_settings() -> list[str]:
    """The settings `fedhe simulate` takes as options: all but the simulation's own."""
    return [name for name in JobConfig().settings() if name not in _SIMULATION_ONLY]


def _add_settings(sim: argparse.ArgumentParser) -> None:
    """One option per setting, grouped as JobConfig groups them: the shared ones, then one
    group per section, titled with the tasks that read it (the others refuse it)."""
    defaults = JobConfig().settings()
    groups = {"": sim.add_argument_group("settings of every task")}
    for name, section in SECTIONS.items():
        tasks = ", ".join(section.TASKS)
        groups[name] = sim.add_argument_group(
            f"{name} settings (task{'s' * (len(section.TASKS) > 1)} {tasks} only)"
        )
    for name in _cli_settings():
        kind, default = CONSTRAINTS[name].kind, defaults[name]
        groups[SECTION_OF.get(name, "")].add_argument(
            "--" + setting_key(name),
            type=_parse_bool if kind is bool else kind,
            default=default,
            help=f"{_HELP.get(name, '')} (default: {default!r})",
        )


def _show_identity(path: str, passphrase_file: str) -> int:
    """What a site hands out for pinning: a party's public key goes into the key holder's
    trusted-parties file, the key holder's fingerprint into each party's keyholder-fingerprint."""
    from fedhe.crypto.channel import fingerprint
    from fedhe.keyholder.registry import load_identity

    passphrase = Path(passphrase_file).read_bytes().strip() if passphrase_file else None
    try:
        public = load_identity(Path(path), passphrase).public
    except (FedHEError, OSError) as err:
        print(f"fedhe: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"public-key": public.hex(), "fingerprint": fingerprint(public)}))
    return 0


def _parse_bool(text: str) -> bool:
    if text.lower() not in {"true", "false", "1", "0", "yes", "no"}:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in {"true", "1", "yes"}


def _verify_audit(path: str, *, segment: bool) -> int:
    from fedhe.keyholder.audit import verify_log

    result = verify_log(path, segment=segment)
    if result.ok:
        print(
            f"{path}: {result.records} records, hash chain intact (last {result.last_hash[:16]}…)"
        )
        return 0
    print(
        f"{path}: TAMPERED after {result.records} good records: {result.problem}", file=sys.stderr
    )
    return 1


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("fedhe").setLevel(logging.INFO)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)


def _print_summary(result_path: Path) -> None:
    result = json.loads(result_path.read_text())
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a dependency
        print(json.dumps(result["encrypted"], indent=2))
        return
    table = Table(title=f"fedhe {result['task']} — {result_path.parent}")
    table.add_column("metric")
    table.add_column("encrypted (CKKS)", justify="right")
    table.add_column("plaintext twin", justify="right")
    plain = result.get("plaintext") or {}
    for key in ("accuracy", "loss", "train_loss", "log_loss", "auc", "mse", "r2"):
        if key in result["encrypted"]:
            table.add_row(
                key, f"{result['encrypted'][key]:.4f}", f"{plain[key]:.4f}" if key in plain else "-"
            )
    inference = result.get("inference")
    if inference and "encrypted_accuracy" in inference:  # the querier reported its counts
        table.add_row(
            "inference accuracy (same weights)",
            f"{inference['encrypted_accuracy']:.4f}",
            f"{inference['plaintext_accuracy']:.4f}",
        )
        table.add_row("inference max |logit error|", f"{inference['max_abs_logit_error']:.2e}", "")
        batched = inference["batched"]
        table.add_row(
            "batched: samples/s (full batch)", f"{batched['samples_per_s_at_capacity']:.0f}", ""
        )
        single = inference["single"]
        if "aggregator_compute_s_median" in single:
            table.add_row(
                "single sample: aggregator (s)", f"{single['aggregator_compute_s_median']:.4f}", ""
            )
    if result.get("central"):
        table.add_row(
            "central model (pooled data) accuracy", "", f"{result['central']['accuracy']:.4f}"
        )
    for phase, seconds in result.get("knn", {}).get("per_query_s", {}).items():
        table.add_row(f"per query: {phase} (s)", f"{seconds:.4f}", "-")
    plain_timings = result.get("plaintext_timings_s", {})
    for phase, seconds in result["timings_s"].items():
        twin = f"{plain_timings[phase]:.3f}" if phase in plain_timings else "-"
        table.add_row(f"time {phase} (s)", f"{seconds:.3f}", twin)
    for direction, n in result["bytes"].items():
        table.add_row(
            f"bytes {direction}",
            f"{n:,}",
            f"{result.get('plaintext_bytes', {}).get(direction, 0):,}",
        )
    Console(stderr=False, force_terminal=None).print(table)


if __name__ == "__main__":
    raise SystemExit(main())
