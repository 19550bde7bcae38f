"""Separate machines on one host, for deployment tests: one Linux network namespace per site.

`Network(["superlink", "hospital-a", …], hub="superlink")` builds, and removes on exit (also
on a failure, Ctrl-C or SIGTERM):

    fh-<id>-br            a namespace holding only the bridge `br0`
    fh-<id>-<host>        one namespace per host: loopback up, `eth0` (a veth pair whose other
                          end is a port of `br0`), address 10.233.<X>.<10+i>/24 (X random)

Every port of the bridge but the hub's is *isolated* (`bridge link set … isolated on`): a site
reaches the hub and nothing else, as sites behind their own firewalls reach only the
coordinator's SuperLink. `popen`/`run` start a command inside a host's namespace in a process
group of its own; `hide` mounts an empty tmpfs over folders (other sites' folders, the
coordinator's) for that process and its children only, so a site that reads a path it would
not have on its own machine fails here as it would there. Needs root and iproute2;
`netns_available()` says why not.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PREFIX = "fh-"
BRIDGE = "br0"
SUBNET = "10.233.{}.0/24"
CONNECT_CHECK = (
    "import socket, sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))\n"
    "except OSError as err:\n"
    "    print(err); sys.exit(1)\n"
)


class NetnsError(RuntimeError):
    """A namespace, link or address could not be made; the message carries `ip`'s own words."""


def netns_available() -> str | None:
    """None when this process may create network namespaces, else why not (a skip reason)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux only (this is {sys.platform})"
    if shutil.which("ip") is None or shutil.which("bridge") is None:
        return "iproute2's `ip` and `bridge` are not on PATH (apt-get install iproute2)"
    if shutil.which("unshare") is None:
        return "util-linux's `unshare` is not on PATH"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (or CAP_SYS_ADMIN + CAP_NET_ADMIN)"
    probe = f"{PREFIX}probe-{secrets.token_hex(3)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip() or made.returncode}"
    _ip("netns", "del", probe, check=False)
    return None


class Network:
    """Namespaces, bridge, veths and addresses of one test; `close()` removes them all."""

    def __init__(self, hosts: Sequence[str], *, hub: str) -> None:
        if hub not in hosts or len(set(hosts)) != len(hosts):
            raise ValueError(f"hosts must be distinct and include the hub {hub!r}: {hosts}")
        self.id = secrets.token_hex(3)
        self.hub = hub
        self.subnet = SUBNET.format(secrets.randbelow(256))
        self.bridge_ns = f"{PREFIX}{self.id}-br"
        self.namespaces = {host: f"{PREFIX}{self.id}-{host}" for host in hosts}
        prefix = self.subnet.rsplit(".", 1)[0]
        self.addresses = {host: f"{prefix}.{10 + i}" for i, host in enumerate(hosts)}
        self._made: list[str] = []
        self._processes: list[subprocess.Popen] = []
        self._previous_sigterm: Any = None

    # -- life cycle ------------------------------------------------------------------------

    def __enter__(self) -> Network:
        if threading.current_thread() is threading.main_thread():  # SIGTERM unwinds too
            self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        self._add_namespace(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", BRIDGE, "up")
        for i, (host, ns) in enumerate(self.namespaces.items()):
            self._add_namespace(ns)
            port = f"p{i}"
            _ip("-n", self.bridge_ns, "link", "add", port, "type", "veth",
                "peer", "name", "eth0", "netns", ns)  # fmt: skip
            _ip("-n", self.bridge_ns, "link", "set", port, "master", BRIDGE)
            _ip("-n", self.bridge_ns, "link", "set", port, "up")
            if host != self.hub:  # isolated ports reach only non-isolated ones: the hub
                _run(["bridge", "-n", self.bridge_ns, "link", "set", "dev", port,
                      "isolated", "on"])  # fmt: skip
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.addresses[host]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)

    def close(self) -> None:
        """Kill every process in our namespaces (ours, detached ones included: Flower starts
        its SuperExec in a session of its own), then delete the namespaces (and so the veths)."""
        for process in self._processes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        for name in reversed(self._made):
            self._kill_namespace_processes(name)
        for process in self._processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        for name in reversed(self._made):
            _ip("netns", "del", name, check=False)
        self._made.clear()
        self._processes.clear()
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    @staticmethod
    def _kill_namespace_processes(name: str) -> None:
        for _ in range(20):
            pids = _ip("netns", "pids", name, check=False).stdout.split()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.1)

    # -- processes -------------------------------------------------------------------------

    def command(self, host: str, argv: Sequence[str], *, hide: Sequence[Path] = ()) -> list[str]:
        """`argv` as run in `host`'s namespace, with the `hide` folders covered by an empty,
        unreadable tmpfs in a mount namespace of its own (the host's view of the disk)."""
        mounts = "".join(
            f"mount -t tmpfs -o size=16k,mode=000 fh-hidden {shlex.quote(str(path))} && "
            for path in hide
        )
        shell = ["unshare", "--mount", "--propagation", "private",
                 "sh", "-c", mounts + 'exec "$@"', "sh"]  # fmt: skip
        return ["ip", "netns", "exec", self.namespaces[host], *shell, *argv]

    def popen(
        self,
        host: str,
        argv: Sequence[str],
        *,
        log: Path,
        env: dict[str, str] | None = None,
        hide: Sequence[Path] = (),
    ) -> subprocess.Popen:
        """Start `argv` in `host`'s namespace, in a process group of its own, output to `log`."""
        with log.open("ab") as out:
            process = subprocess.Popen(
                self.command(host, argv, hide=hide),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._processes.append(process)
        return process

    def run(
        self,
        host: str,
        argv: Sequence[str],
        *,
        timeout_s: float,
        env: dict[str, str] | None = None,
        hide: Sequence[Path] = (),
    ) -> subprocess.CompletedProcess:
        """Run `argv` to its end in `host`'s namespace; its whole group is killed on timeout."""
        process = subprocess.Popen(
            self.command(host, argv, hide=hide),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._processes.append(process)
        try:
            out, _ = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, _ = process.communicate()
            raise subprocess.TimeoutExpired(process.args, timeout_s, output=out) from None
        return subprocess.CompletedProcess(process.args, process.returncode, out, "")

    def can_connect(self, host: str, address: str, port: int, timeout_s: float = 2.0) -> bool:
        """Whether a TCP connection from `host`'s namespace to `address:port` is accepted."""
        done = self.run(
            host,
            [sys.executable, "-c", CONNECT_CHECK, address, str(port), str(timeout_s)],
            timeout_s=timeout_s + 30,
        )
        return done.returncode == 0

    def listening(self, host: str) -> list[str]:
        """The TCP sockets listening in `host`'s namespace, as `address:port` (from `ss`)."""
        done = _run(["ip", "netns", "exec", self.namespaces[host], "ss", "-Hltn"])
        return sorted(line.split()[3] for line in done.stdout.splitlines() if line.strip())


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # runs every `finally` and `__exit__` on the way out


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["ip", *args], check=check)


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetnsError(f"`{shlex.join(argv)}` failed: {done.stderr.strip()}")
    return done
