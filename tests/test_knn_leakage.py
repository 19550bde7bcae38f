"""What a curious key holder rebuilds of the KNN store from the values it decrypts (issue 14).

The key holder decrypts, per query, one masked value per stored position; it follows the
protocol but keeps them. `tests/knn_attacks.py` holds the attacks (each sees only what the key
holder sees) and the harness: the *old* protocol (affine mask, one fixed layout) as a numpy
reference, the *new* one through the real `fedhe.tasks.knn` code in the clear (context None;
its masks drawn from a seeded generator patched in for the OS's CSPRNG: deterministic).
Error = ‖X̂ − X‖/‖X‖ after the best rotation and scale (0: every record exact; 1.0: the trivial
guess, every point at the mean).

Data: sklearn wine (d = 13, 142 stored points) and diabetes (d = 10, 353 stored points; one
binary feature), 80 % stored over 3 parties, standardized with the stored points' moments;
queries: the other 20 % (cycled with jitter σ = 0.1 beyond). Seeds fixed.

Every "fails on the new protocol" test has a twin where the same attack succeeds (on the old
protocol, or on the new mask without the layout budget), so no threshold holds vacuously.
Thresholds, from measurements with this file's seeds and with data splits 0–4 (48 queries,
6 layouts of B = 8; `simulations/attack_knn.py` prints the table for 10 to 1,000 queries):

* success, asserted ≤ 1e-4 (the issue's bar; every record to about four digits): linear
  attack, old protocol, d + 1 to 50 queries: measured ≤ 3e-10 (1e-12 here); shape attack,
  old protocol (36 queries) and the quadratic mask on one layout (2d + 4 queries): ≤ 3e-12;
  cross-layout attack on layouts that each reveal the points: ≤ 7e-12 (asserted ≤ 1e-6).
  Ordinal attack (ranks only), one old layout of 36 queries: measured 0.19–0.37 (0.30 wine,
  0.20 diabetes here), asserted ≤ 0.45.
* failure, new protocol, per layout: linear = shape attack (B < d + 1: no vertex can be
  fitted, the shape attack leaves the columns as they are) measured ≥ 0.385 on every layout
  (median ≈ 0.53; 0.49 here), asserted ≥ 0.30; ordinal measured ≥ 0.61 (median ≈ 0.68),
  asserted ≥ 0.50, above the 0.45 its twin must reach; cross-layout (6 layouts' estimates
  matched, rotated and averaged) measured ≥ 0.57 with linear per-layout estimates and ≥ 0.71
  with ordinal ones, asserted ≥ 0.40: it does not link the layouts (no better than one).

Two weaknesses found by these attacks were fixed in fedhe.tasks.knn and are kept as tests
with their twins: a layout for few features answered d + 1 queries (the quadratic identity
then fits the vertices: iris, every record), and empty positions showed the mask at u = 0
(every true distance within ~10 %). Two remain, as `xfail(strict=True)` tests that assert the
protection the design should give, fail today, and turn into errors once fixed (then drop the
marker): a query asked twice, or queries that come back approximately, link two layouts.
"""

from __future__ import annotations

from functools import cache
from itertools import pairwise

import numpy as np
import pytest
from scipy.stats import spearmanr

from fedhe.errors import FedHEError
from fedhe.tasks import knn
from tests import knn_attacks as ka

PARTIES = 3
EXACT = 1e-4  # the bar for "every stored record rebuilt"
LINEAR_FAILS = 0.30
ORDINAL_SUCCEEDS = 0.45
ORDINAL_FAILS = 0.50
CROSS_LAYOUT_FAILS = 0.40
NEW_QUERIES = 48  # 6 layouts of 8 queries


@cache
def dataset(name: str) -> ka.Data:
    return ka.load(name, seed=0)


def queries(name: str, n: int, seed: int) -> np.ndarray:
    return ka.make_queries(dataset(name).pool, n, np.random.default_rng(seed))


def budget(d: int) -> int:
    per_layout = getattr(knn, "queries_per_layout", None)
    return per_layout(d) if per_layout else ka.model_budget(d)


@cache
def new_protocol(name: str) -> tuple[ka.LayoutView, ...]:
    """NEW protocol: 48 queries through the real fedhe.tasks.knn code (6 fresh layouts)."""
    data = dataset(name)
    return tuple(
        ka.new_views(
            data.X,
            data.y,
            queries(name, NEW_QUERIES, 11),
            PARTIES,
            np.random.default_rng(12),
            n_classes=data.n_classes,
            mask_seed=13,
        )
    )


def per_layout(name: str, attack) -> list[float]:
    data = dataset(name)
    return [
        ka.reconstruction_error(attack(v.values, data.d), data.X[v.rows])
        for v in new_protocol(name)
    ]


# -- the harness and the metric ----------------------------------------------------------------


def test_the_metric_scores_the_trivial_guess_1_and_a_rotated_copy_0():
    X = dataset("wine").X
    rotation, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((X.shape[1],) * 2))
    assert ka.reconstruction_error(np.zeros_like(X), X) == 1.0
    assert ka.reconstruction_error(3.0 * X @ rotation + 1.0, X) < 1e-12
    noise = np.random.default_rng(1).standard_normal(X.shape)
    assert ka.reconstruction_error(noise, X) > 0.9


@pytest.mark.parametrize("name", ka.DATASETS)
def test_the_harness_maps_every_position_to_its_stored_row(name):
    """Each layout's values order the positions as the true distances of the mapped rows do:
    the ground truth the scores rely on is right."""
    data = dataset(name)
    for view in new_protocol(name):
        assert sorted(view.rows) == list(range(len(data.X)))
        for j, q in enumerate(view.queries):
            distances = np.sum((data.X[view.rows] - q) ** 2, axis=1)
            assert spearmanr(view.values[:, j], distances).statistic == pytest.approx(1.0)


@pytest.mark.parametrize("name", ka.DATASETS)
def test_the_new_protocol_answers_at_most_the_budget_per_layout_and_reshuffles(name):
    data = dataset(name)
    views = new_protocol(name)
    per_layout = budget(data.d)
    assert per_layout <= min(8, data.d + 1)
    assert [v.values.shape[1] for v in views] == [per_layout] * (NEW_QUERIES // per_layout)
    assert all(not np.array_equal(a.rows, b.rows) for a, b in pairwise(views))
    layout = knn.StoreLayout.plan({"a": len(data.X)}, knn.PARAMS.slots, np.random.default_rng(0))
    store = knn.KNNStore(None, data.d, 0, layout)
    rng = np.random.default_rng(1)
    store.add(
        layout.segments[0],
        knn.party_upload(
            None,
            data.X,
            knn.label_rows(np.zeros(len(data.X)), 0),
            layout.segments[0],
            knn.PARAMS.slots,
            rng=rng,
        ),
    )
    store.masked_distances(queries(name, per_layout, 2))
    with pytest.raises(FedHEError, match="layout"):
        store.masked_distances(queries(name, 1, 3))


# -- OLD protocol (numpy reference): the attacks succeed ----------------------------------------


@pytest.mark.parametrize(
    ("name", "n_queries"), [("wine", 23), ("wine", 50), ("diabetes", 20), ("diabetes", 50)]
)
def test_old_protocol_linear_attack_rebuilds_every_record(name, n_queries):
    """The issue's attack: d + 10 queries (and 50) give every stored record (measured
    ≤ 1e-11; diabetes needs the binary feature's scale, fixed by its unit variance)."""
    data = dataset(name)
    V = ka.old_view(data.X, queries(name, n_queries, 1), np.random.default_rng(2))
    assert ka.reconstruction_error(ka.linear_attack(V, data.d), data.X) <= EXACT


@pytest.mark.parametrize("name", ka.DATASETS)
def test_old_protocol_shape_attack_rebuilds_every_record(name):
    data = dataset(name)
    V = ka.old_view(data.X, queries(name, 36, 3), np.random.default_rng(4))
    assert ka.reconstruction_error(ka.shape_attack(V, data.d), data.X) <= EXACT


@pytest.mark.parametrize("name", ka.DATASETS)
def test_old_protocol_ordinal_attack_gets_close_from_ranks_alone(name):
    data = dataset(name)
    V = ka.old_view(data.X, queries(name, 36, 5), np.random.default_rng(6))
    assert ka.reconstruction_error(ka.ordinal_attack(V, data.d), data.X) <= ORDINAL_SUCCEEDS


@pytest.mark.parametrize("name", ka.DATASETS)
def test_quadratic_mask_without_the_layout_budget_falls_to_the_shape_attack(name):
    """The twin of the new protocol's shape test: the same mask on ONE layout (the numpy
    model; the real store refuses) gives every record back from 2d + 4 queries."""
    data = dataset(name)
    n = 2 * data.d + 4
    view = ka.new_view_model(data.X, queries(name, n, 7), np.random.default_rng(8), budget=n)[0]
    assert ka.reconstruction_error(ka.shape_attack(view.values, data.d), data.X[view.rows]) <= EXACT


@pytest.mark.parametrize("name", ka.DATASETS)
def test_cross_layout_attack_links_layouts_that_each_reveal_the_points(name):
    """The twin of the new protocol's cross-layout test: with the affine mask and d + 2
    queries per freshly shuffled layout, matching + rotation links all layouts exactly."""
    data = dataset(name)
    views = ka.old_views(
        data.X, queries(name, 4 * (data.d + 2), 9), np.random.default_rng(10), data.d + 2
    )
    estimate = ka.cross_layout_attack(
        [v.values for v in views], data.d, per_layout=ka.linear_attack
    )
    assert ka.reconstruction_error(estimate, data.X[views[0].rows]) <= 1e-6


# -- NEW protocol (fedhe.tasks.knn): the attacks fail -------------------------------------------


@pytest.mark.parametrize("name", ka.DATASETS)
def test_new_protocol_linear_attack_fails_on_every_layout(name):
    assert min(per_layout(name, ka.linear_attack)) >= LINEAR_FAILS


@pytest.mark.parametrize("name", ka.DATASETS)
def test_new_protocol_shape_attack_fails_on_every_layout(name):
    assert min(per_layout(name, ka.shape_attack)) >= LINEAR_FAILS


@pytest.mark.parametrize("name", ka.DATASETS)
def test_new_protocol_ordinal_attack_stays_far_from_exact(name):
    assert min(per_layout(name, ka.ordinal_attack)) >= ORDINAL_FAILS


@pytest.mark.parametrize("name", ka.DATASETS)
@pytest.mark.parametrize("estimator", [ka.ordinal_attack, ka.linear_attack])
def test_new_protocol_cross_layout_attack_stays_far_from_exact(name, estimator):
    data = dataset(name)
    views = new_protocol(name)
    estimate = ka.cross_layout_attack([v.values for v in views], data.d, per_layout=estimator)
    assert ka.reconstruction_error(estimate, data.X[views[0].rows]) >= CROSS_LAYOUT_FAILS


# -- NEW protocol: known weaknesses (xfail strict: drop the marker once fixed) ------------------


@pytest.mark.xfail(
    strict=True,
    reason="KNOWN WEAKNESS: one query asked in two layouts links them (same distances, same "
    "order: rank matching), and 2B − 1 > d + 1 linked columns fall to the shape attack.",
)
def test_a_query_asked_twice_does_not_link_two_layouts():
    data = dataset("wine")
    B = budget(data.d)
    asked = queries("wine", 2 * B - 1, 13)
    asked = np.vstack([asked[:B], asked[3:4], asked[B:]])  # query 3 again, in layout 2
    views = ka.new_views(
        data.X,
        data.y,
        asked,
        PARTIES,
        np.random.default_rng(14),
        n_classes=data.n_classes,
        mask_seed=14,
    )
    estimate = ka.repeat_link_attack([v.values for v in views], data.d)
    assert ka.reconstruction_error(estimate, data.X[views[0].rows]) >= LINEAR_FAILS


@pytest.mark.xfail(
    strict=True,
    reason="KNOWN WEAKNESS: queries that come back approximately (here the pool of 36 revisited "
    "with jitter σ = 0.1) link two layouts: columns paired by the shape of their sorted "
    "values, positions by their rank profiles; the two layouts' 16 columns then fall to the "
    "shape attack. Unlinkable layouts need unrelated queries.",
)
def test_similar_queries_do_not_link_layouts():
    data = dataset("wine")
    views = new_protocol("wine")  # 48 queries: the 36 of the pool, then 12 of them again ± 0.1
    estimate = ka.similar_query_link_attack([v.values for v in views], data.d)
    assert ka.reconstruction_error(estimate, data.X[views[0].rows]) >= CROSS_LAYOUT_FAILS


def few_features_views(per_layout: int) -> list[ka.LayoutView]:
    """iris (d = 4): queries 0–4 of its pool (well spread: iris' coarse grid makes some
    groups of five nearly coplanar, which no attack can use), one layout of `per_layout`."""
    data = dataset("iris")
    return ka.new_views(
        data.X,
        data.y,
        data.pool[:per_layout],
        PARTIES,
        np.random.default_rng(16),
        per_layout,
        n_classes=data.n_classes,
        mask_seed=16,
    )


def test_a_layout_for_few_features_does_not_reveal_the_store():
    """B = queries_per_layout(4) = 4 ≤ d: the values and the constant do not span {1, ‖x‖², X},
    nothing pins the vertices (measured 0.23–0.67 on iris layouts)."""
    data = dataset("iris")
    view = few_features_views(budget(data.d))[0]
    assert budget(data.d) <= data.d
    assert ka.reconstruction_error(ka.shape_attack(view.values, data.d), data.X[view.rows]) >= 0.1


def test_one_more_query_per_layout_would_reveal_the_store_for_few_features():
    """The twin: d + 1 queries on one layout span {1, ‖x‖², X} whatever the vertices, and the
    quadratic identity ‖x‖² = U·G·Uᵀ fits them: every record (measured 1e-12)."""
    data = dataset("iris")
    view = few_features_views(data.d + 1)[0]
    assert ka.reconstruction_error(ka.shape_attack(view.values, data.d), data.X[view.rows]) <= EXACT


@pytest.mark.parametrize("name", ka.DATASETS)
def test_empty_positions_do_not_reveal_the_true_distances(name):
    """Empty positions hold EMPTY_OFFSET plus fresh noise (a per-block offset as wide as the
    mask's shift): the key holder's estimate of the mask at u = 0 from them, and so of the
    true distances, is worthless (measured median relative error ≥ 1.5)."""
    data = dataset(name)
    views = new_protocol(name)
    assert all(v.empty is not None for v in views)
    assert min(ka.distance_estimate_error(v, data.X) for v in views) >= 0.5


@pytest.mark.parametrize("name", ka.DATASETS)
def test_the_mask_at_zero_would_reveal_the_true_distances(name):
    """The twin: where an empty position showed the mask at u = 0 exactly (b² + β, as in the
    first version of the new protocol; here the numpy model), the same estimate gives every
    true distance ‖x − q‖² within ~10 % (measured 0.05-0.10)."""
    data = dataset(name)
    views = ka.new_view_model(data.X, queries(name, NEW_QUERIES, 11), np.random.default_rng(17))
    assert max(ka.distance_estimate_error(v, data.X) for v in views) <= 0.25
