"""KNN on encrypted points: party → aggregator → key holder → querier in one process."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor

from fedhe.crypto import PublicContext
from fedhe.data.datasets import load_builtin
from fedhe.errors import (
    ChannelError,
    ContextMismatchError,
    FedHEError,
    InvalidCiphertextError,
    PolicyError,
    ProtocolError,
    ShapeError,
    ValueRangeError,
)
from fedhe.keyholder import DecryptionRequest, KeyHolder
from fedhe.keyholder.inprocess import TaggedParties
from fedhe.tasks import aggregate, check_declaration, knn

SLOTS = knn.PARAMS.slots
K = 5
QUERIER = "party-0"


class Federation:
    """A key holder, its job, and the parties' points split in `n_parties` shares; a fresh
    layout (new segment order, points shuffled again) whenever the store's budget is spent."""

    def __init__(
        self,
        tmp_path,
        X,
        y,
        n_classes,
        *,
        encrypted=True,
        n_parties=3,
        job="j",
        encrypted_queries=True,
    ):
        self.keyholder = KeyHolder(tmp_path / job, declaration_check=check_declaration)
        declaration = aggregate.declare(
            job,
            outputs={knn.RANK_OUTPUT: (400, None), knn.VOTE_OUTPUT: (400, None)},
            min_parties=2,
            params=knn.PARAMS,
            encrypted=encrypted,
            task=knn.TASK,
            meta={"k": K, "querier": QUERIER},
        )
        public = self.keyholder.declare_job(declaration, knn.query_keys(X.shape[1]))
        self.context = PublicContext.from_bytes(public) if public else None
        self.job = job
        # The parties register with the key holder: the votes are sealed to the querier.
        self.parties = TaggedParties(self.keyholder, job, [f"party-{i}" for i in range(n_parties)])
        self.rounds: Counter[str] = Counter()
        self.n_classes = n_classes
        self.encrypted_queries = encrypted_queries
        self.rng = np.random.default_rng(7)
        self.shares = {
            f"party-{i}": (X[share], y[share])
            for i, share in enumerate(np.array_split(np.arange(len(X)), n_parties))
        }
        self.relayout()

    def relayout(self):
        counts = {party: len(points) for party, (points, _) in self.shares.items()}
        self.layout = knn.StoreLayout.plan(counts, SLOTS, self.rng)
        first = next(iter(self.shares.values()))[0]
        self.store = knn.KNNStore(
            self.context,
            first.shape[1],
            self.n_classes,
            self.layout,
            encrypted_queries=self.encrypted_queries,
        )
        self.uploads = {}
        for party, (points, labels) in self.shares.items():
            segment = self.segment(party)
            self.uploads[party] = knn.party_upload(
                self.context,
                points,
                knn.label_rows(labels, self.n_classes),
                segment,
                SLOTS,
                rng=self.rng,
                encrypted_queries=self.encrypted_queries,
            )
            self.store.add(segment, self.uploads[party])

    def segment(self, party):
        return next(s for s in self.layout.segments if s.party == party)

    def request(self, output, tensor, contributors=None):
        """The aggregator's request: the next round of `output` (each round is released once).
        Ranks and votes are no sums, so they carry no tags (`decrypt_unverified`)."""
        parties = tuple(self.store.contributors if contributors is None else contributors)
        round_ = self.rounds[output]
        self.rounds[output] += 1
        return DecryptionRequest(self.job, output, parties, tensor.to_bytes(), round_)

    def distances(self, queries):
        """Masked distances of ≤ one layout's worth of queries (a fresh layout when needed)."""
        if self.store.queries_left < len(queries):
            self.relayout()
        return self.store.masked_distances(queries)

    def ask(self, queries, *, encrypted_query=False):
        answers = []
        for start in range(0, len(queries), self.store.query_budget):
            chunk = queries[start : start + self.store.query_budget]
            if self.store.queries_left < len(chunk):
                self.relayout()
            answers.append(self._ask(chunk, encrypted_query))
        return np.concatenate(answers)

    def _ask(self, queries, encrypted_query):
        n = len(queries)
        if encrypted_query:
            sent = knn.querier_encrypt(self.context, queries, SLOTS).to_bytes()
            queries = self.store.load_queries(sent, n)
        distances = self.store.masked_distances(queries)
        ranked = knn.keyholder_rank(self.keyholder, self.request(knn.RANK_OUTPUT, distances))
        masks, rho = knn.querier_masks(self.context, n, self.store.n_labels, SLOTS)
        votes = self.store.votes(
            self.store.load_selection(ranked["selection"], n),
            self.store.load_masks(masks.to_bytes(), n),
        )
        request = self.request(knn.VOTE_OUTPUT, votes)
        released = knn.keyholder_vote(self.keyholder, request)
        # The aggregator relays the votes sealed to the querier (in the clear: the twin only).
        assert set(released) == ({"sealed"} if self.context is not None else {"values"})
        opened = self.parties.released(released, knn.VOTE_OUTPUT, request.round, QUERIER)
        return knn.querier_answer(opened, rho, K, self.n_classes)


