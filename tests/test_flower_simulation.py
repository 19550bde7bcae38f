"""End to end through Flower's simulation engine (Ray): 5 parties + 1 key holder."""

import json

import pytest

from fedhe.cli import main


@pytest.mark.slow
def test_simulated_federation_matches_the_plaintext_twin(tmp_path):
    out = tmp_path / "run"
    code = main(
        [
            "simulate",
            "aggregate",
            "--parties",
            "5",
            "--min-parties",
            "3",
            "--rounds",
            "2",
            "--out",
            str(out),
            "--drop-party",
            "2",
        ]
    )
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    he, plain = result["encrypted"], result["plaintext"]
    assert result["task"] == "aggregate" and result["parties"]["registered"] == 5
    assert he["accuracy"] == pytest.approx(plain["accuracy"], abs=0.01)
    assert he["loss"] == pytest.approx(plain["loss"], abs=1e-3)
    agreement = result["agreement"]
    # Quantized lanes round each party's update to a step; training may amplify that a little.
    assert 0 < agreement["quantization_bound"] < 1e-3
    assert agreement["max_abs_weight_diff"] < 1e-5 + 2 * agreement["quantization_bound"]
    assert he["accuracy"] > 0.85
    updates = [d for d in result["decryptions"] if d["output"] == "update_sum"]
    assert len(updates) == 2
    assert all(d["parties"] == ["party-0", "party-1", "party-3", "party-4"] for d in updates)
    dropped = [h["dropped"] for h in he["history"]]
    fault = "ProtocolError: this party drops out (simulated fault: drop-party=2)."
    assert all(d == {"party-2": fault} for d in dropped), dropped
    assert result["bytes"]["party->aggregator"] > 0 and result["timings_s"]["keygen"] > 0
    assert (out / "audit.jsonl").read_text().count('"decision": "decrypted"') == 3


@pytest.mark.slow
def test_simulated_exact_linreg_matches_sklearn(tmp_path):
    import numpy as np
    from sklearn.linear_model import LinearRegression

    from fedhe.data import load_builtin

    out = tmp_path / "linreg"
    assert (
        main(["simulate", "linreg", "--parties", "4", "--min-parties", "3", "--out", str(out)]) == 0
    )
    result = json.loads((out / "result.json").read_text())
    train, _ = load_builtin("diabetes", seed=0)
    sk = LinearRegression().fit(train.X, train.y)
    reference = np.concatenate([[sk.intercept_], sk.coef_])
    got = np.asarray(result["coefficients"]["encrypted"])
    assert np.max(np.abs(got - reference) / np.abs(reference)) <= 1e-6
