"""`fedhe deploy …`: the commands each role of a real deployment runs (see fedhe.deploy)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from fedhe import deploy as d


def add_deploy_commands(commands) -> None:
    parser = commands.add_parser(
        "deploy", help="set up and run a real federation (SuperLink, SuperNodes, TLS, auth)"
    )
    sub = parser.add_subparsers(dest="deploy_command", required=True)
    init = sub.add_parser("init", help="coordinator: CA, SuperLink certificate, site keys")
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
    for name, text in (
        ("superlink", "coordinator: start the SuperLink (TLS, SuperNode authentication)"),
        ("register", "coordinator: register every site's public key under its name"),
    ):
        sub.add_parser(name, help=text).add_argument("folder")
    site = sub.add_parser("site", help="a site: start its SuperNode")
    site.add_argument("folder", help="the federation folder (or the site's copy of it)")
    site.add_argument("name")
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
    federation = d.Federation.load(args.folder)
    env = d.environment(federation)
    if args.deploy_command == "superlink":
        return _exec(d.superlink_command(federation), env)
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
        )
        return _exec(command, env)
    return subprocess.call(d.run_command(args.app, args.run_config), env=env)


def register(federation: d.Federation, env: dict[str, str], timeout_s: float = 60) -> int:
    """Register every site, retrying while the SuperLink is still starting."""
    for command in d.register_commands(federation):
        deadline = time.monotonic() + timeout_s
        while True:
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode == 0 and "registered" in done.stdout:
                print(done.stdout.strip().splitlines()[-1])
                break
            if time.monotonic() > deadline:
                print(done.stdout + done.stderr, file=sys.stderr)
                return done.returncode or 1
            time.sleep(1.0)
    return 0


def _exec(command: list[str], env: dict[str, str]) -> int:
    os.execvpe(command[0], command, env)
    return 1  # not reached
