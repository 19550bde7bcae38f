"""Run Flower's SuperNode the fedhe way: approved app bundles only, a short idle poll, and one
long-lived ClientApp.

    python -m fedhe.supernode --approved FILE [--poll-s 0.1] [--clientapp worker] \
        -- <flower-supernode arguments>

This process runs Flower 1.42's own `flower-supernode` entry point, with three changes:

* **Approved bundles only.** Before the SuperNode stores the app bundle (FAB) of a run it has
  not seen, its SHA-256 must be in the site's approved file (`fedhe.approval`); otherwise the
  message is answered with Flower's own FAB_VERIFICATION_ERROR reply (what Flower's
  `--trusted-entities` does, which needs a licensed SuperLink) and nothing of the run is
  stored or started. The file is read again for every new run, so approving needs no restart.
* **Short idle poll.** Flower sleeps a fixed 3 s after each pull that found no message; here
  that one sleep lasts `--poll-s`.
* **Long-lived ClientApp** (`--clientapp worker`, the default). The SuperNode runs with
  Flower's `--isolation process`; a worker thread of this process takes each task from the
  SuperNode's Runtime API, runs the *installed* `fedhe.clients.app:app` (imported once: TenSEAL
  and torch load once, and fedhe's Enc(0) pool and parsed-context cache outlive a message)
  and pushes the reply, with Flower's own client functions. The bundle's code never runs.
  `--clientapp subprocess` keeps Flower's default (a fresh `flwr-clientapp` per message).

Both changes to Flower are applied to names of `flwr.supernode.start_client_internal`; if
Flower's internals no longer look as this module expects, the launcher refuses to start
(`LauncherError`) rather than run without the check.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import os
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from fedhe.approval import ApprovalError, fab_hash, read_approved
from fedhe.errors import FedHEError

FLOWER_SERIES = "1.42."  # the internals below were read in this series (pyproject pins it)
FLOWER_IDLE_SLEEP_S = 3  # `time.sleep(3)` in start_client_internal after an empty pull
DEFAULT_POLL_S = 0.1
QUICK_BACKOFF_CAP_S = 1.0  # Flower's own cap is 10 s
CLIENT_APP = "fedhe.clients.app:app"
WORKER, SUBPROCESS = "worker", "subprocess"
_PULL_PARAMETERS = {"state", "object_store", "receive", "get_fab"}


class LauncherError(FedHEError):
    """The launcher cannot run Flower's SuperNode safely as asked (bad arguments, or Flower's
    internals changed so that the approved-bundle check could not be put in place)."""


class UnapprovedApp(FedHEError):
    """An app bundle whose hash the site did not approve (raised inside the SuperNode's pull,
    answered there with Flower's FAB_VERIFICATION_ERROR reply)."""


# -- approved bundles --------------------------------------------------------------------------


@dataclass(frozen=True)
class Approval:
    """The site's approved-apps file, read again for every check."""

    path: Path

    def check(self, content: bytes, claimed: str = "", run_id: int | None = None) -> str:
        """The bundle's hash, or UnapprovedApp. `claimed` (the hash the SuperLink named it by)
        must be that hash too: the SuperNode files the bundle under the claimed name."""
        digest = fab_hash(content)
        try:
            approved = read_approved(self.path)
        except ApprovalError as err:  # fail closed: a broken file approves nothing
            raise UnapprovedApp(f"{err} (app bundle {digest} of run {run_id} refused)") from err
        if claimed and claimed != digest:
            raise UnapprovedApp(
                f"refused app bundle of run {run_id}: the SuperLink names it {claimed} but its "
                f"content hashes to {digest}; this SuperLink is not to be trusted."
            )
        if digest not in approved:
            raise UnapprovedApp(
                f"refused app bundle {digest} of run {run_id}: it is not in the approved file "
                f"{self.path}. Review the app's code, then `fedhe deploy approve APP_DIR >> "
                f"{self.path}` (no restart needed)."
            )
        return digest


def guard_pull(original: Callable[..., int | None], approval: Approval) -> Callable[..., Any]:
    """`original` (Flower's `_pull_and_store_message`) whose `get_fab` refuses a bundle the
    site did not approve. The refusal leaves `original` before the run, its context or the
    bundle are stored; the pulled message then gets Flower's FAB_VERIFICATION_ERROR reply, as
    Flower's trusted-entities check does, so the aggregator sees an error reply at once."""
    from flwr.supercore import log

    flower = importlib.import_module("flwr.supernode.start_client_internal")
    signature = inspect.signature(original)

    def guarded(*args: Any, **kwargs: Any) -> int | None:
        bound = signature.bind(*args, **kwargs)
        receive, get_fab = bound.arguments["receive"], bound.arguments["get_fab"]
        pulled = []

        def recording_receive():
            received = receive()
            if received is not None:
                pulled.append(received[0])
            return received

        def approved_get_fab(claimed: str, run_id: int):
            fab = get_fab(claimed, run_id)
            approval.check(fab.content, claimed=claimed, run_id=run_id)
            if fab.hash_str != claimed:
                raise UnapprovedApp(
                    f"refused app bundle of run {run_id}: sent as {fab.hash_str}, asked for "
                    f"{claimed}."
                )
            return fab

        bound.arguments["receive"] = recording_receive
        bound.arguments["get_fab"] = approved_get_fab
        try:
            return original(*bound.args, **bound.kwargs)
        except UnapprovedApp as refused:
            log(ERROR, "fedhe: %s", refused)
            message = pulled[-1]
            reply = flower.Message(flower.FAB_VERIFICATION_ERROR, reply_to=message)
            flower._insert_message(reply, bound.arguments["state"], bound.arguments["object_store"])
            return message.metadata.run_id

    guarded.__wrapped__ = original  # type: ignore[attr-defined]
    return guarded


# -- the idle poll -----------------------------------------------------------------------------


class ShortIdleTime(types.SimpleNamespace):
    """Stands for the `time` module inside start_client_internal only: its sleeps (the fixed
    3 s idle sleep after an empty pull, the 0.5 s waits for the ClientApp's reply and its
    objects) last at most `poll_s`; every other function is the real one."""

    def __init__(self, poll_s: float) -> None:
        super().__init__(poll_s=poll_s)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.poll_s))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


