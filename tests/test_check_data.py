"""`fedhe check-data` and the checks every `simulate --data-dir` runs before Flower or Ray start:
one test per messy case a hospital's export shows, each with its one clear message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedhe import cli
from fedhe.config import JobConfig
from fedhe.data.checks import SMALL_FILE_ROWS, check_files, check_job_data
from fedhe.data.sources import DataSource, party_data
from fedhe.errors import DataError

HEADER = ("age", "sex", "bmi", "y")


def rows(n: int, seed: int, *, label: bool = False) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        age, sex, bmi = rng.normal(50, 10), rng.integers(0, 2), rng.normal(25, 4)
        y = int(rng.integers(0, 2)) if label else round(float(rng.normal(100, 20)), 3)
        out.append([f"{age:.1f}", str(sex), f"{bmi:.1f}", str(y)])
    return out


def write(path: Path, body: list[list[str]], header=HEADER, sep: str = ",") -> Path:
    text = "\n".join(sep.join(row) for row in [list(header), *body]) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def folder(tmp_path: Path, parties: int = 3, n: int = 30, *, label: bool = False) -> Path:
    """party-1.csv … party-N.csv and test.csv, all clean."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(1, parties + 1):
        write(data / f"party-{i}.csv", rows(n, seed=i, label=label))
    write(data / "test.csv", rows(n, seed=99, label=label))
    return data


def only_error(report) -> str:
    assert len(report.errors) == 1, report.render()
    return str(report.errors[0])


def test_clean_folder_is_ok_with_one_summary_line_per_file(tmp_path: Path) -> None:
    report = check_files(folder(tmp_path), "y", "linreg")
    assert report.ok and not report.warnings, report.render()
    lines = report.render().splitlines()
    assert len(lines) == 4 and all(line.startswith("ok: ") for line in lines)
    assert "30 rows, 3 feature columns" in lines[0]


def test_semicolon_file_says_so_once(tmp_path: Path) -> None:
    data = folder(tmp_path)
    write(data / "party-2.csv", rows(30, seed=2), sep=";")
    problem = check_files(data, "y", "linreg").errors
    assert len(problem) == 1
    text = str(problem[0])
    assert "party-2.csv: line 1" in text and "looks semicolon-separated" in text
    assert "'age;sex;bmi;y'" in text and "save it with commas" in text


def test_typo_in_target_suggests_the_column_once(tmp_path: Path) -> None:
    report = check_files(folder(tmp_path), "Y", "linreg")
    text = only_error(report)
    assert "target column 'Y' is not in the header" in text
    assert "did you mean 'y'?" in text and "also in party-2.csv" in text
    assert "ok: " not in report.render()  # no file whose error was folded reads as fine


def test_string_column_asks_for_a_schema_entry(tmp_path: Path) -> None:
    data = folder(tmp_path)
    body = rows(30, seed=2)
    for i, row in enumerate(body):
        row[1] = "male" if i % 2 else "female"
    write(data / "party-2.csv", body)
    text = only_error(check_files(data, "y", "linreg"))
    assert "party-2.csv: line 2, column 'sex', value 'female'" in text
    assert "column 'sex' holds text (e.g. 'female' on line 2)" in text
    assert "schema.json entry as categorical" in text


def test_stray_text_cell_and_decimal_comma(tmp_path: Path) -> None:
    data = folder(tmp_path)
    body = rows(30, seed=2)
    body[4][2] = '"25,5"'  # quoted, so the comma stays in the cell
    write(data / "party-2.csv", body)
    text = only_error(check_files(data, "y", "linreg"))
    assert "line 6, column 'bmi', value '25,5': not a number" in text
    assert "decimal point" in text


@pytest.mark.parametrize("cell", ["", "NA"])
def test_missing_cell_names_its_place_and_the_impute_option(tmp_path: Path, cell: str) -> None:
    data = folder(tmp_path)
    body = rows(30, seed=3)
    body[2][0] = cell
    body[7][0] = cell
    write(data / "party-3.csv", body)
    text = only_error(check_files(data, "y", "linreg"))
    assert f"party-3.csv: line 4, column 'age', value {cell!r}: missing value" in text
    assert "(and 1 more in this column: line 9)" in text
    assert "--impute mean" in text
    assert check_files(data, "y", "linreg", impute="mean").ok


def test_missing_label_is_never_imputed(tmp_path: Path) -> None:
    data = folder(tmp_path)
    body = rows(30, seed=3)
    body[0][3] = ""
    write(data / "party-3.csv", body)
    text = only_error(check_files(data, "y", "linreg", impute="mean"))
    assert "line 2, column 'y'" in text and "fill in the label" in text


def test_infinite_cell(tmp_path: Path) -> None:
    data = folder(tmp_path)
    body = rows(30, seed=1)
    body[0][2] = "inf"
    write(data / "party-1.csv", body)
    text = only_error(check_files(data, "y", "linreg"))
    assert "line 2, column 'bmi', value 'inf': infinite value" in text


def test_huge_cell_names_the_raw_value_not_its_square(tmp_path: Path) -> None:
    data = folder(tmp_path)
    body = rows(30, seed=2)
    body[5][2] = "1e12"
    write(data / "party-2.csv", body)
    text = only_error(check_files(data, "y", "linreg"))
    assert "party-2.csv: line 7, column 'bmi', value '1e12': 1e+12 is too large" in text
    assert "1e+24" not in text
    assert "change the column's unit" in text


def test_huge_target_of_a_regression_is_refused_too(tmp_path: Path) -> None:
    data = folder(tmp_path)
    body = rows(30, seed=2)
    body[0][3] = "123456789012345"
    write(data / "party-2.csv", body)
    assert "column 'y', value '123456789012345'" in only_error(check_files(data, "y", "linreg"))


def test_tiny_party_is_a_warning_not_an_error(tmp_path: Path) -> None:
    data = folder(tmp_path)
    write(data / "party-2.csv", rows(3, seed=2))
    report = check_files(data, "y", "linreg")
    assert report.ok
    (warning,) = report.warnings
    assert "party-2.csv" in str(warning) and "only 3 data rows" in str(warning)
    assert str(SMALL_FILE_ROWS) in str(warning)


def test_header_only_party_is_an_error(tmp_path: Path) -> None:
    data = folder(tmp_path)
    write(data / "party-2.csv", [])
    assert "party-2.csv: header only" in only_error(check_files(data, "y", "linreg"))


def test_columns_in_another_order_are_matched_by_name(tmp_path: Path) -> None:
    data = folder(tmp_path)
    body = rows(30, seed=2)
    order = [3, 2, 0, 1]  # y, bmi, age, sex
    write(
        data / "party-2.csv", [[row[i] for i in order] for row in body], [HEADER[i] for i in order]
    )
    assert check_files(data, "y", "linreg").ok
    source = DataSource(data_dir=str(data), target="y", n_parties=3, kind="regression")
    loaded = party_data(source, 1)
    assert loaded.feature_names == ("age", "sex", "bmi")
    np.testing.assert_array_equal(loaded.X, np.array([row[:3] for row in body], dtype=float))
    np.testing.assert_array_equal(loaded.y, np.array([row[3] for row in body], dtype=float))


def test_different_column_sets_are_an_error(tmp_path: Path) -> None:
    data = folder(tmp_path)
    write(data / "party-2.csv", [row[1:] for row in rows(30, seed=2)], HEADER[1:])
    text = only_error(check_files(data, "y", "linreg"))
    assert "party-2.csv: line 1: its columns differ from party-1.csv's" in text
    assert "missing: ['age']" in text


def test_every_problem_of_every_file_at_once(tmp_path: Path) -> None:
    data = folder(tmp_path)
    one = rows(30, seed=1)
    one[0][0], one[1][2] = "", "abc"
    write(data / "party-1.csv", one)
    three = rows(30, seed=3)
    three[9].append("7")  # a row with a field too many
    write(data / "party-3.csv", three)
    report = check_files(data, "y", "linreg")
    places = sorted((Path(p.file).name, p.line, p.column) for p in report.errors)
    assert places == [
        ("party-1.csv", 2, "age"),
        ("party-1.csv", 3, "bmi"),
        ("party-3.csv", 11, None),
    ], report.render()


def test_header_names_blank_and_duplicate(tmp_path: Path) -> None:
    path = write(tmp_path / "site.csv", [["1", "2", "3", "4"]], ("a", "", "a", "y"))
    messages = [p.message for p in check_files(path, "y").errors]
    assert "column 2 has no name" in messages
    assert "this name appears twice in the header" in messages


def test_empty_and_non_utf8_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("age,y\n1,2\ncafé,3\n".encode("latin-1"))
    assert "file is empty" in only_error(check_files(empty, "y"))
    text = only_error(check_files(latin, "y"))
    assert "latin.csv: line 3" in text and "not UTF-8" in text


def test_missing_file_and_missing_folder(tmp_path: Path) -> None:
    assert "nothere.csv: no such file" in only_error(check_files(tmp_path / "nothere.csv", "y"))
    config = JobConfig.of(task="linreg", parties=3, data_dir=str(tmp_path / "nope"), target="y")
    with pytest.raises(DataError, match="no such folder"):
        check_job_data(config)


def test_folder_without_test_csv(tmp_path: Path) -> None:
    data = folder(tmp_path)
    (data / "test.csv").unlink()
    assert "has no test.csv" in only_error(check_files(data, "y", "linreg"))


def test_a_single_site_file_needs_no_other_party_nor_test_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "hospital-a.csv", rows(30, seed=5))
    report = check_files(path, "y", "linreg")
    assert report.ok and report.render() == f"ok: {path}: 30 rows, 3 feature columns"


def test_classification_labels(tmp_path: Path) -> None:
    data = folder(tmp_path, label=True)
    assert check_files(data, "y", "logreg").ok
    body = rows(30, seed=2, label=True)
    body[3][3] = "2"
    write(data / "party-2.csv", body)
    report = check_files(data, "y", "logreg")
    messages = "\n".join(str(p) for p in report.errors)
    assert "logreg is binary but the labels are [0.0, 1.0, 2.0]" in messages
    assert "party-2.csv: line 5, column 'y', value '2': label not in test.csv" in messages
    body[3][3] = "0.5"
    write(data / "party-2.csv", body)
    text = only_error(check_files(data, "y", "aggregate"))
    assert "line 5, column 'y', value '0.5': a class label must be a whole number" in text


def test_party_with_one_class_only_gets_a_warning(tmp_path: Path) -> None:
    data = folder(tmp_path, label=True)
    body = rows(30, seed=2, label=True)
    for row in body:
        row[3] = "1"
    write(data / "party-2.csv", body)
    report = check_files(data, "y", "aggregate")
    assert report.ok
    assert "party-2.csv" in str(report.warnings[0]) and "every row has label 1" in str(
        report.warnings[0]
    )


def test_knn_outlier_row_names_its_most_extreme_cell(tmp_path: Path) -> None:
    data = folder(tmp_path, n=200)
    body = rows(200, seed=2)
    body[10][0] = "90000"  # age in the wrong unit: ~85 standard deviations out
    write(data / "party-2.csv", body)
    assert check_files(data, "y", "linreg").ok  # linreg encrypts no standardized point
    text = only_error(check_files(data, "y", "knn"))
    assert "party-2.csv: line 12, column 'age', value '90000'" in text
    assert "too far out for KNN" in text


def test_schema_categories(tmp_path: Path) -> None:
    data = folder(tmp_path)
    for i in (1, 2, 3):
        body = rows(30, seed=i)
        for j, row in enumerate(body):
            row[1] = "M" if j % 2 else "F"
        write(data / f"party-{i}.csv", body)
    test = rows(30, seed=99)
    for j, row in enumerate(test):
        row[1] = "M" if j % 2 else "F"
    test[4][1] = "m"
    write(data / "test.csv", test)
    schema = tmp_path / "schema.json"
    columns = {"age": {"type": "numeric"}, "sex": {"type": "categorical", "categories": ["F", "M"]}}
    columns["bmi"] = {"type": "numeric"}
    schema.write_text(json.dumps({"columns": columns}))
    text = only_error(check_files(data, "y", "linreg", schema))
    assert "test.csv: line 6, column 'sex', value 'm': not one of the schema's categories" in text
    test[4][1] = "M"
    write(data / "test.csv", test)
    assert check_files(data, "y", "linreg", schema).ok
    assert not check_files(data, "y", "linreg").ok  # without the schema 'sex' is text


def test_wrong_party_count_is_refused_before_the_run(tmp_path: Path) -> None:
    data = folder(tmp_path)
    config = JobConfig.of(task="linreg", parties=4, min_parties=2, data_dir=str(data), target="y")
    with pytest.raises(DataError, match=r"holds 3 party files but --parties is 4.*--parties 3"):
        check_job_data(config)
    check_job_data(config.with_settings(parties=3))