def standardized(name):
    train, test = load_builtin(name, seed=0)
    mean, std = train.X.mean(axis=0), train.X.std(axis=0)
    return (train.X - mean) / std, train.y, (test.X - mean) / std, test.y, train.n_classes


@pytest.fixture(scope="module")
def iris(tmp_path_factory):
    X, y, Xq, yq, c = standardized("iris")
    return Federation(tmp_path_factory.mktemp("iris"), X, y, c), X, y, Xq, yq


@pytest.mark.parametrize("encrypted_query", [False, True])
def test_iris_agrees_with_sklearn(iris, encrypted_query):
    federation, X, y, Xq, yq = iris
    predicted = federation.ask(Xq, encrypted_query=encrypted_query)
    reference = KNeighborsClassifier(K, algorithm="brute").fit(X, y).predict(Xq)
    assert np.mean(predicted == reference) >= 0.99
    assert np.mean(predicted == yq) > 0.9


def test_a_store_for_plaintext_queries_keeps_feature_columns_and_refuses_encrypted_ones(
    iris, tmp_path
):
    full, X, y, Xq, _ = iris
    c = full.n_classes
    lean = Federation(tmp_path, X, y, c, job="lean", encrypted_queries=False)
    # feature columns and ‖x‖² (d + 1 rows), not the h = 4 complex diagonals for iris
    assert lean.store.point_rows == 5 and full.store.point_rows == knn.complex_width(4) == 4
    reference = KNeighborsClassifier(K, algorithm="brute").fit(X, y).predict(Xq)
    assert np.mean(lean.ask(Xq) == reference) >= 0.99
    with pytest.raises(ProtocolError, match="uploaded for plaintext queries"):
        lean.ask(Xq[:2], encrypted_query=True)
    lean.store.save(tmp_path / "lean-store")
    assert not knn.KNNStore.load(tmp_path / "lean-store", lean.context).encrypted_queries
    # a store of diagonals answers plaintext queries too
    assert np.mean(full.ask(Xq[:5]) == reference[:5]) >= 0.99


def test_breast_cancer_agrees_with_sklearn(tmp_path):
    X, y, Xq, yq, c = standardized("breast_cancer")
    Xq, yq = Xq[:48], yq[:48]  # 6 layouts of d = 30 features, 8 queries each
    federation = Federation(tmp_path, X, y, c, n_parties=4)
    predicted = federation.ask(Xq)
    reference = KNeighborsClassifier(K, algorithm="brute").fit(X, y).predict(Xq)
    assert np.mean(predicted == reference) >= 0.99
    assert np.mean(predicted == yq) > 0.9


def test_regression_is_the_mean_of_the_k_nearest_targets(tmp_path):
    train, test = load_builtin("diabetes", seed=0)
    mean, std = train.X.mean(axis=0), train.X.std(axis=0)
    y_mean, y_std = train.y.mean(), train.y.std()
    X, Xq = (train.X - mean) / std, (test.X[:40] - mean) / std
    federation = Federation(tmp_path, X, (train.y - y_mean) / y_std, 0)
    predicted = y_mean + y_std * federation.ask(Xq)
    reference = KNeighborsRegressor(K, algorithm="brute").fit(X, train.y).predict(Xq)
    np.testing.assert_allclose(predicted, reference, rtol=1e-3)