# -- installing both into Flower, failing closed -----------------------------------------------


def install(approval: Approval, poll_s: float) -> None:
    """Put the approved-bundle check and the short poll into Flower's SuperNode loop, or raise
    LauncherError naming what changed in Flower (the SuperNode then does not start)."""
    flower = _flower_module()
    flower._pull_and_store_message = guard_pull(flower._pull_and_store_message, approval)
    flower.time = ShortIdleTime(poll_s)
    flower.pull_objects = quick_retries(flower.pull_objects, poll_s)


def quick_retries(pull: Any, poll_s: float) -> Any:
    """Flower's object pull (`pull_objects`, `pull_and_inflate_object_from_tree`) with its
    retry backoff starting at `poll_s` instead of 1 s. A ClientApp asks for a message's objects
    as soon as its task exists, while the SuperNode is still fetching them from the SuperLink:
    the first try finds them missing, and Flower's 1 s backoff added about a second to every
    message a site served."""
    return functools.partial(pull, initial_backoff=poll_s, backoff_cap=QUICK_BACKOFF_CAP_S)


def _flower_module() -> types.ModuleType:
    """Flower's SuperNode loop module, checked to be the one this launcher was written for."""
    import flwr

    version = getattr(flwr, "__version__", "?")
    if not version.startswith(FLOWER_SERIES):
        raise LauncherError(
            f"fedhe.supernode was written for flwr {FLOWER_SERIES}x, found {version}: install "
            "the flwr version fedhe's pyproject pins (the approved-bundle check relies on it)."
        )
    try:
        # modules by full name: flwr.supernode.cli's package re-exports a function of that name
        flower = importlib.import_module("flwr.supernode.start_client_internal")
        cli = importlib.import_module("flwr.supernode.cli.flower_supernode")
        pull = flower._pull_and_store_message
        parameters = set(inspect.signature(pull).parameters)
        loop = inspect.getsource(flower.start_client_internal)
        checks = {
            f"_pull_and_store_message takes {sorted(_PULL_PARAMETERS)}": parameters
            >= _PULL_PARAMETERS,
            "_insert_message exists": callable(flower._insert_message),
            "FAB_VERIFICATION_ERROR exists": flower.FAB_VERIFICATION_ERROR is not None,
            "the loop calls _pull_and_store_message": "_pull_and_store_message(" in loop,
            "the idle sleep is time.sleep(3)": "time.sleep(3)" in loop,
            "the loop module uses the time module": flower.time is time,
            "flower-supernode runs that loop": cli.start_client_internal
            is flower.start_client_internal,
            "the check is not in yet": getattr(pull, "__wrapped__", None) is None,
            "pull_objects retries with a backoff": "initial_backoff"
            in inspect.signature(flower.pull_objects).parameters,
        }
        problems = [f"expected: {what}" for what, holds in checks.items() if not holds]
    except (ImportError, AttributeError, OSError, TypeError, ValueError) as err:
        problems = [f"{type(err).__name__}: {err}"]
    if problems:
        raise LauncherError(
            f"Flower {version}'s SuperNode internals are not what fedhe.supernode expects "
            f"({'; '.join(problems)}); the approved-bundle check cannot be put in place, so "
            "the SuperNode is not started. Install the flwr version fedhe's pyproject pins."
        )
    return flower


