"""Site keys and per-site kits: what crosses between a site and the coordinator, and only that.

A site runs `keygen` in its own folder and hands the coordinator the public line it prints; the
coordinator checks and stores it (`add_key`), registers it with the SuperLink, and hands back
the site's kit (`write_kit`): the CA certificate, a federation file naming that site alone,
a start script and a systemd unit. Nothing secret travels either way: the private key is made
where it is used, and a kit is written from public material only.
"""

from __future__ import annotations

import base64
import hashlib
import shlex
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedhe.deploy import (
    KEYHOLDER,
    SITE_KEY,
    SITE_PUBLIC_KEY,
    SUPERLINK,
    DeployError,
    Federation,
    _write,
    check_site_name,
    write_site_key,
)

KEY_TYPE = "ecdsa-sha2-nistp384"  # the SuperNode key Flower and fedhe expect (P-384)
DEFAULT_SITE_DIR = "/srv/fedhe"  # where a kit's unit expects the site folder, /srv/fedhe/<name>
DEFAULT_RUNTIME_PORT = 9094  # a SuperNode's local ClientAppIo port (any free local port)
APPROVED_FILE = "approved.txt"  # the site's approved app bundles (`fedhe deploy approve`)


# -- at the site -------------------------------------------------------------------------------


def keygen(site_dir: str | Path, name: str) -> str:
    """The site's SuperNode key pair in `site_dir` (0700): supernode.key (0600) stays there;
    returns the public line to hand to the coordinator. An existing key is never replaced (the
    coordinator may have registered it)."""
    check_site_name(name)
    folder = Path(site_dir)
    for existing in (folder / SITE_KEY, folder / SITE_PUBLIC_KEY):
        if existing.exists():
            raise DeployError(
                f"{existing} exists: this site already has a key (hand over {SITE_PUBLIC_KEY}). "
                "To replace a lost or leaked key, move the old pair away first, then ask the "
                "coordinator to register the new one (`fedhe deploy add-key … --replace`)."
            )
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)  # the site's folder: its key, identity and kit
    return write_site_key(folder / SITE_KEY, comment=name)


def check_site_key(kit: Federation) -> Path:
    """Before a SuperNode starts: the site's key is there, private to its user, and is the one
    the coordinator registered (Flower would only say 'Failed to activate SuperNode')."""
    key = kit.site_key(kit.site)
    if not key.exists():
        raise DeployError(
            f"no {SITE_KEY} in {kit.folder}: make this site's key there with `fedhe deploy "
            f"keygen {kit.folder} {kit.site}` and hand {SITE_PUBLIC_KEY} to the coordinator."
        )
    if key.stat().st_mode & 0o077:
        raise DeployError(f"{key} is readable by other users: `chmod 600 {key}`.")
    private = serialization.load_ssh_private_key(key.read_bytes(), password=None)
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    found = fingerprint(public.decode())
    if kit.key_fingerprint and found != kit.key_fingerprint:
        raise DeployError(
            f"{key} ({found}) is not the key the coordinator registered for {kit.site!r} "
            f"({kit.key_fingerprint}): hand them {kit.folder / SITE_PUBLIC_KEY} again and ask "
            "for a new kit."
        )
    return key


# -- at the coordinator ------------------------------------------------------------------------


