"""Sites make their own keys; the coordinator hands each site its kit, by name (no processes).

The flow, as docs/deploy.md walks it:

    site:        fedhe deploy keygen SITE_DIR NAME     → supernode.key stays; supernode.pub leaves
    coordinator: fedhe deploy init FED --party … ; fedhe deploy add-key FED NAME supernode.pub
                 fedhe deploy register FED ; fedhe deploy kit FED NAME --out KIT
    site:        copies KIT into SITE_DIR; SITE_DIR/start.sh (or its systemd unit)

The helpers here (`set_up_site`, `site_start`, `assert_site_keys_stayed_home`) are also the
set-up of the real deployments in tests/test_deploy.py.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedhe import deploy
from fedhe import deploy_kit as kit
from fedhe.cli import main
from fedhe.deploy_cli import add_deploy_commands

SITES = {"hospital-a": "party", "hospital-b": "party", "keyholder": "keyholder"}
KIT_FILES = {"ca.crt", "federation.json", "start.sh"}
ENV_OF = {  # `site_command` keyword → the variable start.sh reads it from
    "data_path": "FEDHE_DATA_PATH",
    "passphrase_file": "FEDHE_PASSPHRASE_FILE",
    "keyholder_path": "FEDHE_KEYHOLDER_PATH",
    "approved": "FEDHE_APPROVED",
    "query_path": "FEDHE_QUERY_PATH",
    "test_path": "FEDHE_TEST_PATH",
    "output_dir": "FEDHE_OUTPUT_DIR",
    "report_metrics": "FEDHE_REPORT_METRICS",
}


# -- helpers shared with tests/test_deploy.py --------------------------------------------------


def set_up_site(federation: deploy.Federation, name: str) -> deploy.Federation:
    """The documented flow for one site: keygen in its own folder (`<root>/sites/<name>`), the
    public half to the coordinator, the kit back (written to `<root>/kits/<name>`, copied in)."""
    root = federation.folder.parent
    site, kit_dir = root / "sites" / name, root / "kits" / name
    kit.keygen(site, name)
    kit.add_key(federation, name, site / deploy.SITE_PUBLIC_KEY)
    for path in kit.write_kit(federation, name, kit_dir):
        shutil.copy(path, site / path.name)
    return deploy.Federation.load(site, as_site=True)


def site_start(site: deploy.Federation, *, port: int, **kwargs) -> tuple[list[str], dict]:
    """The site's own start.sh, its settings in the environment (as its systemd unit sets them):
    the command and environment to start it with."""
    env = deploy.environment(site)
    env["FEDHE"] = str(Path(sys.executable).parent / "fedhe")
    env["FEDHE_PORT"] = str(port)
    for key, value in kwargs.items():
        if value is not False:
            env[ENV_OF[key]] = "1" if value is True else str(value)
    return [str(site.folder / "start.sh")], env


def private_keys_in(root: Path) -> set[Path]:
    """Every file under `root` that holds a PEM private key of any kind."""
    return {path for path in _files(root) if b"PRIVATE KEY-----" in path.read_bytes()}


def assert_site_keys_stayed_home(root: Path, sites: dict[str, Path]) -> None:
    """No file under `root` outside site `name`'s folder `sites[name]` holds any form of that
    site's private key: its PEM body (as written, or re-wrapped), the key re-encoded as PKCS#8
    or OpenSSL PEM, or its raw private scalar (bytes or hex)."""
    for name, folder in sites.items():
        secrets = _private_forms(folder / deploy.SITE_KEY)
        leaks = [
            path
            for path in _files(root)
            if not path.is_relative_to(folder) and any(s in path.read_bytes() for s in secrets)
        ]
        assert not leaks, f"{name}'s private key found outside {folder}: {leaks}"


def _private_forms(key_file: Path) -> list[bytes]:
    pem = key_file.read_bytes()
    key = serialization.load_ssh_private_key(pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    scalar = key.private_numbers().private_value
    raw = scalar.to_bytes((scalar.bit_length() + 7) // 8, "big")  # in every encoding of it
    body = b"".join(line for line in pem.splitlines() if b"-----" not in line)
    reencoded = [
        _pem_body(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
        for fmt in (
            serialization.PrivateFormat.PKCS8,
            serialization.PrivateFormat.TraditionalOpenSSL,
        )
    ]
    return [pem, body, raw, raw.hex().encode(), raw.hex().upper().encode(), *reencoded]


def _pem_body(pem: bytes) -> bytes:
    return b"".join(line for line in pem.splitlines() if b"-----" not in line)


def _files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file() and not path.is_symlink()]


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def flow(tmp_path) -> tuple[deploy.Federation, dict[str, deploy.Federation]]:
    """A coordinator folder and every site set up from it; nothing started."""
    federation = deploy.init_federation(tmp_path / "fed", SITES, host="10.1.2.3", port=9443)
    return federation, {name: set_up_site(federation, name) for name in SITES}


# -- keygen ------------------------------------------------------------------------------------


def test_keygen_leaves_the_private_key_readable_by_the_site_alone(tmp_path, capsys):
    site = tmp_path / "hospital-a"
    assert main(["deploy", "keygen", str(site), "hospital-a"]) == 0
    printed = capsys.readouterr().out
    public = (site / "supernode.pub").read_text().strip()
    assert public.startswith("ecdsa-sha2-nistp384 ") and public.endswith(" hospital-a")
    assert public in printed and kit.fingerprint(public) in printed
    assert "PRIVATE" not in printed and (site / "supernode.key").read_text() not in printed
    assert site.stat().st_mode & 0o777 == 0o700
    assert (site / "supernode.key").stat().st_mode & 0o777 == 0o600
    key = serialization.load_ssh_private_key((site / "supernode.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"


def test_keygen_never_replaces_a_key(tmp_path, capsys):
    site = tmp_path / "site"
    kit.keygen(site, "hospital-a")
    before = (site / "supernode.key").read_bytes()
    assert main(["deploy", "keygen", str(site), "hospital-a"]) == 2
    assert "already has a key" in capsys.readouterr().err
    assert (site / "supernode.key").read_bytes() == before


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="no ssh-keygen to compare with")
def test_the_fingerprint_is_the_one_ssh_keygen_prints(tmp_path):
    public = kit.keygen(tmp_path / "site", "hospital-a")
    shown = subprocess.run(
        ["ssh-keygen", "-lf", str(tmp_path / "site/supernode.pub")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert kit.fingerprint(public) in shown.split()


# -- add-key -----------------------------------------------------------------------------------


def test_add_key_refuses_a_private_key_and_stores_nothing(tmp_path, capsys):
    federation = deploy.init_federation(tmp_path / "fed", SITES)
    kit.keygen(tmp_path / "site", "hospital-a")
    code = main(["deploy", "add-key", str(federation.folder), "hospital-a",
                 str(tmp_path / "site/supernode.key")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "PRIVATE key" in err and "must never leave its site" in err
    assert not federation.public_key("hospital-a").exists()
    assert private_keys_in(federation.folder) == {
        federation.folder / "ca/ca.key",
        federation.folder / "superlink/server.key",
    }


@pytest.mark.parametrize(
    "make",
    [
        lambda: ec.generate_private_key(ec.SECP256R1()).public_key(),
        lambda: ed25519.Ed25519PrivateKey.generate().public_key(),
    ],
    ids=["p256", "ed25519"],
)
def test_add_key_refuses_a_key_flower_s_supernode_auth_would_not_take(tmp_path, make):
    federation = deploy.init_federation(tmp_path / "fed", SITES)
    public = make().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (tmp_path / "other.pub").write_bytes(public)
    with pytest.raises(deploy.DeployError, match="not an OpenSSH ecdsa-sha2-nistp384"):
        kit.add_key(federation, "hospital-a", tmp_path / "other.pub")
    (tmp_path / "junk.pub").write_text("ecdsa-sha2-nistp384 AAAAnotakey hospital-a\n")
    with pytest.raises(deploy.DeployError, match="not an OpenSSH"):
        kit.add_key(federation, "hospital-a", tmp_path / "junk.pub")


def test_add_key_keeps_one_key_per_site_and_one_site_per_key(tmp_path):
    federation = deploy.init_federation(tmp_path / "fed", SITES)
    kit.keygen(tmp_path / "a", "hospital-a")
    kit.keygen(tmp_path / "a2", "hospital-a")
    kit.add_key(federation, "hospital-a", tmp_path / "a/supernode.pub")
    kit.add_key(federation, "hospital-a", tmp_path / "a/supernode.pub")  # handed twice: fine
    with pytest.raises(deploy.DeployError, match="already the key of site 'hospital-a'"):
        kit.add_key(federation, "hospital-b", tmp_path / "a/supernode.pub")
    with pytest.raises(deploy.DeployError, match="--replace"):
        kit.add_key(federation, "hospital-a", tmp_path / "a2/supernode.pub")
    new = kit.add_key(federation, "hospital-a", tmp_path / "a2/supernode.pub", replace=True)
    assert kit.fingerprint(federation.public_key("hospital-a").read_text()) == new
    with pytest.raises(deploy.DeployError, match="no site 'nobody'"):
        kit.add_key(federation, "nobody", tmp_path / "a/supernode.pub")


def test_register_takes_the_keys_handed_in_and_names_the_sites_without_one(tmp_path):
    federation = deploy.init_federation(tmp_path / "fed", SITES)
    kit.keygen(tmp_path / "a", "hospital-a")
    kit.add_key(federation, "hospital-a", tmp_path / "a/supernode.pub")
    commands = deploy.register_commands(federation)
    assert list(commands) == ["hospital-a"]
    assert commands["hospital-a"][-4:] == [
        str(federation.public_key("hospital-a")), deploy.FEDERATION_NAME, "--name", "hospital-a"
    ]  # fmt: skip
    assert deploy.unregistered_sites(federation) == ["hospital-b", "keyholder"]


# -- kits --------------------------------------------------------------------------------------


def test_a_kit_holds_what_its_site_needs_and_nothing_secret(flow, tmp_path):
    federation, sites = flow
    for name, site in sites.items():
        kit_dir = tmp_path / "kits" / name
        assert {p.name for p in kit_dir.iterdir()} == KIT_FILES | {f"fedhe-{name}.service"}
        assert (kit_dir / "ca.crt").read_bytes() == federation.ca_cert.read_bytes()
        data = json.loads((kit_dir / "federation.json").read_text())
        assert data == {
            "host": "10.1.2.3",
            "port": 9443,
            "site": name,
            "role": SITES[name],
            "key-fingerprint": kit.fingerprint((site.folder / "supernode.pub").read_text()),
        }  # no other site, no key, no CA key
        assert site.address == "10.1.2.3:9443" and site.sites == {name: SITES[name]}
        assert os.access(kit_dir / "start.sh", os.X_OK)
        assert "fedhe deploy site" in (kit_dir / "start.sh").read_text().replace(
            '"$FEDHE"', "fedhe"
        )
        assert not private_keys_in(kit_dir)


def test_a_site_s_command_names_it_and_uses_its_own_folder(flow):
    _, sites = flow
    site = sites["hospital-b"]
    command = deploy.site_command(site, "hospital-b", port=9101, approved="/x/approved.txt")
    node_config = command[command.index("--node-config") + 1]
    assert 'site-name="hospital-b"' in node_config and 'role="party"' in node_config
    assert command[command.index("--auth-supernode-private-key") + 1] == str(
        site.folder / "supernode.key"
    )
    assert command[command.index("--root-certificates") + 1] == str(site.folder / "ca.crt")
    assert command[command.index("--superlink") + 1] == "10.1.2.3:9443"
    assert kit.check_site_key(site) == site.folder / "supernode.key"
    with pytest.raises(deploy.DeployError, match="kit of site 'hospital-b', not of 'hospital-a'"):
        deploy.site_command(site, "hospital-a", port=9101, approved="/x/approved.txt")


def test_start_sh_runs_fedhe_deploy_site_on_its_folder(flow, tmp_path):
    """start.sh, run as the systemd unit runs it, passes `fedhe deploy site` exactly the
    site's settings (the real parser reads them back)."""
    _, sites = flow
    fake = tmp_path / "fedhe-args"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    parser = _deploy_parser()
    cases = {
        "hospital-a": (
            {},
            {
                "data_path": "",
                "passphrase_file": "",
                "keyholder_path": "",
                "query_path": "",
                "output_dir": str(sites["hospital-a"].folder / "output"),
                "report_metrics": False,
            },
        ),
        "hospital-b": (
            {
                "FEDHE_DATA_PATH": "/data/b b.csv",
                "FEDHE_KEYHOLDER_PATH": "/kh",
                "FEDHE_QUERY_PATH": "/q.csv",
                "FEDHE_TEST_PATH": "/t.csv",
                "FEDHE_OUTPUT_DIR": "/out",
                "FEDHE_REPORT_METRICS": "1",
            },
            {
                "data_path": "/data/b b.csv",
                "keyholder_path": "/kh",
                "passphrase_file": "",
                "query_path": "/q.csv",
                "test_path": "/t.csv",
                "output_dir": "/out",
                "report_metrics": True,
            },
        ),
        "keyholder": (
            {"FEDHE_PASSPHRASE_FILE": "/etc/fedhe/pass"},
            {
                "data_path": str(sites["keyholder"].folder / "state"),
                "passphrase_file": "/etc/fedhe/pass",
            },
        ),
    }
    for name, (settings, expected) in cases.items():
        env = {"PATH": os.environ["PATH"], "FEDHE": str(fake), "FEDHE_PORT": "9200", **settings}
        out = subprocess.run([str(sites[name].folder / "start.sh")], env=env, capture_output=True,
                             text=True, check=True).stdout.splitlines()  # fmt: skip
        args = parser.parse_args(out)
        assert args.deploy_command == "site" and Path(args.folder) == sites[name].folder
        assert args.port == 9200
        assert args.approved == str(sites[name].folder / kit.APPROVED_FILE)
        assert {key: getattr(args, key) for key in expected} == expected


def test_a_site_unit_runs_start_sh_hardened_as_its_own_user(flow, tmp_path):
    federation, _ = flow
    kit.write_kit(federation, "keyholder", tmp_path / "k", site_dir="/srv/kh",
                  fedhe="/opt/fedhe/bin/fedhe")  # fmt: skip
    unit = (tmp_path / "k/fedhe-keyholder.service").read_text().splitlines()
    for line in (
        "User=fedhe-keyholder",
        "ExecStart=/srv/kh/start.sh",
        "Environment=FEDHE=/opt/fedhe/bin/fedhe",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "ReadWritePaths=/srv/kh",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "WantedBy=multi-user.target",
    ):
        assert line in unit, line


def test_the_superlink_kit_starts_the_coordinator_s_superlink(flow, tmp_path, capsys):
    federation, _ = flow
    out = tmp_path / "coordinator"
    assert main(["deploy", "kit", str(federation.folder), "superlink", "--out", str(out)]) == 0
    script = (out / "superlink.sh").read_text()
    assert f"deploy superlink {shlex.quote(str(federation.folder.resolve()))}" in script
    unit = (out / "fedhe-superlink.service").read_text().splitlines()
    assert f"ReadWritePaths={federation.folder.resolve()}" in unit
    assert "Restart=on-failure" in unit and "ProtectSystem=strict" in unit
    assert not private_keys_in(out)


def test_a_kit_needs_the_site_s_public_key_first(tmp_path, capsys):
    federation = deploy.init_federation(tmp_path / "fed", SITES)
    code = main(["deploy", "kit", str(federation.folder), "hospital-a", "--out", str(tmp_path)])
    assert code == 2 and "fedhe deploy add-key" in capsys.readouterr().err


# -- a site's errors name the fix ---------------------------------------------------------------


def test_a_site_folder_without_its_kit_is_told_to_ask_for_it(tmp_path, capsys):
    kit.keygen(tmp_path / "site", "hospital-a")  # the key, but no kit yet
    assert main(["deploy", "site", str(tmp_path / "site"), "--port", "9101"]) == 2
    err = capsys.readouterr().err
    assert "fedhe deploy kit" in err and "init" not in err


def test_a_site_started_on_the_coordinator_s_folder_is_told_to_use_its_kit(flow, capsys):
    federation, _ = flow
    assert main(["deploy", "site", str(federation.folder), "--port", "9101"]) == 2
    assert "fedhe deploy kit" in capsys.readouterr().err


def test_a_site_refuses_a_key_that_is_not_the_registered_one(flow, tmp_path, capsys):
    _, sites = flow
    site = sites["hospital-a"].folder
    (site / "supernode.key").unlink()
    (site / "supernode.pub").unlink()
    kit.keygen(site, "hospital-a")  # a new key the coordinator never saw
    assert main(["deploy", "site", str(site), "--port", "9101", "--approved", "/x"]) == 2
    assert "not the key the coordinator registered" in capsys.readouterr().err
    (site / "supernode.key").chmod(0o640)
    with pytest.raises(deploy.DeployError, match="chmod 600"):
        kit.check_site_key(sites["hospital-a"])
    (site / "supernode.key").unlink()
    with pytest.raises(deploy.DeployError, match="fedhe deploy keygen"):
        kit.check_site_key(sites["hospital-a"])


