"""fedhe.supernode and fedhe.approval: a site runs only the app bundles it approved, polls
fast, and serves its ClientApp from one long-lived process.

Unit tests run Flower's own `_pull_and_store_message` behind the guard with a fake bundle; the
slow tests start real SuperLink/SuperNode processes (tests/test_deploy.py's Deployment) and ship
a tampered copy of this repository with `flwr run`.
"""

from __future__ import annotations

import time
import types
from pathlib import Path

import pytest
from flwr.app import Message, Metadata, RecordDict
from flwr.common.constant import ErrorCode
from flwr.proto.message_pb2 import ObjectTree
from flwr.supercore.fab import Fab
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supernode import start_client_internal as flower
from flwr.supernode.nodestate import NodeStateFactory

from fedhe import deploy, supernode
from fedhe.approval import (
    ApprovalError,
    app_hash,
    approval_line,
    bundle_files,
    fab_hash,
    read_approved,
)
from fedhe.deploy_cli import register

RUN_ID = 7
HASH_A, HASH_B = "a" * 64, "0123456789abcdef" * 4


# -- the approved file -------------------------------------------------------------------------


def test_the_approved_file_takes_hashes_notes_and_comments(tmp_path):
    path = tmp_path / "approved"
    path.write_text(f"# reviewed by the site\n\n{HASH_A}  /srv/fedhe  # v0.1\n  {HASH_B}\n")
    assert read_approved(path) == {HASH_A, HASH_B}


@pytest.mark.parametrize(
    "line",
    ["a" * 63, "A" * 64, "sha256:" + HASH_A, "/srv/fedhe " + HASH_A, HASH_A + "0", "yes"],
)
def test_a_line_that_is_not_a_hash_is_refused_naming_the_line(tmp_path, line):
    path = tmp_path / "approved"
    path.write_text(f"{HASH_A}\n{line}\n")
    with pytest.raises(ApprovalError, match=r"approved:2: .*`fedhe deploy approve APP_DIR`"):
        read_approved(path)


def test_a_missing_or_empty_approved_file_is_refused(tmp_path):
    with pytest.raises(ApprovalError, match=r"cannot read .*`fedhe deploy approve"):
        read_approved(tmp_path / "nothing")
    (tmp_path / "empty").write_text("# nothing reviewed yet\n")
    with pytest.raises(ApprovalError, match="approves no app"):
        read_approved(tmp_path / "empty")


# -- the bundle hash ---------------------------------------------------------------------------


def _small_app(folder: Path) -> Path:
    (folder / "pkg").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(
        '[project]\nname = "smallapp"\nversion = "1.0.0"\n\n'
        '[tool.flwr.app]\npublisher = "fedhe"\n\n[tool.flwr.app.components]\n'
        'serverapp = "pkg.server:app"\nclientapp = "pkg.client:app"\n\n'
        "[tool.flwr.app.config]\nx = 1\n"
    )
    (folder / "pkg" / "__init__.py").write_text("")
    (folder / "pkg" / "client.py").write_text("app = None\n")
    (folder / "pkg" / "server.py").write_text("app = None\n")
    return folder


def test_a_bundle_hash_is_stable_and_changes_with_any_file(tmp_path):
    app = _small_app(tmp_path / "smallapp")
    first = app_hash(app)
    assert app_hash(app) == first  # a second build of the unchanged folder
    assert approval_line(app) == f"{first}  {app.resolve()}"
    for edit in ("pkg/client.py", "pkg/server.py", "pyproject.toml"):
        original = (app / edit).read_text()
        (app / edit).write_text(original.replace("1", "2") + "# changed\n")
        assert app_hash(app) != first, edit
        (app / edit).write_text(original)
        assert app_hash(app) == first
    (app / "pkg" / "extra.py").write_text("")  # a new file changes it too
    assert app_hash(app) != first