def test_check_data_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = folder(tmp_path)
    assert cli.main(["check-data", str(data / "party-1.csv"), "--target", "y"]) == 0
    body = rows(30, seed=2)
    body[5][2] = "1e12"
    write(data / "party-2.csv", body)
    capsys.readouterr()
    assert cli.main(["check-data", str(data), "--target", "y", "--task", "linreg"]) == 1
    out = capsys.readouterr().out
    assert "error: " in out and "value '1e12'" in out and "1 error:" in out


def test_simulate_on_bad_data_stops_before_flower_and_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import flwr.simulation

    def never(*_args, **_kwargs):
        raise AssertionError("Flower's simulation was started on data that cannot run")

    for name in dir(flwr.simulation):
        if name.startswith("run_"):
            monkeypatch.setattr(flwr.simulation, name, never)
    import ray

    monkeypatch.setattr(ray, "init", never)
    data = folder(tmp_path)
    write(data / "party-2.csv", rows(30, seed=2), sep=";")
    argv = ["simulate", "linreg", "--data-dir", str(data), "--target", "y", "--parties", "3"]
    # min-parties 3 of 3: the job could not leave the bad party out (with 2 it would, saying so)
    assert cli.main([*argv, "--min-parties", "3", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "party-2.csv: line 1" in err and "looks semicolon-separated" in err
    assert "Traceback" not in err and not ray.is_initialized()


def test_job_that_imputes_accepts_missing_feature_cells(tmp_path: Path) -> None:
    data = folder(tmp_path)
    body = rows(30, seed=2)
    body[3][2] = "NA"
    write(data / "party-2.csv", body)
    config = JobConfig.of(task="linreg", parties=3, min_parties=3, data_dir=str(data), target="y")
    with pytest.raises(DataError, match=r"party-2.csv: line 5, column 'bmi', value 'NA'"):
        check_job_data(config)
    check_job_data(config.with_settings(impute="mean"))


def test_a_bad_party_file_is_left_out_only_while_min_parties_hold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = folder(tmp_path)
    body = rows(30, seed=2)
    body[3][2] = "NA"
    write(data / "party-2.csv", body)
    config = JobConfig.of(task="linreg", parties=3, min_parties=2, data_dir=str(data), target="y")
    with caplog.at_level("WARNING", logger="fedhe.data"):
        check_job_data(config)  # 2 clean parties hold min-parties 2: the job goes on without it
    assert "goes on without party-2.csv while min-parties 2 hold" in caplog.text
    write(data / "test.csv", body)  # test.csv cannot be left out: the job stops
    with pytest.raises(DataError, match=r"value 'NA': missing value \(also in test.csv\)"):
        check_job_data(config)


def test_aggregator_folder_with_test_csv_only(tmp_path: Path) -> None:
    data = folder(tmp_path)
    for party in data.glob("party-*.csv"):
        party.unlink()
    report = check_files(data, "y", "knn")
    assert report.ok and report.render() == f"ok: {data / 'test.csv'}: 30 rows, 3 feature columns"


def test_a_party_whose_header_is_wrong_stops_the_run_even_above_min_parties(tmp_path: Path) -> None:
    """party-1.csv's header is the one every other file is read against: leaving it out
    would fail every party later, after the engine started."""
    data = folder(tmp_path)
    write(data / "party-1.csv", rows(30, seed=2), sep=";")
    config = JobConfig.of(task="linreg", parties=3, min_parties=2, data_dir=str(data), target="y")
    with pytest.raises(DataError, match="looks semicolon-separated"):
        check_job_data(config)


def test_logreg_on_three_classes_stops_the_run_even_above_min_parties(tmp_path: Path) -> None:
    data = folder(tmp_path)
    for name in ("party-1.csv", "party-2.csv", "party-3.csv", "test.csv"):
        body = rows(30, seed=len(name))
        for i, row in enumerate(body):
            row[-1] = str(i % 3)
        write(data / name, body)
    config = JobConfig.of(task="logreg", parties=3, min_parties=2, data_dir=str(data), target="y")
    with pytest.raises(DataError, match="cannot run this job"):
        check_job_data(config)


def test_a_folder_of_wrongly_named_party_files_is_an_error(tmp_path: Path) -> None:
    data = folder(tmp_path)
    for i, party in enumerate(sorted(data.glob("party-*.csv"))):
        party.rename(data / f"hospital-{'abc'[i]}.csv")
    report = check_files(data, "y", "linreg")
    assert not report.ok and "holds no party-<N>.csv but hospital-a.csv" in only_error(report)
