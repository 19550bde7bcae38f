"""Deployment across institutions with Flower's own runtime: a SuperLink with TLS and SuperNode
authentication, one SuperNode per site (parties and the key holder), `flwr run` for jobs.

Each site makes its own SuperNode key (`fedhe deploy keygen`, fedhe.deploy_kit): its private
half never leaves the site. `init_federation` writes the coordinator's federation folder:

    ca/ca.crt, ca/ca.key            the federation's CA (ca.key never leaves the coordinator)
    superlink/server.pem, .key      the SuperLink's TLS certificate (SAN: its host) and key
    keys/<name>.pub                 each site's public key, as the site handed it (`add-key`)
    flwr/config.toml                the coordinator's `flwr` connection (FLWR_HOME)
    federation.json                 the SuperLink address and every site's role

A site's folder holds its key pair (supernode.key, supernode.pub) and its kit from the
coordinator (ca.crt, a federation.json naming that site only, start.sh, a systemd unit).
`Federation.load` reads either; the other functions build the exact command line of each role,
and `fedhe deploy …` runs them.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
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
SITE_KEY = "supernode.key"  # a site's private SuperNode key, in its own folder (0600)
SITE_PUBLIC_KEY = "supernode.pub"  # its public half: the only part handed to the coordinator
SUPERLINK = "superlink"  # `fedhe deploy kit FED superlink`: the coordinator's own service
# a site name becomes a file name, a systemd unit and a user (fedhe-<name>, ≤ 32 characters)
SITE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,25}")


class DeployError(FedHEError):
    """A federation folder or a deployment command is not usable as asked."""


@dataclass(frozen=True)
class Federation:
    """The coordinator's federation folder, or one site's kit (`site` set: `sites` is that site
    alone, and `key_fingerprint` the public key the coordinator registered for it)."""

    folder: Path
    host: str
    port: int
    sites: dict[str, str]  # name → role
    site: str = ""
    key_fingerprint: str = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def ca_cert(self) -> Path:
        return self.folder / ("ca.crt" if self.site else "ca/ca.crt")

    @property
    def flwr_home(self) -> Path:
        return self.folder / "flwr"

    def site_key(self, name: str) -> Path:
        """The site's private key: only a site's own folder (its kit) has it."""
        if self.site and name != self.site:
            raise DeployError(f"{self.folder} is the kit of site {self.site!r}, not of {name!r}.")
        self._check_site(name)
        if not self.site:
            raise DeployError(
                f"{self.folder} is the coordinator's federation folder, which holds no site's "
                f"private key: site {name!r} makes its own (`fedhe deploy keygen SITE_DIR "
                f"{name}`) and runs from its kit (`fedhe deploy kit {self.folder} {name} --out "
                "DIR`, copied into SITE_DIR)."
            )
        return self.folder / SITE_KEY

    def public_key(self, name: str) -> Path:
        """Where the coordinator keeps the public key site `name` handed it (`add-key`)."""
        self._check_site(name)
        return self.folder / "keys" / f"{name}.pub"

    def for_site(self, name: str, folder: str | Path, key_fingerprint: str = "") -> Federation:
        """What site `name` knows of the federation, read from its kit in `folder`."""
        self._check_site(name)
        return Federation(
            Path(folder), self.host, self.port, {name: self.sites[name]}, name, key_fingerprint
        )

    def _check_site(self, name: str) -> None:
        if name not in self.sites:
            raise DeployError(f"no site {name!r} in {self.folder}; sites: {sorted(self.sites)}.")

    def to_json(self) -> str:
        data: dict[str, Any] = {"host": self.host, "port": self.port}
        if self.site:
            data.update(site=self.site, role=self.sites[self.site])
            data["key-fingerprint"] = self.key_fingerprint
        else:
            data["sites"] = self.sites
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def load(cls, folder: str | Path, *, as_site: bool = False) -> Federation:
        """The federation file in `folder`; `as_site`: a site's kit is expected (the advice
        on a missing file is then to ask the coordinator for the kit, never to make a CA)."""
        path = Path(folder) / "federation.json"
        if as_site and not path.exists():
            raise DeployError(
                f"{folder} has no federation.json: ask the coordinator for this site's kit "
                "(they run `fedhe deploy kit FED NAME --out DIR`) and copy its files into "
                f"{folder}, beside the key made there by `fedhe deploy keygen`."
            )
        try:
            data = json.loads(path.read_text())
            host, port = data["host"], int(data["port"])
            if "site" in data:  # a site's kit
                site, registered = str(data["site"]), str(data.get("key-fingerprint", ""))
                return cls(Path(folder), host, port, {site: str(data["role"])}, site, registered)
            return cls(Path(folder), host, port, dict(data["sites"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            advice = (
                "ask the coordinator for this site's kit again (`fedhe deploy kit`)"
                if as_site
                else "the coordinator creates it once with `fedhe deploy init`"
            )
            raise DeployError(f"{path} is missing or malformed ({err}); {advice}.") from err


def init_federation(
    folder: str | Path, sites: dict[str, str], *, host: str = "127.0.0.1", port: int = 8000
) -> Federation:
    """Create the CA, the SuperLink certificate, the `flwr` config and federation.json. No
    site's key: each site makes its own (`fedhe deploy keygen`) and hands over the public half."""
    folder = Path(folder)
    if (folder / "federation.json").exists():
        raise DeployError(f"{folder} already holds a federation; choose another folder.")
    bad = {name: role for name, role in sites.items() if role not in ROLES}
    if bad or "party" not in sites.values():
        raise DeployError(
            f"sites need parties and any number of {KEYHOLDER!r} sites (none when the parties "
            f"hold the key's shares), roles in {ROLES}; got {sites}."
        )
    for name in sites:
        check_site_name(name)
    federation = Federation(folder, host, port, dict(sites))
    ca_key, ca_cert = _certificate_authority()
    _write(folder / "ca" / "ca.key", _private_pem(ca_key), secret=True)
    _write(folder / "ca" / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    server_key, server_cert = _server_certificate(ca_key, ca_cert, host)
    _write(folder / "superlink" / "server.key", _private_pem(server_key), secret=True)
    _write(
        folder / "superlink" / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM)
    )
    (folder / "keys").mkdir(mode=0o700, exist_ok=True)  # the public keys sites hand in
    _write(folder / "flwr" / "config.toml", _flwr_config(federation).encode())
    _write(folder / "federation.json", federation.to_json().encode())
    return federation