# -- the long-lived ClientApp ------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeApi:
    """Where the SuperNode serves its Runtime API (flower-supernode's --host/--port/TLS)."""

    address: str
    certificates: bytes | None  # None: plain HTTP on the site's own host

    @classmethod
    def from_flower_args(cls, flower_args: Sequence[str]) -> RuntimeApi:
        from flwr.supercore.constant import SUPERNODE_UVICORN_DEFAULT_PORT, UVICORN_DEFAULT_HOST

        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--host", default=UVICORN_DEFAULT_HOST)
        parser.add_argument("--port", type=int, default=SUPERNODE_UVICORN_DEFAULT_PORT)
        parser.add_argument("--ssl-ca-certfile", default=None)
        known, _ = parser.parse_known_args(list(flower_args))
        host = "127.0.0.1" if known.host in ("0.0.0.0", "") else known.host
        host = f"[{host}]" if ":" in host else host
        certificates = (
            Path(known.ssl_ca_certfile).expanduser().read_bytes() if known.ssl_ca_certfile else None
        )
        return cls(f"{host}:{known.port}", certificates)

    def client(self, *interceptors: Any):
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=self.certificates is None,
            root_certificates=self.certificates,
            interceptors=list(interceptors),
            retry_invoker=make_simple_http_retry_invoker(),
        )