def test_approve_refuses_a_folder_that_is_no_flower_app(tmp_path):
    with pytest.raises(ApprovalError, match=r"no pyproject\.toml"):
        app_hash(tmp_path)


# -- the guard inside Flower's pull ------------------------------------------------------------


def _received(run_id: int = RUN_ID) -> Message:
    metadata = Metadata(
        run_id=run_id, message_id="", src_node_id=1, dst_node_id=2, reply_to_message_id="",
        group_id="", created_at=time.time(), ttl=3600, message_type="query.whoami",
    )  # fmt: skip
    message = Message(metadata=metadata, content=RecordDict())
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def _pull(approved: Path, content: bytes, claimed: str | None = None):
    """Flower's own `_pull_and_store_message`, guarded, pulling one message of a new run whose
    bundle is `content` (named `claimed` by the SuperLink)."""
    claimed = fab_hash(content) if claimed is None else claimed
    stores = ObjectStoreFactory()
    state, store = NodeStateFactory(objectstore_factory=stores).state(), stores.store()
    state.set_node_id(2)
    asked = []

    def get_fab(fab_hash_str: str, run_id: int) -> Fab:
        asked.append(fab_hash_str)
        return Fab(claimed, content, {})

    guarded = supernode.guard_pull(flower._pull_and_store_message, supernode.Approval(approved))
    run_id = guarded(
        state=state, object_store=store, node_config={},
        receive=lambda: (_received(), ObjectTree()),
        get_run=lambda run_id: types.SimpleNamespace(fab_hash=claimed),
        get_fab=get_fab, pull_object=None, confirm_message_received=None,
        trusted_entities=None,
    )  # fmt: skip
    return run_id, state, asked


def _error_replies(state) -> list[Message]:
    return [m for m in state.get_messages_legacy(is_reply=True) if m.has_error()]


def test_a_bundle_not_in_the_approved_file_gets_flowers_verification_error(tmp_path, caplog):
    approved = tmp_path / "approved"
    approved.write_text(HASH_A + "\n")
    tampered = b"a tampered bundle"
    run_id, state, asked = _pull(approved, tampered)
    assert run_id == RUN_ID and asked == [fab_hash(tampered)]
    (reply,) = _error_replies(state)
    assert reply.error.code == ErrorCode.INVALID_FAB
    assert state.get_run(RUN_ID) is None  # neither run, context nor bundle kept: never started
    assert state.get_fab(fab_hash(tampered)) is None
    assert state.get_run_series_context(0) is None
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert fab_hash(tampered) in line and str(approved) in line
    assert f"fedhe deploy approve APP_DIR >> {approved}" in line


def test_a_superlink_naming_a_bundle_by_an_approved_hash_it_does_not_have_is_refused(tmp_path):
    approved = tmp_path / "approved"
    approved.write_text(HASH_A + "\n")
    _, state, _ = _pull(approved, b"other content", claimed=HASH_A)
    assert [m.error.code for m in _error_replies(state)] == [ErrorCode.INVALID_FAB]


def test_a_broken_approved_file_refuses_every_bundle(tmp_path):
    content = b"a bundle the site had approved"
    approved = tmp_path / "approved"
    approved.write_text(f"{fab_hash(content)}\nnot a hash\n")
    _, state, _ = _pull(approved, content)
    assert [m.error.code for m in _error_replies(state)] == [ErrorCode.INVALID_FAB]


def test_an_approved_bundle_passes_to_flower_unchanged(tmp_path):
    content = b"the reviewed bundle"
    approved = tmp_path / "approved"
    approved.write_text(fab_hash(content) + "  reviewed\n")
    fab = Fab(fab_hash(content), content, {})
    seen = []

    def original(state, object_store, receive, get_fab):
        seen.append(get_fab(fab.hash_str, RUN_ID))
        return RUN_ID

    guarded = supernode.guard_pull(original, supernode.Approval(approved))
    assert guarded(None, None, receive=lambda: None, get_fab=lambda h, r: fab) == RUN_ID
    assert seen == [fab]