def test_the_plaintext_twin_runs_the_same_steps(tmp_path):
    X, y, Xq, _, c = standardized("iris")
    twin = Federation(tmp_path, X, y, c, encrypted=False)
    reference = KNeighborsClassifier(K, algorithm="brute").fit(X, y).predict(Xq)
    assert twin.context is None
    assert np.mean(twin.ask(Xq) == reference) >= 0.99


def test_vote_ties_go_to_the_smallest_class():
    released = np.array([[2.0, 2.0, 1.0], [1.0, 2.0, 2.0]])
    assert knn.querier_answer(released, np.zeros((2, 3)), 5, 3).tolist() == [0, 1]


# -- what the key holder sees -----------------------------------------------------------------


def _masked_for_keyholder(federation, queries):
    """What the key holder decrypts when asked to rank (flooding noise included)."""
    distances = federation.distances(queries)
    return federation.keyholder.decrypt_unverified(
        federation.request(knn.RANK_OUTPUT, distances)
    ).values.reshape(len(queries), -1)


def test_ranking_values_keep_the_order_but_not_the_distances(iris):
    federation, _, _, Xq, _ = iris
    query = Xq[:1]
    seen = _masked_for_keyholder(federation, np.repeat(query, 2, axis=0))
    occupied = federation.store.occupied().ravel()
    # Which stored point sits at which position is the aggregator's secret; the test recovers it
    # by decrypting the store with the secret key.
    stored = _stored_points(federation)
    u = np.sum((stored - query[0]) ** 2, axis=1) / knn.distance_scale(4)
    first, second = seen[0, occupied], seen[1, occupied]
    # The same query twice gets two different masks: no fixed map from values to distances.
    assert not np.allclose(first, second, rtol=0, atol=1.0)
    for values in (first, second):
        # (u + b)² + β: exactly quadratic in the distance, so no affine map explains the values
        curvature, slope, _ = np.polyfit(u, values, 2)
        np.testing.assert_allclose(curvature, 1.0, rtol=1e-3)
        vertex = slope / 2
        assert 0 < vertex <= knn.MAX_VERTEX
        linear = np.polyval(np.polyfit(u, values, 1), u)
        assert np.max(np.abs(linear - values)) > 1e3 * np.max(
            np.abs(np.polyval(np.polyfit(u, values, 2), u) - values)
        )
        assert np.array_equal(np.argsort(values)[:K], np.argsort(u)[:K])
    # Empty positions are pushed beyond every real one, so they never rank.
    assert np.all(seen[:, ~occupied] > knn.VALID_BELOW)
    assert np.all(seen[:, occupied] < knn.VALID_BELOW)
    assert np.all(np.abs(seen) < knn.PARAMS.max_abs_at(1))


def _stored_points(federation):
    """Decrypt the store with the secret key (test only) to learn which point is where."""
    secret = federation.keyholder._secret_context(federation.job)
    from fedhe.crypto import decrypt

    rows = np.stack([decrypt(secret, r) for r in federation.store.blocks[0].points])
    occupied = federation.store.occupied().ravel()[:SLOTS]
    d = federation.store.n_features
    if federation.store.encrypted_queries:  # diagonal k holds x''_p[(p + k) mod h] at slot p
        folded = rows[:, 0::2] + 1j * rows[:, 1::2]  # COMPLEX packing: (real, imaginary) pairs
        h = folded.shape[0]
        p = np.arange(SLOTS)
        augmented = np.stack([folded[(j - p) % h, p] for j in range(h)], axis=1)
        points = np.column_stack([augmented.real, augmented.imag])[:, :d]
    else:
        points = rows[:d].T
    return points[occupied]


def test_the_vote_ciphertexts_hide_single_slots(iris):
    federation, _, _, Xq, _ = iris
    n = 2
    ranked = knn.keyholder_rank(
        federation.keyholder,
        federation.request(knn.RANK_OUTPUT, federation.distances(Xq[:n])),
    )
    masks, rho = knn.querier_masks(federation.context, n, federation.store.n_labels, SLOTS)
    votes = federation.store.votes(
        federation.store.load_selection(ranked["selection"], n),
        federation.store.load_masks(masks.to_bytes(), n),
    )
    request = federation.request(knn.VOTE_OUTPUT, votes)
    slots_seen = federation.keyholder.decrypt_unverified(request).values
    # Every slot looks like mask noise (no 0/1 pattern of the neighbours' labels) …
    assert np.mean(np.abs(slots_seen) > 1.0) > 0.99
    # … and the slot sums are the votes plus the querier's mask: no class count in the clear.
    sums = slots_seen.sum(axis=2)
    assert np.all(np.abs(sums - rho - np.rint(sums - rho)) < 0.01)
    counts = np.rint(sums - rho)  # classes 0 and 1; class 2 has the rest of the k votes
    assert counts.shape == (n, 2) and counts.min() >= 0 and np.all(counts.sum(axis=1) <= K)
    assert not np.allclose(sums, np.rint(sums), rtol=0, atol=0.01), (sums, rho)
    # The release (the same ciphertext again: replayed) is sealed to the querier alone.
    released = knn.keyholder_vote(federation.keyholder, request)
    assert set(released) == {"sealed"}
    opened = federation.parties.open(
        federation.job, knn.VOTE_OUTPUT, request.round, QUERIER, released["sealed"]
    )
    np.testing.assert_array_equal(opened, sums)
    with pytest.raises(ChannelError):
        federation.parties.open(
            federation.job, knn.VOTE_OUTPUT, request.round, "party-1", released["sealed"]
        )


# -- bad input --------------------------------------------------------------------------------


def test_query_errors_name_the_problem(iris):
    federation, _, _, Xq, _ = iris
    with pytest.raises(ShapeError, match="shape"):
        federation.store.masked_distances(Xq[:, :2])
    bad = Xq[:2].copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueRangeError, match="NaN"):
        federation.store.masked_distances(bad)
    with pytest.raises(ValueRangeError, match="norm"):
        federation.store.masked_distances(np.full((1, 4), 1e3))
    with pytest.raises(ValueRangeError, match="k=1000"):
        federation.store.check_ready(1000, 2)
    with pytest.raises(ProtocolError, match="fewer than min_parties"):
        federation.store.check_ready(K, 9)


def test_an_empty_store_cannot_be_queried(iris):
    federation = iris[0]
    store = knn.KNNStore(federation.context, 4, 3, knn.StoreLayout(SLOTS))
    with pytest.raises(ProtocolError, match="empty"):
        store.check_ready(K, 2)


def test_outlying_points_are_refused_before_encryption(iris):
    federation = iris[0]
    segment = knn.Segment("party-x", 0, 2)
    with pytest.raises(ValueRangeError, match="squared norm"):
        knn.party_upload(
            federation.context,
            np.full((2, 4), 100.0),
            np.ones((3, 2)),
            segment,
            SLOTS,
            rng=np.random.default_rng(),
        )


def test_a_bad_upload_changes_nothing(tmp_path):
    X, y, _, _, c = standardized("iris")
    federation = Federation(tmp_path, X, y, c, n_parties=2)
    store = knn.KNNStore(federation.context, 4, c, federation.layout)
    good = federation.uploads["party-0"]
    segment = federation.segment("party-0")
    damaged = {**good, next(iter(good)): good[next(iter(good))][:-10]}
    with pytest.raises(InvalidCiphertextError):
        store.add(segment, damaged)
    assert store.blocks == {} and store.contributors == []
    with pytest.raises(ProtocolError, match="must hold exactly"):
        store.add(segment, {"points-7": b"x"})
    store.add(segment, good)
    with pytest.raises(ProtocolError, match="already stored"):
        store.add(segment, good)
    foreign = Federation(tmp_path, X, y, c, n_parties=2, job="other")
    with pytest.raises(ContextMismatchError):
        store.add(federation.segment("party-1"), foreign.uploads["party-1"])
    assert store.contributors == ["party-0"]


# -- key holder policy --------------------------------------------------------------------------


