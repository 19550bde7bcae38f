"""linreg and logreg through the real ServerApp loop and ClientApp handlers (in-process Grid)."""

import json

import numpy as np
import pytest
from numpy.lib.format import MAGIC_PREFIX as NPY_MAGIC
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.preprocessing import StandardScaler

from fedhe import protocol
from fedhe.aggregator.app import run_job
from fedhe.config import JobConfig
from fedhe.crypto.tensor import CKKS_KIND
from fedhe.data import load_builtin
from fedhe.tasks import linreg
from tests.framed import tensor_frame
from tests.inprocess import InProcessGrid


def _run(tmp_path, *, share_model=None, **settings):
    """`share_model`: the parties (indexes) whose node config hands the encrypted-model job's
    final model, sealed to each party, back to the aggregator; None: every simulated node."""
    settings = {"plaintext_twin": True} | settings  # most tests compare with the twin
    config = JobConfig.of(parties=5, min_parties=3, out=str(tmp_path), **settings)
    grid = InProcessGrid(config.num_nodes)
    if share_model is not None:
        for index in range(config.parties):
            grid.contexts[1000 + index].node_config["share-model"] = index in share_model
    run_job(grid, config)
    return json.loads((tmp_path / "result.json").read_text()), grid


def test_exact_linreg_job_matches_sklearn_and_its_twin(tmp_path):
    result, _ = _run(tmp_path, task="linreg")
    train, test = load_builtin("diabetes", seed=0)
    sk = LinearRegression().fit(train.X, train.y)
    reference = np.concatenate([[sk.intercept_], sk.coef_])
    coefficients = result["coefficients"]
    assert coefficients["names"] == ["intercept", *train.feature_names]
    for run in ("encrypted", "plaintext"):
        got = np.asarray(coefficients[run])
        assert np.max(np.abs(got - reference) / np.abs(reference)) <= 1e-6, run
    sk_r2 = sk.score(test.X, test.y)
    assert result["encrypted"]["r2"] == pytest.approx(sk_r2, abs=1e-9)
    assert result["encrypted"]["mse"] == pytest.approx(result["plaintext"]["mse"], rel=1e-9)
    outputs = [d["output"] for d in result["decryptions"]]
    assert outputs == ["feature_moments", linreg.MASKED_OUTPUT]


def test_key_holder_never_sends_the_masked_matrix_and_parties_get_the_mask_only(tmp_path):
    _, grid = _run(tmp_path, task="linreg", plaintext_twin=False)
    keyholder_node = 1000 + 5
    released = [
        protocol.array_from_bytes(protocol.payload_of(m.content)["values"])
        for direction, m in grid.log
        if direction == "received"
        and m.metadata.src_node_id == keyholder_node
        and m.metadata.message_type == protocol.DECRYPT
    ]
    assert [r.shape for r in released] == [(2 * 10 + 2 + 2,), (11,)]  # moments sum, then w only
    to_keyholder = [
        m for d, m in grid.log if d == "sent" and m.metadata.dst_node_id == keyholder_node
    ]
    masks = {"mask", "right-mask", "gradient-mask"}
    assert all(not masks & set(protocol.config_of(m.content)) for m in to_keyholder)
    stats = [m for d, m in grid.log if d == "sent" and m.metadata.message_type == protocol.STATS]
    assert len(stats) == 5
    assert all({"mask", "right-mask"} <= set(protocol.config_of(m.content)) for m in stats)


def test_gradient_linreg_agrees_with_its_twin_and_approaches_the_exact_fit(tmp_path):
    result, grid = _run(tmp_path, task="linreg", mode="gradient", rounds=40, lr=0.4, batch_size=0)
    exact, _ = _run(tmp_path / "exact", task="linreg", plaintext_twin=False)
    # each party gets its own fresh gradient mask every round; the key holder never one
    sent = [m for d, m in grid.log if d == "sent"]
    to_keyholder = [m for m in sent if m.metadata.dst_node_id == 1000 + 5]
    assert all("gradient-mask" not in protocol.config_of(m.content) for m in to_keyholder)
    masks = [
        tuple(protocol.config_of(m.content)["gradient-mask"])
        for m in sent
        if m.metadata.message_type == protocol.GRADIENT
    ]
    assert len(masks) == 2 * 40 * 5 and len(set(masks)) == len(masks)  # HE run and its twin
    assert result["encrypted"]["r2"] == pytest.approx(exact["encrypted"]["r2"], abs=0.01)
    assert result["agreement"]["max_abs_weight_diff"] < 1e-3
    assert result["encrypted"]["r2"] == pytest.approx(result["plaintext"]["r2"], abs=1e-6)
    assert len([d for d in result["decryptions"] if d["output"] == linreg.GRADIENT_OUTPUT]) == 40