def fingerprint(public_line: str) -> str:
    """OpenSSH's SHA256 fingerprint of a public key line, as `ssh-keygen -lf` prints it: the
    site and the coordinator read it to each other to check the key that was handed over."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def read_public_key(text: str, source: str = "the key") -> str:
    """`text` as one OpenSSH ecdsa-sha2-nistp384 public key line; a private key is refused."""
    if "PRIVATE KEY" in text:
        raise DeployError(
            f"{source} is a PRIVATE key: it must never leave its site. Nothing was stored; have "
            f"the site send {SITE_PUBLIC_KEY} (the line `fedhe deploy keygen` printed), and "
            "delete every copy of this file outside the site (or make a new key there)."
        )
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    try:
        if len(lines) != 1 or lines[0].split()[0] != KEY_TYPE:
            raise ValueError(f"expected one line starting with {KEY_TYPE!r}")
        key = serialization.load_ssh_public_key(lines[0].encode())
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
            raise ValueError("not a P-384 key")
    except (ValueError, IndexError) as err:
        raise DeployError(
            f"{source} is not an OpenSSH {KEY_TYPE} public key ({err}): use the site's "
            f"{SITE_PUBLIC_KEY}, made by `fedhe deploy keygen`."
        ) from err
    return lines[0]


def add_key(
    federation: Federation, name: str, public_file: str | Path, *, replace: bool = False
) -> str:
    """Store the public key site `name` handed over; returns its fingerprint. One key per
    site, and a key belongs to one site only."""
    path = Path(public_file)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DeployError(
            f"cannot read {path} ({err}): pass the site's {SITE_PUBLIC_KEY}."
        ) from err
    line = read_public_key(text, str(path))
    target = federation.public_key(name)
    new = fingerprint(line)
    for other in federation.sites:
        stored = federation.public_key(other)
        if stored.exists() and fingerprint(stored.read_text()) == new and other != name:
            raise DeployError(
                f"{path} is already the key of site {other!r}: each site makes its own."
            )
    if target.exists() and fingerprint(target.read_text()) != new and not replace:
        raise DeployError(
            f"site {name!r} already has a different key ({fingerprint(target.read_text())}); "
            "pass --replace to store this one (then unregister the old one: `flwr supernode "
            "unregister`)."
        )
    kind, body = line.split()[:2]
    _write(target, f"{kind} {body} {name}\n".encode())
    return new


def write_kit(federation: Federation, name: str, out: str | Path, **unit_options) -> list[Path]:
    """Exactly what site `name` needs from the coordinator, written into `out`: the CA
    certificate, its federation file, start.sh and its systemd unit. Its registered public key
    goes in as a fingerprint, so the site checks its own key against it before starting."""
    if federation.site:
        raise DeployError(f"{federation.folder} is a site's kit; make kits from the coordinator's.")
    registered = federation.public_key(name)
    if not registered.exists():
        raise DeployError(
            f"no public key for site {name!r} yet: the site runs `fedhe deploy keygen SITE_DIR "
            f"{name}` and hands you {SITE_PUBLIC_KEY}; then `fedhe deploy add-key "
            f"{federation.folder} {name} FILE`."
        )
    kit = federation.for_site(name, out, fingerprint(registered.read_text()))
    folder = Path(out)
    files = {
        "ca.crt": federation.ca_cert.read_bytes(),
        "federation.json": kit.to_json().encode(),
        "start.sh": site_start_script(kit).encode(),
        f"fedhe-{name}.service": site_unit(kit, **unit_options).encode(),
    }
    for file_name, data in files.items():
        _write(folder / file_name, data)
    (folder / "start.sh").chmod(0o755)
    return [folder / file_name for file_name in files]


def write_superlink_kit(federation: Federation, out: str | Path, **unit_options) -> list[Path]:
    """The coordinator's own service: a start script and a systemd unit for the SuperLink."""
    if federation.site:
        raise DeployError(f"{federation.folder} is a site's kit, not the coordinator's folder.")
    folder = Path(out)
    fed = shlex.quote(str(federation.folder.resolve()))
    script = _script(f"exec {{FEDHE}} deploy superlink {fed}", "the SuperLink")
    unit = _unit(
        f"fedhe SuperLink of {fed} (port {federation.port})",
        folder.resolve() / "superlink.sh",
        [federation.folder.resolve()],
        **unit_options,
    )
    _write(folder / "superlink.sh", script.encode())
    (folder / "superlink.sh").chmod(0o755)
    _write(folder / f"fedhe-{SUPERLINK}.service", unit.encode())
    return [folder / "superlink.sh", folder / f"fedhe-{SUPERLINK}.service"]


# -- start scripts and units -------------------------------------------------------------------


