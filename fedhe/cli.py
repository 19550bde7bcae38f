"""The `fedhe` command: `fedhe simulate TASK [options]` runs a job in Flower's simulation engine."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from pathlib import Path
from typing import Any

from fedhe.config import (
    CONSTRAINTS,
    SECTION_OF,
    SECTIONS,
    TASK_DEFAULTS,
    TASKS,
    JobConfig,
    setting_key,
)
from fedhe.errors import FedHEError
from fedhe.simulation import simulate, wall_time_line

_HELP = {
    "parties": "number of parties (data owners); --keyholders more nodes hold the key",
    "min_parties": "fewest parties a sum may cover; the job stops below it",
    "rounds": "training rounds",
    "dataset": "built-in dataset: breast_cancer, iris, wine, digits, diabetes, synthetic",
    "mode": "exact (masked normal equations; linreg only), gradient (encrypted gradients) or "
    "encrypted-model (the model stays encrypted)",
    "l2": "L2 penalty per sample on standardized coefficients",
    "data_dir": "folder with party-*.csv (one per party) and test.csv, instead of --dataset",
    "target": "label column of the CSV files (with --data-dir)",
    "schema": "schema.json shared by all sites: column types, categories (one-hot encoded the "
    "same way everywhere), units; columns are matched by name",
    "impute": "none (a missing cell is an error) or mean (missing feature cells get the global "
    "column mean, computed by the secure moments sum)",
    "seed": "seed for splits, model initialization and local training",
    "out": "output folder: result.json, audit.jsonl, model.json (model.pt), predictions.csv",
    "local_epochs": "local epochs per round",
    "batch_size": "mini-batch size per party and step (gradient mode: 0 = all local samples)",
    "lr": "local SGD learning rate",
    "clip": "clip each update coordinate to ±clip (bounds the encrypted sum)",
    "hidden": "MLP hidden widths, e.g. 32,16 (empty: logistic/softmax regression)",
    "drop_party": "simulate a fault: this 0-based party index fails every training round",
    "timeout_s": "seconds to wait for replies to one message",
    "keyholder_retries": "more tries when the key holder does not answer (never on a refusal)",
    "keyholders": "holders of the job's key: 1 (one key holder), a count K (a key-holder group; "
    "no holder can decrypt alone), or parties (each party holds a share: no third party)",
    "threshold": "key holders needed to decrypt (≥ 2 for a group; 0: all of them)",
    "k": "neighbours per query",
    "query": "plain (the aggregator sees the query) or encrypted (it does not)",
    "query_batch": "queries per batch (one ranking and one vote release each)",
    "queries": "ask only the querier's first N test rows (0: all)",
    "querier": "the party that asks the queries (it holds the test set): its 0-based index "
    "(with --data-dir, 0 is the first party file, party-1.csv) or its name (party-1.csv; a "
    "deployment: its site name)",
    "standardize": "measure distances on globally standardized features (true/false)",
    "keep_store": "keep the encrypted store and the key holder's state under --out, so that "
    "`fedhe predict` can ask as many new queries as the job did (true/false; whoever holds the "
    "kept state can decrypt the store)",
    "activation": "hidden activation: relu, or square, relu-poly, silu-poly (encryptable)",
    "alpha": "Dirichlet(alpha) label skew across parties for built-in data (0: IID)",
    "single_queries": "test samples also sent one at a time (single-sample latency path)",
    "optimizer": "local training optimizer: sgd or adam",
    "packing": "model-update sums: quantized (4 values per slot, rounded to ~2^-17 of the "
    "bound), complex (2 per slot, CKKS precision) or auto (quantized while the rounding stays "
    "≤ 1e-3 per round)",
    "resume": "continue an interrupted job from the checkpoint in --out (true/false)",
}
# Settings `fedhe simulate` sets itself (its engine awaits SIMULATION_WINDOW replies at a time).
_SIMULATION_ONLY = {"task", "keyholder_partition_id", "plaintext_twin", "message_window"}
_TASK_HELP = {
    "aggregate": "HE-FedAvg of a torch model: logistic/softmax regression, or an MLP (--hidden)",
    "linreg": "linear/ridge regression: exact (masked normal equations), by encrypted "
    "gradients, or with the model itself encrypted",
    "logreg": "logistic regression by encrypted gradients, or with the model itself encrypted",
    "knn": "k nearest neighbours over encrypted points (classification or regression)",
    "mlp": "an MLP with polynomial activations trained by HE-FedAvg, then evaluated on "
    "encrypted inputs",
}
_UNREAD_BY = {"rounds": ("knn",)}  # shared settings a task never reads: out of its help
EXIT_EXCLUDED = 3  # --strict: the run finished, but without some of its parties
_TIMINGS = {  # what each time row measures (seconds inside the run; start-up not included)
    "keygen": "key generation (key holder)",
    "train": "local training (slowest party per round, summed)",
    "encrypt": "encryption (slowest party per round, summed)",
    "compute": "aggregator compute",
    "decrypt": "decryption (key holder)",
    "transfer": "messaging (waits beyond party compute)",
    "total": "run total, set-up to report",
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "audit":
        return _verify_audit(args.path, segment=args.segment)
    if args.command == "identity":
        return _show_identity(args.path, args.passphrase_file)
    if args.command == "predict":
        from fedhe import predict

        return predict.main(args)
    if args.command == "check-data":
        from fedhe.data.checks import check_data_command

        return check_data_command(args)
    if args.command == "deploy":
        from fedhe.deploy_cli import deploy

        try:
            return deploy(args)
        except FedHEError as err:
            print(f"fedhe: error: {err}", file=sys.stderr)
            return 2
    _configure_logging(args.verbose)
    try:
        config = JobConfig.of(  # a setting left out takes the task's default (JobConfig.of)
            **{name: getattr(args, name) for name in _cli_settings() if hasattr(args, name)},
            task=args.task,
            plaintext_twin=not args.encrypted_only,
        )
        result_path = simulate(config, workers=args.workers, verbose=args.verbose)
    except FedHEError as err:
        print(f"fedhe: error: {err}", file=sys.stderr)
        return 2
    _print_summary(result_path)
    print(wall_time_line(json.loads(result_path.read_text())))
    return _strict_status(result_path) if args.strict else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedhe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser(
        "simulate",
        help="run a job in Flower's simulation engine",
        description="Run a job in Flower's simulation engine: fedhe simulate TASK [options].",
        epilog=_settings_overview(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tasks = sim.add_subparsers(dest="task", required=True, metavar="TASK")
    for task in TASKS:
        _add_task_parser(tasks, task)
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
    _add_check_data_command(commands)
    return parser


def _cli_settings() -> list[str]:
    """The settings `fedhe simulate` takes as options: all but the simulation's own."""
    return [name for name in JobConfig().settings() if name not in _SIMULATION_ONLY]