def test_the_keyholder_ranks_only_for_enough_parties(iris):
    federation, _, _, Xq, _ = iris
    distances = federation.distances(Xq[:1])
    with pytest.raises(PolicyError, match="min_parties"):
        knn.keyholder_rank(
            federation.keyholder,
            federation.request(knn.RANK_OUTPUT, distances, contributors=["party-0"]),
        )


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        ({"querier": QUERIER}, "k ≥ 1"),
        ({"k": K}, "must name the party its answers go to"),  # votes are sealed to it
        ({"k": K, "querier": "aggregator"}, "must name the party its answers go to"),
    ],
    ids=["no-k", "no-querier", "querier-not-a-party"],
)
def test_a_knn_job_without_k_or_querier_is_refused(tmp_path, meta, reason):
    keyholder = KeyHolder(tmp_path, declaration_check=check_declaration)
    declaration = aggregate.declare(
        "nok",
        outputs={knn.RANK_OUTPUT: (1, None), knn.VOTE_OUTPUT: (1, None)},
        min_parties=2,
        params=knn.PARAMS,
        task=knn.TASK,
        meta=meta,
    )
    with pytest.raises(PolicyError, match=reason):
        keyholder.declare_job(declaration)


# -- persistence and growth ---------------------------------------------------------------------


def test_the_store_survives_a_restart_and_grows(tmp_path):
    X, y, Xq, _, c = standardized("iris")
    first, extra = X[:100], X[100:]
    federation = Federation(tmp_path, first, y[:100], c, n_parties=2)
    folder = federation.store.save(tmp_path / "store").parent
    reloaded = knn.KNNStore.load(folder, federation.context)
    assert reloaded.contributors == federation.store.contributors
    assert reloaded.n_points == 100
    # A new batch of points from party-1 goes to a new segment; queries then see all 120.
    segment = reloaded.layout.append("party-1", len(extra))
    reloaded.add(
        segment,
        knn.party_upload(
            federation.context,
            extra,
            knn.label_rows(y[100:], c),
            segment,
            SLOTS,
            rng=np.random.default_rng(),
        ),
    )
    assert reloaded.n_points == 120
    federation.store = reloaded  # the grown store answers its layout's budget
    n = reloaded.query_budget
    reference = KNeighborsClassifier(K, algorithm="brute").fit(X, y).predict(Xq[:n])
    assert np.mean(federation._ask(Xq[:n], False) == reference) >= 0.99


def test_a_store_under_other_keys_or_version_is_refused(tmp_path, iris):
    federation = iris[0]
    folder = federation.store.save(tmp_path / "store").parent
    other = Federation(tmp_path, np.zeros((4, 4)), np.zeros(4, int), 3, n_parties=2, job="o")
    with pytest.raises(ProtocolError, match="another key pair"):
        knn.KNNStore.load(folder, other.context)
    manifest = folder / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"version": 2', '"version": 99'))
    with pytest.raises(ProtocolError, match="version"):
        knn.KNNStore.load(folder, federation.context)
    with pytest.raises(ProtocolError, match="no readable"):
        knn.KNNStore.load(tmp_path / "nowhere", federation.context)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    key=st.sampled_from(["points-0", "labels-0"]),
    flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 7)), min_size=1, max_size=3),
    cut=st.none() | st.integers(0, 2**31),
)
def test_fuzzed_uploads_are_refused_and_change_nothing(iris, key, flips, cut):
    federation = iris[0]
    segment = federation.segment("party-0")
    good = federation.uploads["party-0"]
    data = bytearray(good[key])
    for position, bit in flips:
        data[position % len(data)] ^= 1 << bit
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    store = knn.KNNStore(federation.context, 4, 3, federation.layout)
    try:
        store.add(segment, {**good, key: bytes(data)})
    except FedHEError:
        assert store.blocks == {} and store.contributors == []
        return
    assert bytes(data) == good[key]  # only an unchanged upload may load


def test_a_planned_segment_not_yet_uploaded_counts_as_empty(tmp_path):
    X, y, Xq, _, c = standardized("iris")
    federation = Federation(tmp_path, X[:100], y[:100], c, n_parties=2)
    store = federation.store
    # party-0 announces 5000 more points (a second block) but has not uploaded them yet
    store.layout.append("party-0", 5000)
    assert store.n_points == 100 and store.layout.n_blocks == 2
    reference = KNeighborsClassifier(K, algorithm="brute").fit(X[:100], y[:100]).predict(Xq)
    assert np.mean(federation.ask(Xq) == reference) >= 0.99