class Worker:
    """Serves the SuperNode's ClientApp tasks one after the other in this process, as
    `flwr-clientapp` does for one task (flwr.supernode.runtime.run_clientapp), without exiting."""

    def __init__(self, api: RuntimeApi, approval: Approval, client_app: Any, poll_s: float):
        try:  # Flower's own client functions, checked before the SuperNode starts
            from flwr.proto.runtime_pb2 import AcquireTaskRequest  # noqa: F401
            from flwr.supernode.runtime.run_clientapp import (  # noqa: F401
                pull_task_input,
                push_message,
                push_task_output,
            )
        except ImportError as err:
            raise LauncherError(
                f"Flower's ClientApp runtime changed ({err}); use --clientapp subprocess, or "
                "install the flwr version fedhe's pyproject pins."
            ) from err
        self.api, self.approval, self.client_app, self.poll_s = api, approval, client_app, poll_s
        self.served = 0
        runtime = importlib.import_module("flwr.supernode.runtime.run_clientapp")
        runtime.pull_and_inflate_object_from_tree = quick_retries(
            runtime.pull_and_inflate_object_from_tree, poll_s
        )

    def serve_forever(self) -> None:
        """Acquire and run tasks; if this loop itself breaks, stop the whole SuperNode (a
        SuperNode whose tasks nobody takes would look alive and answer nothing)."""
        from flwr.supercore import log

        try:
            self._loop()
        except BaseException as err:
            log(ERROR, "fedhe: the ClientApp worker stopped (%r); stopping the SuperNode.", err)
            os.kill(os.getpid(), signal.SIGTERM)
            raise

    def _loop(self) -> None:
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore import log
        from flwr.supercore.constant import TaskType
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        acquirer = self.api.client(RuntimeVersionHttpInterceptor(component_name="SuperExec"))
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        unreachable_since = None
        while True:
            try:
                acquired = acquirer.AcquireTask(request)
                unreachable_since = None
            except httpx.TransportError as err:  # the Runtime API is starting (or stopping)
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > 30:
                    log(WARNING, "fedhe: Runtime API %s unreachable: %s", self.api.address, err)
                    unreachable_since = now
                time.sleep(self.poll_s)
                continue
            if acquired.HasField("task") and acquired.token:
                self.run_task(acquired.token)
            else:
                time.sleep(self.poll_s)

    def run_task(self, token: str) -> None:
        """One task: Flower's pull_task_input, the ClientApp, push_message, push_task_output."""
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore import log
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supernode.runtime.run_clientapp import (
            pull_task_input,
            push_message,
            push_task_output,
        )

        client = self.api.client(
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = reply = context = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        started = time.monotonic()
        try:
            message, context, run, fab = pull_task_input(client)
            self.approval.check(fab.content, claimed=fab.hash_str, run_id=run.run_id)
            reply = self.client_app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as err:
            refused = isinstance(err, UnapprovedApp)
            if refused:
                log(ERROR, "fedhe: %s", err)
            else:
                log(ERROR, "ClientApp raised an exception", exc_info=err)
            code = ErrorCode.INVALID_FAB if refused else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            details = f"{type(err)}:<'{err}'>"
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                push_task_output(client, context, status, details)
            finally:
                heartbeat.stop()
                client.close()
        self.served += 1
        kind = message.metadata.message_type if message is not None else "no message"
        log(INFO, "fedhe: ClientApp served %s in %.2f s", kind, time.monotonic() - started)


def load_client_app() -> Any:
    """fedhe's installed ClientApp (never the bundle's copy), imported once."""
    from flwr.clientapp import ClientApp

    module, _, name = CLIENT_APP.partition(":")
    app = getattr(__import__(module, fromlist=[name]), name)
    if not isinstance(app, ClientApp):
        raise LauncherError(f"{CLIENT_APP} is not a Flower ClientApp; reinstall fedhe.")
    return app


# -- command line ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    approved: Path
    poll_s: float
    clientapp: str
    flower_args: list[str]


def parse(argv: Sequence[str]) -> Options:
    """`--approved FILE [--poll-s S] [--clientapp MODE] -- <flower-supernode arguments>`."""
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        prog="python -m fedhe.supernode",
        description="Flower's SuperNode running only approved fedhe app bundles.",
    )
    parser.add_argument("--approved", required=True, type=Path, help="approved-apps file")
    parser.add_argument("--poll-s", type=float, default=DEFAULT_POLL_S, help="idle poll (s)")
    parser.add_argument("--clientapp", choices=(WORKER, SUBPROCESS), default=WORKER)
    args = parser.parse_args(argv[:cut])
    if not 0.01 <= args.poll_s <= FLOWER_IDLE_SLEEP_S:
        raise LauncherError(f"--poll-s {args.poll_s}: give 0.01 to {FLOWER_IDLE_SLEEP_S} s.")
    flower_args = argv[cut + 1 :]
    if args.clientapp == WORKER and any(a.split("=")[0] == "--isolation" for a in flower_args):
        raise LauncherError(
            "--isolation is set by the launcher with --clientapp worker (Flower's `process`); "
            "remove it, or use --clientapp subprocess."
        )
    return Options(args.approved, args.poll_s, args.clientapp, flower_args)


def launcher_command(approved: str | Path, poll_s: float = DEFAULT_POLL_S) -> list[str]:
    """The argv that starts this launcher; Flower's `flower-supernode` arguments follow it."""
    return [
        sys.executable, "-m", "fedhe.supernode",
        "--approved", str(Path(approved).expanduser().resolve()),
        "--poll-s", str(poll_s),
        "--",
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    try:
        options = parse(sys.argv[1:] if argv is None else argv)
        approval = Approval(options.approved)
        read_approved(approval.path)  # refuse to start on a missing or malformed file
        install(approval, options.poll_s)
        flower_args = list(options.flower_args)
        worker = None
        if options.clientapp == WORKER:
            worker = Worker(
                RuntimeApi.from_flower_args(flower_args), approval, load_client_app(),
                options.poll_s,
            )  # fmt: skip
            flower_args += ["--isolation", "process"]
        else:  # Flower's SuperExec polls for tasks every second unless told otherwise
            os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(options.poll_s))
    except FedHEError as err:
        print(f"fedhe.supernode: {err}", file=sys.stderr)
        return 2
    from flwr.supercore import log

    flower_supernode = importlib.import_module("flwr.supernode.cli.flower_supernode")

    log(INFO, "fedhe: approved apps from %s, idle poll %.2f s, ClientApp: %s",
        options.approved, options.poll_s, options.clientapp)  # fmt: skip
    if worker is not None:
        threading.Thread(target=worker.serve_forever, name="fedhe-clientapp", daemon=True).start()
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode.flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