def _add_task_parser(tasks: argparse._SubParsersAction, task: str) -> None:
    """`fedhe simulate TASK`: the settings `task` reads, with its defaults, and the run's own
    options."""
    parser = tasks.add_parser(
        task,
        help=_TASK_HELP[task],
        description=f"fedhe simulate {task}: {_TASK_HELP[task]}. The defaults shown are "
        f"{task}'s own.",
    )
    _add_settings(parser, task)
    parser.add_argument(
        "--encrypted-only",
        action="store_true",
        help="skip the plaintext twin run (which `fedhe simulate` runs by default)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Ray actors running the nodes (default: one per CPU core)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help=f"exit with status {EXIT_EXCLUDED} when any party was excluded or never answered "
        "(default: the job goes on without it while --min-parties remain, and says so)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's logs")


def _add_settings(parser: argparse.ArgumentParser, task: str) -> None:
    """One option per setting, grouped as JobConfig groups them, with `task`'s defaults. An
    option of a section `task` does not read stays out of the help but is still parsed, so that
    the config refuses it with its reason ("k=3 applies to task knn only")."""
    defaults = _defaults_shown(task)
    groups = {"": parser.add_argument_group("settings of every task")}
    for name, section in SECTIONS.items():
        if task in section.TASKS:
            groups[name] = parser.add_argument_group(f"{name} settings")
    for name in _cli_settings():
        kind, section = CONSTRAINTS[name].kind, SECTION_OF.get(name, "")
        shown = section in groups and task not in _UNREAD_BY.get(name, ())
        (groups[section] if shown else parser).add_argument(
            "--" + setting_key(name),
            type=_parse_bool if kind is bool else kind,
            default=argparse.SUPPRESS,  # left out: JobConfig.of gives the task's default
            help=f"{_HELP.get(name, '')} (default: {defaults[name]})"
            if shown
            else argparse.SUPPRESS,
        )


