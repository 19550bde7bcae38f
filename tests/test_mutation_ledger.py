"""The key holder's ledger: what a file without some fields means, and its refusal wording
(mutation testing of fedhe/keyholder/ledger.py)."""

import json
import re

import pytest

from fedhe.errors import PolicyError
from fedhe.keyholder.ledger import Ledger


def test_a_ledger_file_without_fields_is_an_open_job_with_nothing_spent(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text("{}")
    ledger = Ledger.load(path)
    assert (ledger.released, ledger.refusals, ledger.stopped) == ({}, 0, False)
    ledger.check_open("j")
    assert ledger.spent("sum") == 0 and ledger.released_digest("sum", 0) is None


def test_the_ledger_round_trips_and_stops_a_job_at_its_refusal_budget(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = Ledger.load(path)
    ledger.record_release("sum", 1, "d1")
    ledger.record_refusal(2)
    assert not ledger.stopped
    ledger.record_refusal(2)
    assert json.loads(path.read_text()) == {
        "released": {"sum": {"1": "d1"}},
        "refusals": 2,
        "stopped": True,
    }
    assert path.stat().st_mode & 0o777 == 0o600 and sorted(tmp_path.iterdir()) == [path]
    again = Ledger.load(path)
    assert (again.released_digest("sum", 1), again.spent("sum"), again.refusals) == ("d1", 1, 2)
    message = "job 'j' was stopped after 2 refused requests; declare a new job."
    with pytest.raises(PolicyError, match=f"^{re.escape(message)}$"):
        again.check_open("j")