def test_logreg_within_one_point_of_its_twin_and_of_sklearn(tmp_path):
    # full-batch gradient descent with sklearn's default penalty (C=1 ⇒ α = 1/N per sample)
    result, _ = _run(tmp_path, task="logreg", rounds=100, lr=4.0, batch_size=0, l2=1 / 455)
    he, plain = result["encrypted"], result["plaintext"]
    assert abs(he["accuracy"] - plain["accuracy"]) <= 0.01
    train, test = load_builtin("breast_cancer", seed=0)
    scaler = StandardScaler().fit(train.X)
    sk = LogisticRegression(max_iter=1000).fit(scaler.transform(train.X), train.y)
    sk_accuracy = sk.score(scaler.transform(test.X), test.y)
    assert abs(he["accuracy"] - sk_accuracy) <= 0.01, (he["accuracy"], sk_accuracy)
    assert {"accuracy", "log_loss", "auc"} <= set(he)
    assert he["auc"] > 0.98


def test_logreg_refuses_exact_mode():
    from fedhe.config import ConfigError

    with pytest.raises(ConfigError, match="no exact mode"):
        JobConfig.of(task="logreg", mode="exact")


def test_linreg_on_csv_files_excludes_a_party_with_a_nan_cell(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(5)
    columns = ["age", "dose", "weight", "outcome"]
    frames = []
    for i in range(1, 5):
        X = rng.normal(size=(60, 3)) * [10, 2, 15] + [50, 5, 70]
        y = X @ [0.3, -2.0, 0.1] + 7 + rng.normal(scale=0.5, size=60)
        frame = pd.DataFrame(np.column_stack([X, y]), columns=columns)
        frame.to_csv(tmp_path / f"party-{i}.csv", index=False)
        frames.append(frame)
    frames[0].iloc[:40].to_csv(tmp_path / "test.csv", index=False)
    bad = tmp_path / "party-2.csv"
    lines = bad.read_text().splitlines()
    lines[3] = "nan," + lines[3].split(",", 1)[1]
    bad.write_text("\n".join(lines) + "\n")
    config = JobConfig(
        task="linreg",
        parties=4,
        min_parties=3,
        out=str(tmp_path / "out"),
        data_dir=str(tmp_path),
        target="outcome",
    )
    run_job(InProcessGrid(config.num_nodes), config)
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    reason = result["parties"]["excluded"]["party-2.csv"]  # party index 1
    assert "party-2.csv" in reason and "line 4" in reason and "age" in reason
    pooled = pd.concat([frames[0], frames[2], frames[3]])
    sk = LinearRegression().fit(pooled[columns[:3]], pooled["outcome"])
    reference = np.concatenate([[sk.intercept_], sk.coef_])
    got = np.asarray(result["coefficients"]["encrypted"])
    assert np.max(np.abs(got - reference) / np.abs(reference)) <= 1e-6
    assert result["coefficients"]["names"] == ["intercept", "age", "dose", "weight"]


def test_encrypted_model_linreg_matches_its_twin_and_the_clear_model_mode(tmp_path, monkeypatch):
    from fedhe.keyholder.keyholder import KeyHolder
    from fedhe.tasks import encrypted_model

    seen: list[tuple[str, np.ndarray]] = []

    def recording(method):
        def record(self, request):
            released = method(self, request)
            seen.append((request.output_kind, released.values))
            return released

        return record

    # What the key holder decrypts: sums it verified, and the unverified refreshes and model.
    for name in ("decrypt_sum", "decrypt_unverified"):
        monkeypatch.setattr(KeyHolder, name, recording(getattr(KeyHolder, name)))
    result, grid = _run(
        tmp_path, task="linreg", mode="encrypted-model", rounds=20, lr=0.4, share_model=[0]
    )
    clear, _ = _run(
        tmp_path / "clear",
        task="linreg",
        mode="gradient",
        rounds=20,
        lr=0.4,
        batch_size=0,
        plaintext_twin=False,
    )
    assert result["encrypted"]["r2"] == pytest.approx(result["plaintext"]["r2"], abs=1e-4)
    assert result["encrypted"]["r2"] == pytest.approx(clear["encrypted"]["r2"], abs=1e-4)
    outputs = [d["output"] for d in result["decryptions"]]
    assert outputs.count(encrypted_model.REFRESH_OUTPUT) == 19
    assert outputs.count(encrypted_model.MODEL_OUTPUT) == 1
    # The key holder saw the model only masked until the final release (HE run: moments, 19, 1).
    he_seen = seen[: 1 + 19 + 1]
    final = he_seen[-1][1]
    masked = [values for kind, values in he_seen if kind == encrypted_model.REFRESH_OUTPUT]
    assert len(masked) == 19
    assert all(np.median(np.abs(values - final)) > 100 for values in masked)
    assert np.max(np.abs(final)) < 5
    # The final model went to every party, sealed; only party-0 (share-model) handed it back.
    assert result["model_released_to"] == [f"party-{i}" for i in range(5)]
    handed_back = [
        m.metadata.src_node_id
        for direction, m in grid.log
        if direction == "received"
        and m.metadata.message_type == protocol.MODEL_RELEASE
        and "model" in protocol.payload_of(m.content)
    ]
    assert handed_back == [1000]


def test_encrypted_model_logreg_agrees_with_its_twin(tmp_path):
    result, _ = _run(tmp_path, task="logreg", mode="encrypted-model", rounds=20, lr=0.5)
    assert abs(result["encrypted"]["accuracy"] - result["plaintext"]["accuracy"]) <= 0.01
    assert result["encrypted"]["accuracy"] > 0.94  # first-order surrogate of the logistic loss


def test_a_diverging_encrypted_model_stops_with_the_fix(tmp_path):
    from fedhe.errors import ProtocolError

    with pytest.raises(ProtocolError, match="lower the learning rate"):
        _run(
            tmp_path, task="logreg", mode="encrypted-model", rounds=20, lr=2.0, plaintext_twin=False
        )


def test_encrypted_model_aggregator_receives_no_value_in_the_clear_before_the_end(tmp_path):
    """Key-holder replies carry clear values only for the moments sum (a verified sum); every
    refresh comes back as ciphertexts and the final model sealed to each party."""
    result, grid = _run(
        tmp_path,
        task="linreg",
        mode="encrypted-model",
        rounds=4,
        lr=0.4,
        plaintext_twin=False,
        share_model=(),
    )
    keyholder_node = 1000 + 5
    replies = [
        protocol.payload_of(m.content)
        for direction, m in grid.log
        if direction == "received"
        and m.metadata.src_node_id == keyholder_node
        and m.metadata.message_type == protocol.DECRYPT
    ]
    in_clear = [p for p in replies if "values" in p]
    assert len(replies) == 1 + 3 + 1 and len(in_clear) == 1
    assert [protocol.array_from_bytes(p["values"]).shape for p in in_clear] == [(24,)]
    refreshes = replies[1:4]
    assert all(set(p) == {"vector", *(f"broadcast-{j}" for j in range(11))} for p in refreshes)
    assert all(_kind(v) == CKKS_KIND for p in refreshes for v in p.values())
    final = replies[-1]
    assert set(final) == {f"sealed/party-{i}" for i in range(5)}
    assert not any(_kind(v) or v.startswith(NPY_MAGIC) for v in final.values())  # sealed only
    # No party shares the model here: it stays with them, nothing is evaluated in the clear.
    assert result["model_released_to"] == [f"party-{i}" for i in range(5)]
    assert "r2" not in result.get("encrypted", {})
    party_replies = [
        m for d, m in grid.log if d == "received" and m.metadata.message_type == protocol.MODEL_STEP
    ]
    assert party_replies and all(
        _kind(protocol.payload_of(m.content)["contribution"]) == CKKS_KIND for m in party_replies
    )


def _kind(data: bytes) -> str | None:
    """The kind a tensor's header names ("ckks", "plain"); None for bytes that are no tensor."""
    framed = tensor_frame(data)
    return None if framed is None else framed[0]["kind"]