def _defaults_shown(task: str) -> dict[str, str]:
    """Each setting's default for `task` as its help shows it: the task's own values, the value
    an empty setting stands for ('' → the task's dataset), and where a mode has its own."""
    config = JobConfig.of(task=task)
    settings = config.settings()
    shown = {name: repr(value) for name, value in settings.items()}
    stands_for = {
        "dataset": config.dataset_name,
        "mode": config.regression_mode,
        "hidden": ",".join(map(str, config.hidden_widths)),
        "activation": config.activation_name,
    }
    for name, value in stands_for.items():
        if settings[name] == "" and value:
            shown[name] = repr(value)
    for of_task, mode in TASK_DEFAULTS:
        if of_task == task and mode != config.regression_mode:
            in_mode = JobConfig.of(task=task, mode=mode).settings()
            for name, value in in_mode.items():
                if name != "mode" and value != settings[name]:
                    shown[name] += f"; {mode} mode: {value!r}"
    return shown


def _settings_overview() -> str:
    """`fedhe simulate --help`'s epilog: which settings each group of tasks reads."""
    groups = {"settings of every task": [n for n in _cli_settings() if n not in SECTION_OF]}
    for name, section in SECTIONS.items():
        tasks = f"task{'s' * (len(section.TASKS) > 1)} {', '.join(section.TASKS)}"
        groups[f"{name} settings ({tasks} only)"] = [
            n for n in _cli_settings() if SECTION_OF.get(n) == name
        ]
    lines = [
        "settings (`fedhe simulate TASK --help` lists a task's own, with its defaults):",
        "  run options of every task: --encrypted-only, --workers, --strict, -v",
    ]
    for title, names in groups.items():
        options = ", ".join("--" + setting_key(n) for n in names)
        lines += textwrap.wrap(
            f"{title}: {options}", width=90, initial_indent="  ", subsequent_indent="      "
        )
    return "\n".join(lines)


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
    # Without -v, fedhe says only what needs attention (a party left out, a retry); the summary
    # reports the rest.
    logging.getLogger("fedhe").setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)


def _print_summary(result_path: Path) -> None:
    """What ran on which data, which parties it used (and why it left any out), then the
    metrics and timings. Plain text when stdout is no terminal (rich writes no ANSI codes)."""
    from rich.console import Console

    result = json.loads(result_path.read_text())
    for line in _summary_lines(result):
        print(line, flush=True)
    console = Console(highlight=False)
    if not console.is_terminal:  # a log file: keep the rows whole rather than wrap at 80
        console = Console(highlight=False, width=120)
    console.print(_metrics_table(result, result_path))


def _summary_lines(result: dict[str, Any]) -> list[str]:
    """The summary's head, from result.json's `summary` (none in an older result.json)."""
    summary = result.get("summary")
    if not summary:
        return []
    parties = summary["parties"]
    job = [summary["task"]]
    job += [f"{summary['mode']} mode"] if summary.get("mode") else []
    job += [f"{summary['rounds']} rounds"] if summary.get("rounds") else []
    job += [f"{summary['packing']} packing"] if summary.get("packing") else []
    lines = [
        f"data      {summary['data']}",
        f"job       {', '.join(job)}",
        f"parties   {parties['used']} of {parties['expected']} used ({parties['found']} "
        f"answered, {len(parties['excluded'])} left out; min-parties "
        f"{result['parties']['min_parties']})",
    ]
    missing = parties["expected"] - parties["found"]
    if missing:
        lines.append(f"  never answered: {missing} party node(s)")
    lines += [f"  left out {name}: {why}" for name, why in parties["excluded"].items()]
    lines += [f"  missed a sum {name}: {why}" for name, why in parties.get("missed", {}).items()]
    lines.append(f"keys      {_keyholders_text(summary['keyholders'])}")
    return lines


def _keyholders_text(keys: dict[str, Any]) -> str:
    count, threshold = keys["count"], keys["threshold"]
    if keys["parties_hold_keys"]:
        return f"the {count} parties hold shares of the key; any {threshold} decrypt together"
    if count == 1:
        return "one key holder"
    return f"{count} key holders; any {threshold} decrypt together"


def _metrics_table(result: dict[str, Any], result_path: Path) -> Any:
    from rich.table import Table

    has_twin = result.get("plaintext") is not None
    plain = result.get("plaintext") or {}
    table = Table(
        title=f"fedhe {result['task']} — {result_path.parent}",
        caption="time: seconds within the run; Python, Ray and node start-up not included",
    )
    table.add_column("metric")
    table.add_column("encrypted (CKKS)", justify="right")
    if has_twin:
        table.add_column("plaintext twin", justify="right")

    def row(label: str, encrypted: str, twin: str = "") -> None:
        table.add_row(label, encrypted, *([twin] if has_twin else []))

    for key in ("accuracy", "loss", "train_loss", "log_loss", "auc", "mse", "r2"):
        if key in result["encrypted"]:
            twin = f"{plain[key]:.4f}" if key in plain else "-"
            row(key, f"{result['encrypted'][key]:.4f}", twin)
    inference = result.get("inference")
    if inference and "encrypted_accuracy" in inference:  # the querier reported its counts
        row(
            "inference accuracy (same weights)",
            f"{inference['encrypted_accuracy']:.4f}",
            f"{inference['plaintext_accuracy']:.4f}",
        )
        row("inference max |logit error|", f"{inference['max_abs_logit_error']:.2e}")
        batched = inference["batched"]
        row("batched: samples/s (full batch)", f"{batched['samples_per_s_at_capacity']:.0f}")
        single = inference["single"]
        if "aggregator_compute_s_median" in single:
            row("single sample: aggregator (s)", f"{single['aggregator_compute_s_median']:.4f}")
    if result.get("central"):
        row("central model (pooled data) accuracy", "", f"{result['central']['accuracy']:.4f}")
    for phase, seconds in result.get("knn", {}).get("per_query_s", {}).items():
        row(f"per query: {phase} (s)", f"{seconds:.4f}", "-")
    plain_timings = result.get("plaintext_timings_s", {})
    for phase, seconds in result["timings_s"].items():
        twin = f"{plain_timings[phase]:.3f}" if phase in plain_timings else "-"
        row(f"time: {_TIMINGS.get(phase, phase)}", f"{seconds:.3f}", twin)
    for direction, n in result["bytes"].items():
        row(
            f"bytes {direction}",
            f"{n:,}",
            f"{result.get('plaintext_bytes', {}).get(direction, 0):,}",
        )
    return table


def _strict_status(result_path: Path) -> int:
    """--strict: 0, or EXIT_EXCLUDED when the run went on without some of its parties."""
    parties = json.loads(result_path.read_text())["summary"]["parties"]
    missing = parties["expected"] - parties["found"]
    missed = parties.get("missed", {})
    if not parties["excluded"] and not missed and not missing:
        return 0
    left_out = ", ".join(parties["excluded"]) or "none"
    print(
        f"fedhe: error: --strict: the run used {parties['used']} of {parties['expected']} "
        f"parties (left out: {left_out}; missed a sum: {', '.join(missed) or 'none'}; never "
        f"answered: {missing}); the reasons are above, the result in {result_path}.",
        file=sys.stderr,
    )
    return EXIT_EXCLUDED


def _add_check_data_command(commands: Any) -> None:
    """`fedhe check-data DIR_OR_FILE --target COL [--task T] [--schema F]` on `commands`
    (argparse sub-parsers)."""
    parser = commands.add_parser(
        "check-data",
        help="check CSV files before a job: one site's file, or a data folder",
        description="Check one site's CSV file, or a data folder (party-*.csv and test.csv), "
        "the way a job will read it: every problem with its file, line, column and value.",
    )
    parser.add_argument("path", help="a CSV file, or a folder with party-*.csv and test.csv")
    parser.add_argument("--target", required=True, help="the label column")
    parser.add_argument(
        "--task",
        choices=("aggregate", "linreg", "logreg", "knn", "mlp"),
        default=None,
        help="the job's task: its labels and the values it can encrypt (default: labels are "
        "classes when the target holds few whole numbers)",
    )
    parser.add_argument("--schema", default=None, help="the schema.json all sites share")
    parser.add_argument(
        "--parties",
        type=int,
        default=None,
        help="the job's party count: the parties share the bound on what they encrypt "
        "(default: the party files checked, 1 for one file)",
    )
    parser.add_argument(
        "--impute",
        choices=("none", "mean"),
        default="none",
        help="mean: the job fills missing feature cells, so they are no error",
    )


if __name__ == "__main__":
    raise SystemExit(main())
