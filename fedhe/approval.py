"""Which app bundles a site runs: the SHA-256 of each Flower app bundle (FAB) it approved.

`flwr run APP_DIR` ships APP_DIR to every SuperNode as a FAB, and the SuperLink names it by
the SHA-256 of its bytes. The ClientApp reads a site's secrets (the key holder's secret keys
and passphrase), so whoever chooses the bundle chooses the code that touches them. A site
therefore pins the hashes of the bundles it reviewed, in an approved file:

    # fedhe 0.1.0, reviewed 2026-12-01 by J. Doe
    7ccc3af4993b21492ff8616d98a9187130b5d47a291c5da8b122df455a3de441  /srv/fedhe

one hash per line (anything after the hash is a note), `#` starts a comment. `fedhe deploy
approve APP_DIR` prints such a line, computed with Flower's own bundle builder, so it equals
the hash of what `flwr run APP_DIR` ships.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from fedhe.errors import FedHEError

_HASH = re.compile(r"[0-9a-f]{64}")


class ApprovalError(FedHEError):
    """An approved-apps file is missing or malformed, or an app folder cannot be bundled."""


def fab_hash(content: bytes) -> str:
    """The hash Flower names a bundle by (`flwr run`: sha256 of the FAB's bytes)."""
    return hashlib.sha256(content).hexdigest()


def app_hash(app_dir: str | Path) -> str:
    """The hash of the bundle `flwr run APP_DIR` would ship, built by Flower's own code."""
    from flwr.cli.build import build_fab_from_disk

    folder = Path(app_dir)
    if not (folder / "pyproject.toml").is_file():
        raise ApprovalError(
            f"{folder} has no pyproject.toml: give the Flower app folder that `flwr run` ships "
            "(fedhe's repository root)."
        )
    try:
        return fab_hash(build_fab_from_disk(folder))
    except ValueError as err:  # Flower's builder reports a bad app this way
        raise ApprovalError(f"{folder} does not build as a Flower app: {err}") from err


def bundle_files(app_dir: str | Path, folder: str | Path) -> Path:
    """Write the files of the bundle `flwr run APP_DIR` would ship into `folder` (what a
    reviewer should read: exactly that code, nothing the bundle leaves out); `flwr run folder`
    ships a bundle with the same hash, even while APP_DIR changes afterwards."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    bundle = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(Path(app_dir))))
    names = [name for name in bundle.namelist() if not name.startswith(".info/")]
    bundle.extractall(folder, names)  # the manifest (.info/) is rebuilt by Flower
    return Path(folder)


def approval_line(app_dir: str | Path) -> str:
    """`<sha256>  <app-dir>`: the line a site appends to its approved file."""
    return f"{app_hash(app_dir)}  {Path(app_dir).resolve()}"


def read_approved(path: str | Path) -> frozenset[str]:
    """The approved hashes in `path`. A line that is neither a comment nor starts with a
    lower-case SHA-256 is refused (a typo must not silently approve nothing, nor anything),
    and so is a file that approves nothing: a site that starts without an approved app would
    refuse every job while looking healthy."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ApprovalError(
            f"cannot read the approved-apps file {path} ({err}); create it with "
            f"`fedhe deploy approve APP_DIR >> {path}` after reviewing the app's code."
        ) from err
    hashes = set()
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if not _HASH.fullmatch(fields[0]):
            raise ApprovalError(
                f"{path}:{number}: {line.strip()!r} does not start with a SHA-256 (64 lower-case "
                "hex digits); each line is `<sha256>  <note>` as `fedhe deploy approve APP_DIR` "
                "prints it, or a `#` comment."
            )
        hashes.add(fields[0])
    if not hashes:
        raise ApprovalError(
            f"{path} approves no app; add one with `fedhe deploy approve APP_DIR >> {path}` "
            "after reviewing the app's code."
        )
    return frozenset(hashes)
