"""Deployment across institutions with Flower's own runtime: a SuperLink with TLS and SuperNode
authentication, one SuperNode per site (parties and the key holder), `flwr run` for jobs.

`init_federation` writes a federation folder for the coordinator:

    ca/ca.crt, ca/ca.key            the federation's CA (ca.key never leaves the coordinator)
    superlink/server.pem, .key      the SuperLink's TLS certificate (SAN: its host) and key
    sites/<name>/<name>, .pub       each site's ECDSA P-384 SuperNode key pair (OpenSSH format);
                                    a site gets its folder plus ca/ca.crt, and keeps <name> secret
    flwr/config.toml                the coordinator's `flwr` connection (FLWR_HOME)
    federation.json                 the SuperLink address and every site's role

The other functions build the exact command line of each role; `fedhe deploy …` runs them.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedhe.config import ConfigError, JobConfig
from fedhe.errors import FedHEError

KEYHOLDER = "keyholder"
ROLES = ("party", KEYHOLDER)
CERT_DAYS = 365
FEDERATION_NAME = "fedhe"
WINDOW_SETTING = "message-window"  # 0 in every deployed job unless the coordinator says
TWIN_SETTING = "plaintext-twin"  # forced off in every deployed job (deployment_run_config)
KEEP_STORE_SETTING = "keep-store"  # refused in a deployed job (deployment_run_config)


class DeployError(FedHEError):
    """A federation folder or a deployment command is not usable as asked."""


@dataclass(frozen=True)
class Federation:
    folder: Path
    host: str
    port: int
    sites: dict[str, str]  # name → role

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca" / "ca.crt"

    @property
    def flwr_home(self) -> Path:
        return self.folder / "flwr"

    def site_key(self, name: str) -> Path:
        if name not in self.sites:
            raise DeployError(f"no site {name!r} in {self.folder}; sites: {sorted(self.sites)}.")
        return self.folder / "sites" / name / name

    @classmethod
    def load(cls, folder: str | Path) -> Federation:
        path = Path(folder) / "federation.json"
        try:
            data = json.loads(path.read_text())
            return cls(Path(folder), data["host"], int(data["port"]), dict(data["sites"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DeployError(
                f"{path} is missing or malformed ({err}); create it with `fedhe deploy init`."
            ) from err


def init_federation(
    folder: str | Path, sites: dict[str, str], *, host: str = "127.0.0.1", port: int = 8000
) -> Federation:
    """Create the CA, the SuperLink certificate and one SuperNode key pair per site."""
    folder = Path(folder)
    if (folder / "federation.json").exists():
        raise DeployError(f"{folder} already holds a federation; choose another folder.")
    bad = {name: role for name, role in sites.items() if role not in ROLES}
    if bad or "party" not in sites.values():
        raise DeployError(
            f"sites need parties and any number of {KEYHOLDER!r} sites (none when the parties "
            f"hold the key's shares), roles in {ROLES}; got {sites}."
        )
    federation = Federation(folder, host, port, dict(sites))
    ca_key, ca_cert = _certificate_authority()
    _write(folder / "ca" / "ca.key", _private_pem(ca_key), secret=True)
    _write(folder / "ca" / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    server_key, server_cert = _server_certificate(ca_key, ca_cert, host)
    _write(folder / "superlink" / "server.key", _private_pem(server_key), secret=True)
    _write(
        folder / "superlink" / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM)
    )
    for name in sites:
        write_site_key(folder / "sites" / name / name)
        shutil.copy(folder / "ca" / "ca.crt", folder / "sites" / name / "ca.crt")
    _write(folder / "flwr" / "config.toml", _flwr_config(federation).encode())
    _write(
        folder / "federation.json",
        json.dumps({"host": host, "port": port, "sites": sites}, indent=2).encode(),
    )
    return federation


def write_site_key(path: Path) -> None:
    """An ECDSA P-384 key pair in OpenSSH format, as `flower-supernode` expects it."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(path, private, secret=True)
    _write(path.with_suffix(".pub"), public + b"\n")


# -- commands ----------------------------------------------------------------------------------


def environment(federation: Federation) -> dict[str, str]:
    """Flower's home for the coordinator's CLI; no `uv sync` per run (fedhe is installed)."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(federation.flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    bin_dir = str(Path(sys.executable).parent)  # flower-superexec must be on PATH
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def superlink_command(federation: Federation) -> list[str]:
    folder = federation.folder
    return [
        _tool("flower-superlink"),
        "--ssl-ca-certfile", str(federation.ca_cert),
        "--ssl-certfile", str(folder / "superlink" / "server.pem"),
        "--ssl-keyfile", str(folder / "superlink" / "server.key"),
        "--enable-supernode-auth",
        "--database", str(folder / "superlink" / "state.db"),
        "--disable-runtime-dependency-installation",
        "--port", str(federation.port),
    ]  # fmt: skip


def register_commands(federation: Federation) -> list[list[str]]:
    """`flwr supernode register` of every site's public key, under its name."""
    return [
        [
            _tool("flwr"),
            "supernode",
            "register",
            str(federation.site_key(name).with_suffix(".pub")),
            FEDERATION_NAME,
            "--name",
            name,
        ]
        for name in federation.sites
    ]