def check_site_name(name: str) -> str:
    """A site's name names its kit, its systemd unit and its service user: keep it plain."""
    if not SITE_NAME.fullmatch(name) or name in (SUPERLINK, "none"):
        raise DeployError(
            f"site name {name!r}: use 1-26 lowercase letters, digits, '-' or '_', starting with "
            f"a letter or digit (not {SUPERLINK!r} or 'none'), e.g. 'hospital-a'."
        )
    return name


def write_site_key(path: Path, comment: str = "") -> str:
    """An ECDSA P-384 key pair in OpenSSH format, as `flower-supernode` expects it: the
    private key at `path` (0600), the public one beside it (`.pub`); returns the public line."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    line = public.decode() + (f" {comment}" if comment else "")
    _write(path, private, secret=True)
    _write(path.with_suffix(".pub"), (line + "\n").encode())
    return line


# -- commands ----------------------------------------------------------------------------------


def environment(federation: Federation) -> dict[str, str]:
    """Flower's home for the coordinator's CLI; no `uv sync` per run (fedhe is installed)."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(federation.flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    # The SuperLink's SuperExec looks for a new run's ServerApp task every second by default.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    bin_dir = str(Path(sys.executable).parent)  # flower-superexec must be on PATH
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def superlink_command(federation: Federation, bind: str = "") -> list[str]:
    """The SuperLink, listening on `bind` (default: the federation's host when it is an IP
    address, else every address). Flower 1.42 serves the Fleet, Control and ServerAppIo APIs on
    this one port, and its own default (127.0.0.1) would keep every other machine out."""
    folder = federation.folder
    return [
        _tool("flower-superlink"),
        "--ssl-ca-certfile", str(federation.ca_cert),
        "--ssl-certfile", str(folder / "superlink" / "server.pem"),
        "--ssl-keyfile", str(folder / "superlink" / "server.key"),
        "--enable-supernode-auth",
        "--database", str(folder / "superlink" / "state.db"),
        "--disable-runtime-dependency-installation",
        "--host", bind or _bind_address(federation.host),
        "--port", str(federation.port),
    ]  # fmt: skip