def site_start_script(kit: Federation) -> str:
    """`fedhe deploy site` on the kit's own folder; the site's settings come from the
    environment (its systemd unit, or the shell), with defaults inside the folder."""
    role = kit.sites[kit.site]
    line = f'exec {{FEDHE}} deploy site "$KIT" --port "${{FEDHE_PORT:-{DEFAULT_RUNTIME_PORT}}}"'
    line += f' --approved "${{FEDHE_APPROVED:-$KIT/{APPROVED_FILE}}}"'  # the bundles it runs
    if role == KEYHOLDER:  # its sealed shares and audit log, and what seals them
        line += ' --data-path "${FEDHE_DATA_PATH:-$KIT/state}"'
        line += ' ${FEDHE_PASSPHRASE_FILE:+--passphrase-file "$FEDHE_PASSPHRASE_FILE"}'
    else:  # its CSV (none: built-in data); as a job's querier, its own queries; its answers
        # and released models stay in its folder unless it names another
        line += ' --output-dir "${FEDHE_OUTPUT_DIR:-$KIT/output}"'
        for option in ("data-path", "query-path", "test-path", "keyholder-path", "passphrase-file"):
            variable = "FEDHE_" + option.upper().replace("-", "_")
            line += f' ${{{variable}:+--{option} "${variable}"}}'
        line += " ${FEDHE_REPORT_METRICS:+--report-metrics}"  # counts about its answers only
    return _script(line, f"site {kit.site} ({role})")


def site_unit(kit: Federation, *, site_dir: str = "", fedhe: str = "", data_path: str = "") -> str:
    """A hardened systemd unit for the site's SuperNode, run as its own user `fedhe-<name>`,
    writing only to its folder (`site_dir` at the site: default /srv/fedhe/<name>)."""
    folder = Path(site_dir or f"{DEFAULT_SITE_DIR}/{kit.site}")
    environment = [f"FEDHE_PORT={DEFAULT_RUNTIME_PORT}"]
    if data_path:
        environment.append(f"FEDHE_DATA_PATH={data_path}")
    return _unit(
        f"fedhe site {kit.site} ({kit.sites[kit.site]}): Flower SuperNode to {kit.address}",
        folder / "start.sh",
        [folder],
        user=f"fedhe-{kit.site}",
        fedhe=fedhe,
        environment=environment,
    )


def _script(line: str, what: str) -> str:
    return (
        "#!/bin/sh\n"
        f"# fedhe: starts {what}. Written by `fedhe deploy kit`; holds no secret.\n"
        "set -eu\n"
        'KIT="$(cd "$(dirname "$0")" && pwd)"\n'
        'FEDHE="${FEDHE:-fedhe}"  # the fedhe command (e.g. /opt/fedhe/.venv/bin/fedhe)\n'
        + line.replace("{FEDHE}", '"$FEDHE"')
        + "\n"
    )


def _unit(
    description: str,
    exec_start: Path,
    writable: list[Path],
    *,
    user: str = "fedhe",
    fedhe: str = "",
    environment: list[str] | None = None,
) -> str:
    settings = [f"Environment={shlex.quote(e)}" for e in (environment or [])]
    if fedhe:
        settings.append(f"Environment=FEDHE={shlex.quote(fedhe)}")
    paths = " ".join(str(p) for p in writable)
    return "\n".join(
        [
            "[Unit]",
            f"Description={description}",
            "Wants=network-online.target",
            "After=network-online.target",
            "",
            "[Service]",
            "Type=simple",
            f"# a dedicated user: useradd --system --home-dir {writable[0]} "
            f"--shell /usr/sbin/nologin {user}",
            f"User={user}",
            f"Group={user}",
            *settings,
            f"ExecStart={exec_start}",
            "Restart=on-failure",
            "RestartSec=10",
            "UMask=0077",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            f"ReadWritePaths={paths}",
            "ProtectHome=read-only",
            "PrivateTmp=yes",
            "PrivateDevices=yes",
            "ProtectKernelTunables=yes",
            "ProtectKernelModules=yes",
            "ProtectControlGroups=yes",
            "RestrictSUIDSGID=yes",
            "RestrictNamespaces=yes",
            "LockPersonality=yes",
            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )
