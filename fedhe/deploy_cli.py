"""`fedhe deploy …`: the commands each role of a real deployment runs (see fedhe.deploy)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from fedhe import deploy as d
from fedhe import deploy_kit as kit


def add_deploy_commands(commands) -> None:
    parser = commands.add_parser(
        "deploy", help="set up and run a real federation (SuperLink, SuperNodes, TLS, auth)"
    )
    sub = parser.add_subparsers(dest="deploy_command", required=True)
    keygen = sub.add_parser(
        "keygen", help="a site: make its SuperNode key in its folder; prints the public half"
    )
    keygen.add_argument("folder", help="the site's folder (its kit goes there too)")
    keygen.add_argument("name", help="the site's name in the federation")
    init = sub.add_parser(
        "init", help="coordinator: CA, SuperLink certificate, federation file (no site keys)"
    )
    init.add_argument("folder")
    init.add_argument("--party", action="append", required=True, help="a party site's name")
    init.add_argument(
        "--keyholder",
        action="append",
        default=None,
        help="a key holder site's name; repeat for a key-holder group (default: keyholder); "
        "--keyholder none when the parties hold the key's shares",
    )
    init.add_argument("--host", default="127.0.0.1", help="the SuperLink's address for sites")
    init.add_argument("--port", type=int, default=8000)
    superlink = sub.add_parser(
        "superlink", help="coordinator: start the SuperLink (TLS, SuperNode authentication)"
    )
    superlink.add_argument("folder")
    superlink.add_argument(
        "--bind",
        default="",
        help="the address it listens on (default: --host of init when an IP address, else 0.0.0.0)",
    )
    sub.add_parser(
        "register", help="coordinator: register every site's public key under its name"
    ).add_argument("folder")
    add_key = sub.add_parser("add-key", help="coordinator: store the public key a site handed in")
    add_key.add_argument("folder")
    add_key.add_argument("name")
    add_key.add_argument("public_key", help="the site's supernode.pub (never its private key)")
    add_key.add_argument("--replace", action="store_true", help="replace the site's stored key")
    kit_parser = sub.add_parser(
        "kit", help="coordinator: write what one site needs (or `superlink`: the coordinator's)"
    )
    kit_parser.add_argument("folder")
    kit_parser.add_argument("name", help=f"a site's name, or {d.SUPERLINK!r}")
    kit_parser.add_argument("--out", required=True, help="the folder to write the kit into")
    kit_parser.add_argument(
        "--site-dir", default="", help="the site's folder there, for its systemd unit "
        f"(default {kit.DEFAULT_SITE_DIR}/NAME)"
    )  # fmt: skip
    kit_parser.add_argument("--fedhe", default="", help="the fedhe command there (default: PATH)")
    site = sub.add_parser("site", help="a site: start its SuperNode")
    site.add_argument("folder", help="the site's folder: its key and its kit")
    site.add_argument("--port", type=int, required=True, help="its local Runtime API port")
    site.add_argument("--data-path", default="", help="party: its CSV; key holder: its folder")
    site.add_argument("--superlink", default="", help="host:port (default: the federation's)")
    site.add_argument(
        "--passphrase-file", default="", help="key holder: seal its secret keys with this"
    )
    site.add_argument(
        "--keyholder-path",
        default="",
        help="party: also hold a share of the key (jobs with keyholders=parties), kept here",
    )
    site.add_argument(
        "--test-path",
        default="",
        help="party: its own test set (a CSV with the target); with --report-metrics it "
        "evaluates each job's final model on it and reports the metrics only",
    )
    site.add_argument(
        "--query-path",
        default="",
        help="party: its own queries when it is a job's querier (KNN, MLP inference): a CSV of "
        "the job's feature columns, the target column optional; it stays at the site",
    )
    site.add_argument(
        "--output-dir",
        default="",
        help="party: where its answers (predictions, logits) and released models stay",
    )
    site.add_argument(
        "--report-metrics",
        action="store_true",
        help="party: as querier, report counts about its answers (accuracy, errors) when its "
        "query file holds the target column; never the answers themselves",
    )
    site.add_argument(
        "--approved",
        default="",
        help="the app bundles this site runs: one sha256 a line (`fedhe deploy approve`)",
    )
    approve = sub.add_parser(
        "approve", help="a site: print the hash of the app bundle `flwr run APP_DIR` ships"
    )
    approve.add_argument("app_dir", help="the reviewed fedhe app folder (pyproject.toml)")
    run = sub.add_parser("run", help="coordinator: run a job on the federation")
    run.add_argument("folder")
    run.add_argument("--app", default=".", help="the fedhe app folder (pyproject.toml)")
    run.add_argument(
        "--run-config",
        default="",
        help="e.g. task='linreg' parties=3 (plaintext-twin is always false here)",
    )


def deploy(args: argparse.Namespace) -> int:
    if args.deploy_command == "init":
        sites = {name: "party" for name in args.party}
        for name in args.keyholder or [d.KEYHOLDER]:
            if name != "none":
                sites[name] = d.KEYHOLDER
        federation = d.init_federation(args.folder, sites, host=args.host, port=args.port)
        print(
            f"federation in {federation.folder}: SuperLink {federation.address}, sites "
            f"{', '.join(f'{n} ({r})' for n, r in sites.items())}"
        )
        return 0
    if args.deploy_command == "keygen":
        return keygen(args)
    if args.deploy_command == "approve":  # `>> FILE` appends it to the site's approved file
        from fedhe.approval import approval_line

        print(approval_line(args.app_dir))
        return 0
    federation = _load(args)
    env = d.environment(federation)
    if args.deploy_command == "add-key":
        return add_key(federation, args)
    if args.deploy_command == "kit":
        return write_kit(federation, args)
    if args.deploy_command == "superlink":
        return _exec(d.superlink_command(federation, args.bind), env)
    if args.deploy_command == "register":
        return register(federation, env)
    if args.deploy_command == "site":
        command = d.site_command(
            federation,
            args.name,
            port=args.port,
            data_path=args.data_path,
            superlink=args.superlink,
            passphrase_file=args.passphrase_file,
            keyholder_path=args.keyholder_path,
            approved=args.approved,
            query_path=args.query_path,
            output_dir=args.output_dir,
            report_metrics=args.report_metrics,
            test_path=args.test_path,
        )
        return _exec(command, env)
    return subprocess.call(d.run_command(args.app, args.run_config), env=env)


def _load(args: argparse.Namespace) -> d.Federation:
    """`site` runs on a site's folder (its kit, and its key, checked before Flower starts);
    every other command on the coordinator's federation folder."""
    if args.deploy_command == "site":
        federation = d.Federation.load(args.folder, as_site=True)
        if not federation.site:
            raise d.DeployError(
                f"{args.folder} is the coordinator's federation folder; a site runs from its "
                f"own folder: its key (`fedhe deploy keygen`) and its kit (`fedhe deploy kit "
                f"{args.folder} NAME --out DIR`)."
            )
        kit.check_site_key(federation)
        args.name = federation.site
        return federation
    federation = d.Federation.load(args.folder)
    if federation.site:
        raise d.DeployError(
            f"{args.folder} is the kit of site {federation.site!r}; `fedhe deploy "
            f"{args.deploy_command}` runs at the coordinator, on its federation folder."
        )
    return federation