def _bind_address(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return "0.0.0.0"  # a DNS name: listen everywhere; the firewall says who may connect


def register_commands(federation: Federation) -> dict[str, list[str]]:
    """`flwr supernode register` of every public key a site handed in, under the site's name
    (a site whose key has not come yet is left out: `unregistered_sites`)."""
    return {
        name: [
            _tool("flwr"),
            "supernode",
            "register",
            str(federation.public_key(name)),
            FEDERATION_NAME,
            "--name",
            name,
        ]
        for name in federation.sites
        if federation.public_key(name).exists()
    }


def unregistered_sites(federation: Federation) -> list[str]:
    """Sites whose public key the coordinator has not been handed yet (`add-key`)."""
    return [name for name in federation.sites if not federation.public_key(name).exists()]


def site_command(
    federation: Federation,
    name: str,
    *,
    port: int,
    data_path: str = "",
    superlink: str = "",
    passphrase_file: str = "",
    keyholder_path: str = "",
    approved: str = "",
    query_path: str = "",
    output_dir: str = "",
    report_metrics: bool = False,
    test_path: str = "",
) -> list[str]:
    """The SuperNode of one site: its key, the CA, its role and where its data lives
    (party: its CSV file, or nothing for built-in data; key holder: its state folder, and
    optionally the file holding the passphrase that seals its secret keys). A party with
    `keyholder_path` also holds a share of the key of jobs run with `keyholders=parties`."""
    key = federation.site_key(name)
    role = federation.sites[name]
    node_config = _setting("role", role) + " " + _setting("site-name", name)
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
    node_config += _querier_settings(role, query_path, output_dir, report_metrics)
    node_config += f" {_setting('test-path', test_path)}" if test_path else ""  # with metrics
    return [
        *_launcher(approved),  # Flower's SuperNode, approved app bundles only (fedhe.supernode)
        "--superlink", superlink or federation.address,
        "--root-certificates", str(key.parent / "ca.crt"),
        "--auth-supernode-private-key", str(key),
        "--port", str(port),
        "--node-config", node_config,
    ]  # fmt: skip


def _querier_settings(role: str, query_path: str, output_dir: str, report_metrics: bool) -> str:
    """A party's own queries (when it is a job's querier: KNN, MLP inference), the folder its
    answers and released models stay in, and whether it reports counts about its answers
    (accuracy, errors: needs the target column in its query file)."""
    if role == KEYHOLDER and (query_path or output_dir or report_metrics):
        raise DeployError("--query-path, --output-dir and --report-metrics are for a party site.")
    settings = ""
    if query_path:
        settings += " " + _setting("query-path", query_path)
    if output_dir:
        settings += " " + _setting("output-dir", output_dir)
    if report_metrics:
        settings += " report-metrics=true"
    return settings


def _launcher(approved: str) -> list[str]:
    """`python -m fedhe.supernode --approved FILE --`: a site runs only the app bundles it
    approved, so a SuperNode without an approved file is refused here."""
    if not approved:
        raise DeployError(
            "a site needs --approved FILE, the hashes of the app bundles it runs: review the "
            "app's code, then `fedhe deploy approve APP_DIR >> FILE` (see docs/deploy.md)."
        )
    from fedhe.supernode import launcher_command

    return launcher_command(approved)


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
