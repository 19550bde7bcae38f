"""Every field of the audit log's records and of `verify_log`'s answers, pinned down exactly
(mutation testing: a wrong count, hash or message in an answer would otherwise pass)."""

import json
import re

import pytest

from fedhe.errors import ProtocolError
from fedhe.keyholder.audit import GENESIS, AuditLog, Verification, verify_log


def _log(path, n=3):
    log = AuditLog(path)
    records = [log.append(job="j" if i % 2 == 0 else "k", event="decrypt", n=i) for i in range(n)]
    return log, records


def _lines(path):
    return path.read_text().splitlines()


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_a_record_is_one_canonical_json_line_with_a_utc_millisecond_time(tmp_path):
    log, records = _log(tmp_path / "a.jsonl")
    for line, record in zip(_lines(log.path), records, strict=True):
        assert line == json.dumps(record, sort_keys=True)  # sorted keys: one byte string per record
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", record["time"])


def test_job_entries_are_one_jobs_records_and_need_a_job_id(tmp_path):
    log, records = _log(tmp_path / "a.jsonl", 4)
    assert log.job_entries("k") == [records[1], records[3]]
    assert log.entries() == records
    for bad in ("", None):
        with pytest.raises(ProtocolError, match=f"got job id {bad!r}: name the job"):
            log.job_entries(bad)


def test_appending_to_an_empty_log_file_starts_the_chain(tmp_path):
    path = tmp_path / "a.jsonl"
    path.touch()
    assert AuditLog(path).append(event="declare")["prev"] == GENESIS


def test_the_last_hash_is_found_when_the_backward_read_stops_one_byte_from_the_start(tmp_path):
    """The log is read backwards in 4096-byte steps: a first line of 4097 bytes (newline
    included) leaves exactly one byte for a second step, which must still be read."""
    path = tmp_path / "a.jsonl"
    log = AuditLog(path)
    length = len(json.dumps(log.append(pad=""), sort_keys=True)) + 1
    path.unlink()
    first = log.append(pad="x" * (4097 - length))
    assert path.stat().st_size == 4097
    assert log.append(event="next")["prev"] == first["hash"]
    assert verify_log(path) == Verification(True, 2, "", log.entries()[-1]["hash"])


def test_an_intact_log_reports_its_count_and_last_hash(tmp_path):
    log, records = _log(tmp_path / "a.jsonl")
    lines = _lines(log.path)
    _write(log.path, [lines[0], "", "  ", *lines[1:]])  # blank lines are skipped, not the end
    assert verify_log(log.path) == Verification(True, 3, "", records[-1]["hash"])


def test_an_unreadable_log_is_reported_with_nothing_verified(tmp_path):
    missing = tmp_path / "missing.jsonl"
    result = verify_log(missing)
    assert (result.ok, result.records, result.last_hash) == (False, 0, GENESIS)
    assert result.problem.startswith(f"cannot read {missing}: ")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe")
    assert verify_log(binary).problem.startswith(f"cannot read {binary}: ")


@pytest.mark.parametrize(
    ("replacement", "problem"),
    [
        ("not json", r"line 2 is not JSON: .+"),
        ("[1, 2]", r"line 2 is not a record"),
        (None, r"line 2 does not follow line 1: a record was removed, inserted or reordered"),
        ("edit", r"line 2 was modified after it was written"),
    ],
    ids=["not-json", "not-a-record", "chain-broken", "edited"],
)
def test_a_bad_line_is_reported_with_the_records_verified_before_it(tmp_path, replacement, problem):
    log, records = _log(tmp_path / "a.jsonl")
    lines = _lines(log.path)
    if replacement is None:
        lines = [lines[0], lines[2]]
    elif replacement == "edit":
        lines[1] = lines[1].replace('"n": 1', '"n": 9')
    else:
        lines[1] = replacement
    _write(log.path, lines)
    result = verify_log(log.path)
    assert (result.ok, result.records, result.last_hash) == (False, 1, records[0]["hash"])
    assert re.fullmatch(problem, result.problem), result.problem


def test_a_log_in_a_folder_that_does_not_exist_yet_creates_it(tmp_path):
    log = AuditLog(tmp_path / "state" / "logs" / "audit.jsonl")
    assert log.path.parent.is_dir()
    log.append(event="declare")
    assert verify_log(log.path).records == 1