def keygen(args: argparse.Namespace) -> int:
    public = kit.keygen(args.folder, args.name)
    print(public)
    print(f"fingerprint {kit.fingerprint(public)}: hand the line above (or "
          f"{args.folder}/{d.SITE_PUBLIC_KEY}) to the coordinator and read them the "
          f"fingerprint; {d.SITE_KEY} never leaves this folder.")  # fmt: skip
    return 0


def add_key(federation: d.Federation, args: argparse.Namespace) -> int:
    found = kit.add_key(federation, args.name, args.public_key, replace=args.replace)
    print(f"{args.name}: key {found} stored (check the fingerprint with the site); then "
          f"`fedhe deploy register {args.folder}` and `fedhe deploy kit {args.folder} "
          f"{args.name} --out DIR`.")  # fmt: skip
    return 0


def write_kit(federation: d.Federation, args: argparse.Namespace) -> int:
    if args.name == d.SUPERLINK:
        files = kit.write_superlink_kit(federation, args.out, fedhe=args.fedhe)
    else:
        options = {"site_dir": args.site_dir, "fedhe": args.fedhe}
        files = kit.write_kit(federation, args.name, args.out, **options)
    print(f"{args.name}: kit in {args.out} ({', '.join(f.name for f in files)}); no secret in it.")
    return 0


def register(federation: d.Federation, env: dict[str, str], timeout_s: float = 60) -> int:
    """Register every site whose public key was handed in (one already registered counts as
    done), retrying while the SuperLink is still starting; names the sites still without a key."""
    for name, command in d.register_commands(federation).items():
        deadline = time.monotonic() + timeout_s
        while True:
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode == 0 and "registered" in done.stdout:
                print(done.stdout.strip().splitlines()[-1])
                break
            if "already in use" in done.stdout + done.stderr:
                print(f"{name}: already registered")
                break
            if time.monotonic() > deadline:
                print(done.stdout + done.stderr, file=sys.stderr)
                return done.returncode or 1
            time.sleep(1.0)
    missing = d.unregistered_sites(federation)
    if missing:
        print(f"no key yet for {', '.join(missing)}: each runs `fedhe deploy keygen`, then "
              f"`fedhe deploy add-key {federation.folder} NAME FILE` and register again.",
              file=sys.stderr)  # fmt: skip
    return 0


def _exec(command: list[str], env: dict[str, str]) -> int:
    os.execvpe(command[0], command, env)
    return 1  # not reached
