"""The key holder's audit log is hash-chained; `fedhe audit verify` finds any edit."""

import json

import pytest

from fedhe.cli import main
from fedhe.keyholder.audit import GENESIS, AuditLog, verify_log


@pytest.fixture
def log_path(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(5):
        log.append(job="j", event="decrypt", output="update_sum", parties=["a", "b"], n=i)
    return log.path


def _rewrite(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_an_untouched_log_verifies(log_path, capsys):
    result = verify_log(log_path)
    assert result.ok and result.records == 5
    first = json.loads(log_path.read_text().splitlines()[0])
    assert first["prev"] == GENESIS
    assert main(["audit", "verify", str(log_path)]) == 0
    assert "5 records, hash chain intact" in capsys.readouterr().out


@pytest.mark.parametrize(
    "tamper, line",
    [
        (lambda lines: [lines[0], lines[1].replace('"n": 1', '"n": 7'), *lines[2:]], 2),
        (lambda lines: [lines[0], *lines[2:]], 2),
        (lambda lines: [lines[1], lines[0], *lines[2:]], 1),
        (lambda lines: [*lines[:3], lines[2], *lines[3:]], 4),
        (lambda lines: [*lines[:4], lines[4][:-5]], 5),
    ],
    ids=["edited", "deleted", "reordered", "duplicated", "truncated"],
)
def test_tampering_is_found_with_its_line(log_path, tamper, line, capsys):
    _rewrite(log_path, tamper(log_path.read_text().splitlines()))
    result = verify_log(log_path)
    assert not result.ok and f"line {line}" in result.problem
    assert main(["audit", "verify", str(log_path)]) == 1
    assert "TAMPERED" in capsys.readouterr().err


def test_recomputed_hash_on_an_edited_record_still_breaks_the_chain(log_path):
    from fedhe.keyholder.audit import record_hash

    lines = log_path.read_text().splitlines()
    record = json.loads(lines[2])
    record["parties"] = ["a", "b", "c"]
    record["hash"] = record_hash(record)
    lines[2] = json.dumps(record, sort_keys=True)
    _rewrite(log_path, lines)
    assert "line 4 does not follow" in verify_log(log_path).problem


def test_appends_continue_the_chain_across_restarts(tmp_path):
    first = AuditLog(tmp_path / "a.jsonl")
    first.append(event="declare")
    AuditLog(tmp_path / "a.jsonl").append(event="decrypt")
    assert verify_log(tmp_path / "a.jsonl").records == 2


def test_a_run_folders_excerpt_verifies_as_a_segment(tmp_path):
    log = AuditLog(tmp_path / "kh.jsonl")
    for job in ("a", "b", "a", "b"):
        log.append(job=job, event="decrypt")
    excerpt = tmp_path / "run.jsonl"
    _rewrite(excerpt, [json.dumps(e, sort_keys=True) for e in log.entries("a")])
    assert not verify_log(excerpt).ok
    assert verify_log(excerpt, segment=True).ok
    lines = excerpt.read_text().splitlines()
    _rewrite(excerpt, [lines[0].replace('"decrypt"', '"declare"'), lines[1]])
    assert not verify_log(excerpt, segment=True).ok


def test_a_deleted_record_cannot_be_hidden_by_relinking_the_next_one(log_path):
    """`prev` is part of each record's hash: pointing the record after a deleted one at the
    deleted one's predecessor changes that record, so its own hash no longer matches."""
    lines = log_path.read_text().splitlines()
    relinked = json.loads(lines[2])
    relinked["prev"] = json.loads(lines[0])["hash"]
    _rewrite(log_path, [lines[0], json.dumps(relinked, sort_keys=True), *lines[3:]])
    result = verify_log(log_path)
    assert not result.ok and result.records == 1
    assert result.problem == "line 2 was modified after it was written"
