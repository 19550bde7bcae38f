"""Tests for fedhe.data: built-in datasets, partitions and CSV loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedhe.data import (
    BUILTIN_DATASETS,
    Dataset,
    find_party_files,
    load_builtin,
    load_csv,
    load_party,
    load_test,
    partition_dirichlet,
    partition_iid,
    read_header,
)
from fedhe.data.datasets import synthetic_regression
from fedhe.errors import DataError

EXPECTED = {
    # name: (n_samples, n_features, task, n_classes)
    "breast_cancer": (569, 30, "classification", 2),
    "iris": (150, 4, "classification", 3),
    "digits": (1797, 64, "classification", 10),
    "wine": (178, 13, "classification", 3),
    "diabetes": (442, 10, "regression", 0),
    "synthetic": (2000, 20, "regression", 0),
}


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def entropy_per_party(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    values = []
    for part in parts:
        _, counts = np.unique(labels[part], return_counts=True)
        p = counts / counts.sum()
        values.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(values))


# ---------------------------------------------------------------- built-in datasets


def test_builtin_names_are_exactly_the_documented_ones() -> None:
    assert set(BUILTIN_DATASETS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_shapes_and_dtypes(name: str) -> None:
    n, d, task, k = EXPECTED[name]
    train, test = load_builtin(name, seed=0, test_fraction=0.2)
    assert train.n_samples + test.n_samples == n
    assert test.n_samples == pytest.approx(0.2 * n, abs=1)
    for part in (train, test):
        assert part.X.shape == (part.n_samples, d) and part.n_features == d
        assert part.X.dtype == np.float64
        assert part.task == task and part.n_classes == k
        assert len(part.feature_names) == d
        assert np.isfinite(part.X).all()
        if task == "classification":
            assert part.y.dtype == np.int64
            assert part.y.min() >= 0 and part.y.max() < k
        else:
            assert part.y.dtype == np.float64


def test_builtin_split_is_reproducible_and_depends_on_seed() -> None:
    a_train, a_test = load_builtin("iris", seed=3)
    b_train, b_test = load_builtin("iris", seed=3)
    c_train, _ = load_builtin("iris", seed=4)
    np.testing.assert_array_equal(a_train.X, b_train.X)
    np.testing.assert_array_equal(a_test.y, b_test.y)
    assert not np.array_equal(a_train.X, c_train.X)


def test_builtin_train_and_test_are_disjoint() -> None:
    train, test = load_builtin("wine", seed=1)
    rows_train = {row.tobytes() for row in train.X}
    assert not any(row.tobytes() in rows_train for row in test.X)


def test_stratified_split_keeps_every_class_in_test_in_proportion() -> None:
    train, test = load_builtin("digits", seed=0, test_fraction=0.1)
    assert set(np.unique(test.y)) == set(range(10))
    full = np.bincount(np.concatenate([train.y, test.y]), minlength=10) / 1797
    np.testing.assert_allclose(np.bincount(test.y, minlength=10) / test.n_samples, full, atol=0.02)


def test_synthetic_follows_its_coefficients() -> None:
    data, w, b = synthetic_regression(seed=7)
    residual = data.y - (data.X @ w + b)
    assert np.std(residual) < 0.2
    _, w2, _ = synthetic_regression(seed=8)
    assert not np.allclose(w, w2)
    _, test = load_builtin("synthetic", seed=7)
    assert np.abs(test.y - (test.X @ w + b)).max() < 1.0


def test_unknown_builtin_lists_known_names() -> None:
    with pytest.raises(DataError) as info:
        load_builtin("mnist")
    message = str(info.value)
    assert "mnist" in message
    assert all(name in message for name in EXPECTED)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_bad_test_fraction(fraction: float) -> None:
    with pytest.raises(DataError, match="test_fraction"):
        load_builtin("iris", test_fraction=fraction)


# ---------------------------------------------------------------- Dataset


def test_subset_keeps_n_classes_and_selects_rows() -> None:
    train, _ = load_builtin("iris", seed=0)
    only_zero = np.flatnonzero(train.y == 0)
    sub = train.subset(only_zero)
    assert sub.n_classes == 3 and set(sub.y) == {0}
    np.testing.assert_array_equal(sub.X, train.X[only_zero])
    with pytest.raises(DataError):
        train.subset([train.n_samples])


def test_dataset_rejects_labels_out_of_range() -> None:
    with pytest.raises(DataError):
        Dataset(np.zeros((2, 1)), np.array([0, 2]), ("a",), "y", "classification", 2)


# ---------------------------------------------------------------- partitions


def assert_partition(parts: list[np.ndarray], n: int, n_parties: int) -> None:
    assert len(parts) == n_parties
    joined = np.concatenate(parts)
    assert joined.size == n, "parts overlap or miss samples"
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


@pytest.mark.parametrize(("n", "parties"), [(10, 3), (569, 5), (7, 7), (5, 1)])
def test_iid_is_disjoint_complete_and_balanced(n: int, parties: int) -> None:
    parts = partition_iid(n, parties, seed=0)
    assert_partition(parts, n, parties)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_is_shuffled_and_seeded() -> None:
    a = partition_iid(100, 4, seed=1)
    b = partition_iid(100, 4, seed=1)
    c = partition_iid(100, 4, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert not np.array_equal(a[0], np.arange(25))


@pytest.mark.parametrize(("n", "parties"), [(5, 0), (5, 6), (0, 1)])
def test_party_count_out_of_range(n: int, parties: int) -> None:
    with pytest.raises(DataError) as info:
        partition_iid(n, parties, seed=0)
    assert str(n) in str(info.value) and str(parties) in str(info.value)
    with pytest.raises(DataError):
        partition_dirichlet(np.zeros(n, dtype=int), parties, alpha=1.0, seed=0, min_size=0)


def test_dirichlet_is_disjoint_complete_and_seeded() -> None:
    labels = np.repeat(np.arange(5), 60)
    parts = partition_dirichlet(labels, 6, alpha=0.5, seed=0)
    assert_partition(parts, labels.size, 6)
    again = partition_dirichlet(labels, 6, alpha=0.5, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again, strict=True))


def test_small_alpha_skews_labels_more_than_large_alpha() -> None:
    labels = np.repeat(np.arange(10), 100)
    skewed = entropy_per_party(labels, partition_dirichlet(labels, 10, alpha=0.1, seed=0))
    even = entropy_per_party(labels, partition_dirichlet(labels, 10, alpha=100.0, seed=0))
    assert even > 0.95 * np.log(10)
    assert skewed < 0.6 * even


def test_dirichlet_respects_min_size() -> None:
    labels = np.repeat(np.arange(10), 100)
    first_draw = partition_dirichlet(labels, 10, alpha=0.3, seed=0, min_size=0)
    assert min(p.size for p in first_draw) < 60, "this seed must need a resample"
    parts = partition_dirichlet(labels, 10, alpha=0.3, seed=0, min_size=60)
    assert min(p.size for p in parts) >= 60
    assert_partition(parts, labels.size, 10)


def test_dirichlet_gives_up_after_bounded_tries() -> None:
    labels = np.repeat(np.arange(2), 50)
    with pytest.raises(DataError, match="tries"):
        partition_dirichlet(labels, 10, alpha=0.01, seed=0, min_size=9)


def test_dirichlet_impossible_min_size() -> None:
    with pytest.raises(DataError, match="min_size"):
        partition_dirichlet(np.zeros(10, dtype=int), 3, alpha=1.0, seed=0, min_size=4)


# ---------------------------------------------------------------- CSV


GOOD = "a,b,label\n1,2.5,0\n3,-4e-1,2\n\n5,6,2\n"


def test_load_csv_good_file(tmp_path: Path) -> None:
    data = load_csv(write(tmp_path / "d.csv", GOOD), "label")
    assert data.feature_names == ("a", "b") and data.target_name == "label"
    np.testing.assert_array_equal(data.X, [[1, 2.5], [3, -0.4], [5, 6]])
    assert data.task == "classification" and data.n_classes == 2
    np.testing.assert_array_equal(data.y, [0, 1, 1])
    assert data.X.dtype == np.float64 and data.y.dtype == np.int64


def test_target_in_the_middle(tmp_path: Path) -> None:
    data = load_csv(write(tmp_path / "d.csv", "a,y,b\n1,0.5,2\n3,1.5,4\n"), "y", task="regression")
    assert data.feature_names == ("a", "b")
    np.testing.assert_array_equal(data.X, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(data.y, [0.5, 1.5])


def test_task_inference(tmp_path: Path) -> None:
    few = "x,y\n" + "".join(f"{i},{i % 20}\n" for i in range(40))
    many = "x,y\n" + "".join(f"{i},{i % 21}\n" for i in range(42))
    fractional = "x,y\n1,0.5\n2,1\n"
    assert load_csv(write(tmp_path / "few.csv", few), "y").task == "classification"
    assert load_csv(write(tmp_path / "many.csv", many), "y").task == "regression"
    assert load_csv(write(tmp_path / "frac.csv", fractional), "y").task == "regression"
    forced = load_csv(tmp_path / "few.csv", "y", task="regression")
    assert forced.task == "regression" and forced.y.dtype == np.float64


def test_labels_map_in_sorted_order(tmp_path: Path) -> None:
    data = load_csv(write(tmp_path / "d.csv", "x,y\n1,7\n2,-3\n3,5\n4,7\n"), "y")
    np.testing.assert_array_equal(data.y, [2, 0, 1, 2])
    assert data.n_classes == 3


def test_classes_fix_the_label_mapping(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "x,y\n1,2\n2,2\n")
    data = load_csv(path, "y", classes=[0, 1, 2])
    np.testing.assert_array_equal(data.y, [2, 2])
    assert data.n_classes == 3 and data.task == "classification"


def test_label_outside_classes(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "x,y\n1,0\n2,5\n")
    with pytest.raises(DataError) as info:
        load_csv(path, "y", classes=[0, 1])
    message = str(info.value)
    assert "d.csv" in message and "line 3" in message and "'y'" in message and "5" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nothere\.csv"):
        load_csv(tmp_path / "nothere.csv", "y")


@pytest.mark.parametrize("text", ["", "a,b,y\n", "a,b,y\n\n\n"])
def test_empty_file_or_no_rows(tmp_path: Path, text: str) -> None:
    with pytest.raises(DataError) as info:
        load_csv(write(tmp_path / "empty.csv", text), "y")
    assert "empty.csv" in str(info.value)
    assert "empty" in str(info.value) or "no data rows" in str(info.value)


def test_missing_target_lists_columns(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_csv(write(tmp_path / "d.csv", "alpha,beta\n1,2\n"), "label")
    message = str(info.value)
    assert "d.csv" in message and "'label'" in message
    assert "alpha" in message and "beta" in message


def test_header_mismatch_names_missing_and_extra(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "a,c,y\n1,2,0\n")
    with pytest.raises(DataError) as info:
        load_csv(path, "y", expected_columns=["a", "b", "y"])
    message = str(info.value)
    assert "d.csv" in message
    assert "missing columns: ['b']" in message and "extra columns: ['c']" in message


def test_header_in_another_order_is_matched_by_name(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "b,a,y\n1,2,0\n")
    data = load_csv(path, "y", expected_columns=["a", "b", "y"])
    assert data.feature_names == ("a", "b") and data.X.tolist() == [[2.0, 1.0]]
    assert load_csv(path, "y", expected_columns=["b", "a", "y"]).X.tolist() == [[1.0, 2.0]]


def test_duplicate_header(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dup\.csv.*'a' appears twice"):
        load_csv(write(tmp_path / "dup.csv", "a,a,y\n1,2,0\n"), "y")


@pytest.mark.parametrize(
    ("body", "line", "column", "words"),
    [
        ("1,2,0\n3,abc,1\n", 3, "b", "'abc' is not a number"),
        ("1,2,0\n\n3,4,1\n5,6,x1\n", 5, "y", "'x1' is not a number"),
        ("1,,0\n", 2, "b", "empty cell"),
        ("1,2,0\n3\n", 3, "b", "empty cell"),
        ("1,2,0\nNaN,2,0\n", 3, "a", "missing value"),
        ("1,inf,0\n", 2, "b", "infinite"),
        ("1,2,0\n3,4,-Infinity\n", 3, "y", "infinite"),
    ],
)
def test_bad_cell_names_file_line_column(
    tmp_path: Path, body: str, line: int, column: str, words: str
) -> None:
    path = write(tmp_path / "bad.csv", "a,b,y\n" + body)
    with pytest.raises(DataError) as info:
        load_csv(path, "y")
    message = str(info.value)
    assert "bad.csv" in message
    assert f"line {line}," in message
    assert f"column '{column}'" in message
    assert words in message


def test_row_with_too_many_fields(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_csv(write(tmp_path / "wide.csv", "a,b,y\n1,2,0\n1,2,3,4\n"), "y")
    assert "wide.csv" in str(info.value) and "line 3" in str(info.value)


def test_bad_task_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="task"):
        load_csv(write(tmp_path / "d.csv", GOOD), "label", task="clustering")


# ---------------------------------------------------------------- party directories


def make_parties(directory: Path, numbers: list[int]) -> None:
    directory.mkdir(exist_ok=True)
    for n in numbers:
        write(directory / f"party-{n}.csv", f"a,b,y\n{n},1,0\n{n},2,1\n")


def test_party_files_sort_numerically(tmp_path: Path) -> None:
    make_parties(tmp_path, [10, 2, 1])
    write(tmp_path / "test.csv", "a,b,y\n0,0,0\n")
    write(tmp_path / "notes.txt", "ignore me")
    names = [p.name for p in find_party_files(tmp_path)]
    assert names == ["party-1.csv", "party-2.csv", "party-10.csv"]
    assert load_party(tmp_path, 2, "y").X[0, 0] == 10
    assert load_party(tmp_path, 1, "y").X[0, 0] == 2


def test_missing_dir_or_no_party_files(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        find_party_files(tmp_path / "absent")
    assert "absent" in str(info.value) and "party-" in str(info.value)
    with pytest.raises(DataError) as info:
        find_party_files(tmp_path)
    assert str(tmp_path) in str(info.value) and "party-<N>.csv" in str(info.value)


def test_badly_named_party_file(tmp_path: Path) -> None:
    make_parties(tmp_path, [1])
    write(tmp_path / "party-final.csv", "a,b,y\n1,1,0\n")
    with pytest.raises(DataError, match=r"party-final\.csv"):
        find_party_files(tmp_path)


def test_party_index_out_of_range(tmp_path: Path) -> None:
    make_parties(tmp_path, [1, 2])
    for index in (2, -1):
        with pytest.raises(DataError) as info:
            load_party(tmp_path, index, "y")
        assert str(index) in str(info.value) and "0..1" in str(info.value)


def test_mismatched_party_header_names_that_file(tmp_path: Path) -> None:
    make_parties(tmp_path, [1, 2, 3])
    write(tmp_path / "party-3.csv", "a,c,y\n1,1,0\n")
    assert load_party(tmp_path, 1, "y").n_samples == 2
    with pytest.raises(DataError) as info:
        load_party(tmp_path, 2, "y")
    message = str(info.value)
    assert "party-3.csv" in message and "'b'" in message and "'c'" in message


def test_load_party_passes_classes(tmp_path: Path) -> None:
    make_parties(tmp_path, [1])
    write(tmp_path / "party-2.csv", "a,b,y\n1,1,1\n2,2,1\n")
    alone = load_party(tmp_path, 1, "y")
    shared = load_party(tmp_path, 1, "y", classes=[0, 1])
    np.testing.assert_array_equal(alone.y, [0, 0])
    np.testing.assert_array_equal(shared.y, [1, 1])
    assert shared.n_classes == 2


def test_load_test_present_and_absent(tmp_path: Path) -> None:
    make_parties(tmp_path, [1])
    assert load_test(tmp_path, "y") is None
    write(tmp_path / "test.csv", "a,b,y\n7,8,1\n")
    header = read_header(tmp_path / "party-1.csv")
    test = load_test(tmp_path, "y", expected_columns=header, classes=[0, 1])
    assert test is not None
    np.testing.assert_array_equal(test.X, [[7, 8]])
    np.testing.assert_array_equal(test.y, [1])
    write(tmp_path / "test.csv", "a,z,y\n7,8,1\n")
    with pytest.raises(DataError, match=r"test\.csv"):
        load_test(tmp_path, "y", expected_columns=header)


def test_alpha_gives_label_skewed_party_shares():
    from fedhe.data.sources import DataSource, party_data

    iid = DataSource("digits", n_parties=5, seed=0)
    skewed = DataSource("digits", n_parties=5, seed=0, alpha=0.3)

    def spread(source):
        shares = [np.bincount(party_data(source, i).y, minlength=10) for i in range(5)]
        fractions = np.array([s / s.sum() for s in shares])
        return float(np.mean(np.std(fractions, axis=0)))

    assert spread(skewed) > 3 * spread(iid)
    total = sum(party_data(skewed, i).n_samples for i in range(5))
    assert total == sum(party_data(iid, i).n_samples for i in range(5))