def test_coordinator_commands_refuse_a_site_s_kit(flow, capsys):
    _, sites = flow
    assert main(["deploy", "register", str(sites["hospital-a"].folder)]) == 2
    assert "runs at the coordinator" in capsys.readouterr().err


# -- the private key stays at its site ---------------------------------------------------------


def test_a_site_s_private_key_never_exists_outside_its_folder(flow, tmp_path):
    """After keygen → init → add-key → kit (and a kit copied in): the coordinator's folder holds
    only its own CA and TLS keys, no kit holds a key, and no file outside a site's folder holds
    any form of that site's key. If init still made site keys, the first assertion fails."""
    federation, sites = flow
    kit.write_superlink_kit(federation, tmp_path / "coordinator")
    assert private_keys_in(federation.folder) == {
        federation.folder / "ca/ca.key",
        federation.folder / "superlink/server.key",
    }
    assert not private_keys_in(tmp_path / "kits") and not private_keys_in(tmp_path / "coordinator")
    assert_site_keys_stayed_home(tmp_path, {name: s.folder for name, s in sites.items()})


def test_the_key_scan_finds_a_leaked_key(flow, tmp_path):
    """The scan itself: a copy of a site's key (as written, or re-encoded) is found."""
    _, sites = flow
    key_file = sites["hospital-a"].folder / "supernode.key"
    key = serialization.load_ssh_private_key(key_file.read_bytes(), None)
    pkcs8 = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    for leaked in (key_file.read_bytes(), pkcs8):
        (tmp_path / "fed" / "leak.bin").write_bytes(b"log line " + leaked + b" more")
        with pytest.raises(AssertionError, match="hospital-a's private key found"):
            assert_site_keys_stayed_home(tmp_path, {"hospital-a": sites["hospital-a"].folder})


def _deploy_parser():
    """The real `fedhe` parser's `deploy` commands."""
    import argparse

    parser = argparse.ArgumentParser()
    add_deploy_commands(parser.add_subparsers(dest="command"))
    return parser