# -- putting it into Flower, failing closed -------------------------------------------------


@pytest.fixture
def flower_restored(monkeypatch):
    """Flower's module as it was, after the test (install() changes it)."""
    monkeypatch.setattr(flower, "_pull_and_store_message", flower._pull_and_store_message)
    monkeypatch.setattr(flower, "time", flower.time)
    return monkeypatch


def test_install_guards_the_pull_and_shortens_only_the_idle_sleep(tmp_path, flower_restored):
    original = flower._pull_and_store_message
    supernode.install(supernode.Approval(tmp_path / "approved"), poll_s=0.05)
    assert flower._pull_and_store_message.__wrapped__ is original
    started = time.monotonic()
    flower.time.sleep(3)  # Flower's idle sleep
    assert time.monotonic() - started < 1
    assert flower.time.monotonic is time.monotonic
    with pytest.raises(supernode.LauncherError, match="the check is not in yet"):
        supernode.install(supernode.Approval(tmp_path / "approved"), poll_s=0.05)


def test_install_refuses_when_the_pull_is_gone(tmp_path, flower_restored):
    flower_restored.delattr(flower, "_pull_and_store_message")
    with pytest.raises(supernode.LauncherError, match="cannot be put in place"):
        supernode.install(supernode.Approval(tmp_path / "approved"), poll_s=0.1)


def test_install_refuses_when_the_pull_changed_its_parameters(tmp_path, flower_restored):
    flower_restored.setattr(flower, "_pull_and_store_message", lambda state, receive: None)
    with pytest.raises(supernode.LauncherError, match="_pull_and_store_message takes"):
        supernode.install(supernode.Approval(tmp_path / "approved"), poll_s=0.1)
    assert not hasattr(flower._pull_and_store_message, "__wrapped__")  # nothing half-done


def test_install_refuses_when_the_loop_no_longer_calls_it(tmp_path, flower_restored):
    def start_client_internal(**_kwargs):
        time.sleep(3)

    flower_restored.setattr(flower, "start_client_internal", start_client_internal)
    with pytest.raises(supernode.LauncherError, match="the loop calls _pull_and_store_message"):
        supernode.install(supernode.Approval(tmp_path / "approved"), poll_s=0.1)


def test_install_refuses_another_flower_series(tmp_path, flower_restored):
    import flwr

    flower_restored.setattr(flwr, "__version__", "1.43.0")
    with pytest.raises(supernode.LauncherError, match=r"written for flwr 1\.42"):
        supernode.install(supernode.Approval(tmp_path / "approved"), poll_s=0.1)


# -- command lines -----------------------------------------------------------------------------


def test_the_launcher_splits_its_options_from_flowers():
    options = supernode.parse(["--approved", "a.txt", "--", "--superlink", "h:1", "--port", "9"])
    assert options.flower_args == ["--superlink", "h:1", "--port", "9"]
    assert options.clientapp == supernode.WORKER and options.poll_s == supernode.DEFAULT_POLL_S
    api = supernode.RuntimeApi.from_flower_args(options.flower_args)
    assert api == supernode.RuntimeApi("127.0.0.1:9", None)
    with pytest.raises(supernode.LauncherError, match="--isolation is set by the launcher"):
        supernode.parse(["--approved", "a", "--", "--isolation", "subprocess"])
    with pytest.raises(supernode.LauncherError, match="--poll-s"):
        supernode.parse(["--approved", "a", "--poll-s", "0", "--"])
    with pytest.raises(SystemExit):
        supernode.parse(["--", "--port", "9"])  # no --approved


def test_the_launcher_does_not_start_without_a_usable_approved_file(tmp_path, capsys):
    assert supernode.main(["--approved", str(tmp_path / "none"), "--", "--port", "9"]) == 2
    assert "fedhe deploy approve APP_DIR" in capsys.readouterr().err