def site_command(
    federation: Federation,
    name: str,
    *,
    port: int,
    data_path: str = "",
    superlink: str = "",
    passphrase_file: str = "",
    keyholder_path: str = "",
) -> list[str]:
    """The SuperNode of one site: its key, the CA, its role and where its data lives
    (party: its CSV file, or nothing for built-in data; key holder: its state folder, and
    optionally the file holding the passphrase that seals its secret keys). A party with
    `keyholder_path` also holds a share of the key of jobs run with `keyholders=parties`."""
    key = federation.site_key(name)
    role = federation.sites[name]
    node_config = _setting("role", role)
    if data_path:
        node_config += " " + _setting("data-path", data_path)
    if role != KEYHOLDER:  # its end-to-end identity, kept at the site
        node_config += " " + _setting("identity-path", str(key.parent / "identity.key"))
    if keyholder_path:
        if role == KEYHOLDER:
            raise DeployError("a key holder keeps its shares under --data-path.")
        node_config += " hold-key-share=true " + _setting("keyholder-path", keyholder_path)
    if passphrase_file:
        if role != KEYHOLDER and not keyholder_path:
            raise DeployError(
                "only a key holder, or a party with --keyholder-path, has key shares to seal."
            )
        node_config += " " + _setting("passphrase-file", passphrase_file)
    return [
        _tool("flower-supernode"),
        "--superlink", superlink or federation.address,
        "--root-certificates", str(key.parent / "ca.crt"),
        "--auth-supernode-private-key", str(key),
        "--port", str(port),
        "--node-config", node_config,
    ]  # fmt: skip


def run_command(app_dir: str | Path, run_config: str = "") -> list[str]:
    command = [_tool("flwr"), "run", str(app_dir), FEDERATION_NAME, "--stream"]
    for overrides in deployment_run_config(run_config):
        command += ["--run-config", overrides]
    return command


def deployment_run_config(run_config: str = "") -> list[str]:
    """The `--run-config` values of a deployed job: the coordinator's `key=value` settings,
    then `plaintext-twin=false` last (Flower applies them in order). Real parties' data is never
    sent in the clear, so a setting that turns the plaintext twin on is refused."""
    if run_config.strip().endswith(".toml"):
        raise DeployError(
            f"fedhe deploy run takes key=value settings, not a TOML file ({run_config.strip()!r}): "
            'pass them as --run-config "key=value …".'
        )
    for key, value in _parse_run_config(run_config).items():
        if key.replace("_", "-") == TWIN_SETTING and _turns_on(value):
            raise DeployError(
                f"{key}={value!r}: a deployment never runs the plaintext twin (the parties' real "
                "data would leave them unencrypted); remove it from --run-config, or compare "
                "with the clear run in a simulation (`fedhe simulate`)."
            )
        if key.replace("_", "-") == KEEP_STORE_SETTING and _turns_on(value):
            raise DeployError(
                f"{key}={value!r}: a kept KNN store answers later queries with every role on one "
                "machine, the key holder's secret key beside the store; it is for simulations "
                "only (`fedhe simulate knn --keep-store true`). Remove it from --run-config."
            )
    # A deployment sends every message at once (pyproject's window is for the simulation
    # engine); the coordinator's own settings come after and may change that.
    first = [f"{WINDOW_SETTING}=0"]
    return first + ([run_config] if run_config.strip() else []) + [f"{TWIN_SETTING}=false"]


# -- helpers -------------------------------------------------------------------------------


def _setting(key: str, value: str) -> str:
    """One `key="value"` of a SuperNode's --node-config, which Flower reads back as a TOML
    string: a backslash is escaped (TOML would read `\\t` as a tab); a quote would end the
    value early and let the rest pass as settings of its own, and control characters or
    undecodable bytes cannot be passed at all, so those are refused."""
    bad = sorted({c for c in value if c == '"' or unicodedata.category(c) in ("Cc", "Cs")})
    if bad:
        raise DeployError(
            f"{key} {value!r} contains {', '.join(map(_char_name, bad))}, which a "
            "SuperNode's --node-config cannot carry; rename the path (or link it) without them."
        )
    escaped = value.replace("\\", "\\\\")
    return f'{key}="{escaped}"'


def _char_name(char: str) -> str:
    return "a double quote" if char == '"' else repr(char)


def _parse_run_config(run_config: str) -> dict[str, Any]:
    """`run_config` read as `flwr run` reads it (Flower's own parser)."""
    import click
    from flwr.common.config import parse_config_args

    try:
        return parse_config_args([run_config])
    except (click.ClickException, ValueError) as err:
        message = err.format_message() if isinstance(err, click.ClickException) else str(err)
        raise DeployError(
            f"--run-config {run_config!r} is not key=value settings: {message}"
        ) from err


def _turns_on(value: Any) -> bool:
    """Whether the ServerApp would read `value` as true (JobConfig's coercion, the same for
    every boolean setting); a value it cannot read counts as on."""
    try:
        return JobConfig.from_run_config({TWIN_SETTING: value}).plaintext_twin
    except ConfigError:
        return True


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def _flwr_config(federation: Federation) -> str:
    return (
        "[superlink]\n"
        f'default = "{FEDERATION_NAME}"\n\n'
        f"[superlink.{FEDERATION_NAME}]\n"
        f'address = "{federation.address}"\n'
        f'root-certificates = "{federation.ca_cert.resolve()}"\n'
    )


def _certificate_authority() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedhe federation CA")])
    cert = (
        _builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _server_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, host: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    cert = (
        _builder(subject, ca_cert.subject, key.public_key())
        .add_extension(x509.SubjectAlternativeName(_alt_names(host)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _alt_names(host: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    if host != "127.0.0.1":
        names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    return names


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
    )


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, secret: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