def test_a_site_command_needs_an_approved_file_and_runs_the_launcher(tmp_path):
    sites = {"hospital-a": "party", "keyholder": "keyholder"}
    coordinator = deploy.init_federation(tmp_path / "fed", sites)
    federation = coordinator.for_site("hospital-a", tmp_path / "site")
    with pytest.raises(deploy.DeployError, match=r"--approved FILE.*fedhe deploy approve"):
        deploy.site_command(federation, "hospital-a", port=9101)
    approved = tmp_path / "approved.txt"
    command = deploy.site_command(federation, "hospital-a", port=9101, approved=str(approved))
    cut = command.index("--")
    assert command[1:3] == ["-m", "fedhe.supernode"]
    assert command[command.index("--approved") + 1] == str(approved.resolve())
    assert command[cut + 1 :][:2] == ["--superlink", federation.address]


# -- real processes ----------------------------------------------------------------------------


def tampered_copy(app: Path, folder: Path, marker: Path) -> Path:
    """The bundle of `app`, with clients/keyholder.py writing `marker` as soon as it runs."""
    copy = bundle_files(app, folder / "fedhe")
    keyholder = copy / "clients" / "keyholder.py"
    source = keyholder.read_text()
    header, _, body = source.partition("from __future__ import annotations\n")
    keyholder.write_text(
        f"{header}from __future__ import annotations\n"
        f"open({str(marker)!r}, 'w').write('tampered code ran')\n{body}"
    )
    return copy


@pytest.mark.slow
def test_a_tampered_bundle_is_refused_and_the_approved_one_runs(tmp_path_factory, tmp_path):
    """The coordinator ships this repository with one line added to the key holder's code:
    every site refuses it before any of its code runs (the key holder's log names the bundle's
    hash), the job fails; the approved bundle then runs linreg on the same deployment."""
    import subprocess

    from tests.test_deploy import Deployment

    folder = tmp_path_factory.mktemp("approval")
    running = Deployment(folder / "fed")
    marker = tmp_path / "marker"
    tampered = tampered_copy(running.app, tmp_path / "tampered", marker)
    received = app_hash(tampered)
    assert received not in read_approved(running.approved)
    try:
        running.start("superlink", deploy.superlink_command(running.federation))
        assert register(running.federation, running.env, timeout_s=90) == 0
        running.start_site("keyholder", data_path=str(folder / "keyholder-data"))
        for name in ("hospital-a", "hospital-b", "hospital-c"):
            running.start_site(name)
        out = tmp_path / "tampered-run"
        settings = "task='linreg' parties=3 min-parties=2 plaintext-twin=false timeout-s=60"
        command = deploy.run_command(tampered, f"{settings} out='{out}'")
        with (running.logs / "run-tampered.log").open("wb") as log:
            subprocess.run(command, env=running.env, stdout=log, stderr=subprocess.STDOUT,
                           timeout=400)  # fmt: skip
        refusal = [
            line
            for line in (running.logs / "keyholder.log").read_text().splitlines()
            if "ERROR" in line and "refused app bundle" in line
        ]
        assert refusal and received in refusal[0] and str(running.approved) in refusal[0]
        assert "fedhe deploy approve APP_DIR" in refusal[0]
        assert not (out / "result.json").exists()
        run_log = (running.logs / "run-tampered.log").read_text()
        # the ServerApp finds no key holder willing to run it and stops with an error
        assert "Exit Code: 201" in run_log and "key holder" in run_log, run_log[-2000:]
        result = running.run(tmp_path / "approved-run", settings)
        assert len(result["coefficients"]["encrypted"]) > 1
        assert not marker.exists()  # the tampered code never ran, at any site
        site_log = (running.logs / "keyholder.log").read_text()  # one long-lived ClientApp
        assert "fedhe: ClientApp served query.decrypt" in site_log
        assert "Start `flwr-clientapp` process" not in site_log
    finally:
        running.stop_all()
