from dataclasses import fields

import pytest

from fedhe.cli import main
from fedhe.config import (
    CONSTRAINTS,
    SECTIONS,
    SHARED_SETTINGS,
    ConfigError,
    JobConfig,
    KnnSettings,
)


def test_run_config_round_trips_and_coerces_types():
    config = JobConfig.of(parties=7, min_parties=4, lr=0.05, hidden="16,8")
    assert JobConfig.from_run_config(config.to_run_config()) == config
    parsed = JobConfig.from_run_config({"parties": "6", "plaintext-twin": "false", "lr": 1})
    assert parsed.parties == 6 and parsed.plaintext_twin is False
    assert parsed.training.lr == 1.0 and isinstance(parsed.training.lr, float)
    assert parsed.hidden_widths == ()
    assert config.hidden_widths == (16, 8)


def test_the_run_config_stays_flat_with_dashed_keys():
    run_config = JobConfig.of(task="knn", k=3, query_batch=8).to_run_config()
    assert run_config["k"] == 3 and run_config["query-batch"] == 8
    assert run_config["task"] == "knn" and run_config["local-epochs"] == 2
    assert all(not isinstance(v, KnnSettings) for v in run_config.values())


def test_flat_settings_land_in_their_sections():
    config = JobConfig.of(task="knn", parties=4, k=3, query="encrypted", querier=2, queries=10)
    assert config.knn == KnnSettings(k=3, query="encrypted")
    assert (config.inference.querier, config.inference.queries) == (2, 10)
    assert config == JobConfig(
        task="knn",
        parties=4,
        knn=KnnSettings(k=3, query="encrypted"),
        inference=config.inference,
    )
    changed = config.with_settings(resume=True, query="plain")
    assert changed.resume and changed.knn.query == "plain" and changed.knn.k == 3


def test_every_setting_has_one_row_of_constraints_and_one_home():
    names = JobConfig().settings()
    assert set(CONSTRAINTS) == set(names)
    homes = list(SHARED_SETTINGS) + [f.name for s in SECTIONS.values() for f in fields(s)]
    assert sorted(homes) == sorted(names)  # no setting in two places


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"partys": 3}, "unknown setting 'partys' \\(did you mean 'parties'\\?\\)"),
        ({"parties": "many"}, "'parties'='many' is not an int"),
        ({"parties": 2.5}, "is not an int"),
        ({"parties": True}, "is not an int"),
        ({"parties": 3, "min-parties": 5}, "min-parties must be between 1 and parties=3, got 5"),
        ({"rounds": 0}, "rounds must be ≥ 1, got 0"),
        ({"clip": 0.5}, "clip must be ≥ 1 \\(it also bounds the sample counts\\), got 0.5"),
        ({"lr": 0}, "lr must be > 0"),
        ({"seed": -1}, "seed must be between 0 and 4294967295, got -1"),
        ({"timeout-s": 0}, "timeout-s must be > 0"),
        ({"hidden": "8,x"}, "comma-separated"),
        ({"hidden": "8,0"}, "positive widths"),
        ({"data-dir": "somewhere"}, "needs --target"),
        ({"task": "mlp-v2"}, "task 'mlp-v2' is not one of"),
        ({"task": "knn", "query": "fuzzy"}, "query 'fuzzy' is not one of"),
        ({"optimizer": "rmsprop"}, "optimizer 'rmsprop' is not one of"),
        ({"task": "mlp", "activation": "relu"}, "polynomial activation"),
        ({"activation": "tanh"}, "is not one of"),
        ({"task": "knn", "k": 0}, "k must be ≥ 1, got 0"),
        ({"task": "knn", "querier": 9}, "querier must be a party index 0..4, got 9"),
        ({"task": "logreg", "mode": "exact"}, "no exact mode"),
        ({"task": "mlp", "batch-size": 0}, "batch-size 0 \\(all local samples\\) is for linreg"),
        ({"keyholders": "two"}, "keyholders must be a count ≥ 1 or 'parties'"),
        ({"keyholders": 3, "threshold": 4}, "threshold must be between 1 and the 3 key holders"),
        ({"keyholders": 3, "threshold": 1}, "threshold 1 lets any one key holder"),
        ({"keyholders": 3, "threshold": 2, "packing": "quantized"}, "quantized packing"),
        ({"plaintext-twin": "maybe"}, "is not a bool"),
    ],
)
def test_bad_settings_name_the_problem(settings, match):
    with pytest.raises(ConfigError, match=match):
        JobConfig.from_run_config(settings)


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"task": "linreg", "k": 3}, "k=3 applies to task knn only; task linreg would ignore it"),
        ({"task": "knn", "lr": 0.5, "batch-size": 8}, "batch-size=8, lr=0.5 apply to tasks"),
        ({"task": "aggregate", "mode": "gradient"}, "mode='gradient' applies to tasks linreg"),
        ({"task": "logreg", "hidden": "8"}, "hidden='8' applies to tasks aggregate, mlp only"),
        ({"task": "knn", "single-queries": 1}, "single-queries=1 applies to task mlp only"),
        ({"task": "aggregate", "queries": 10}, "queries=10 applies to tasks knn, mlp only"),
    ],
)
def test_a_setting_the_task_would_ignore_is_refused(settings, match):
    with pytest.raises(ConfigError, match=match):
        JobConfig.from_run_config(settings)


def test_settings_of_other_tasks_at_their_defaults_are_accepted():
    """Flower's run_config (pyproject.toml) lists every setting, with its default."""
    config = JobConfig.from_run_config({**JobConfig().to_run_config(), "task": "knn", "k": 3})
    assert config.task == "knn" and config.knn.k == 3
    assert JobConfig.of(task="linreg", k=5, local_epochs=2).regression_mode == "exact"


def test_derived_settings_follow_the_task():
    mlp = JobConfig.of(task="mlp", parties=4, keyholders="3", threshold=2)
    assert (mlp.hidden_widths, mlp.activation_name, mlp.dataset_name) == ((32,), "square", "digits")
    assert (mlp.num_nodes, mlp.decryption_threshold, mlp.keyholder_node) == (7, 2, 4)
    assert JobConfig.of(task="logreg").regression_mode == "gradient"
    shared = JobConfig.of(task="knn", parties=4, keyholders="parties", threshold=3)
    assert shared.parties_hold_keys and shared.num_nodes == 4 and shared.keyholder_count == 4


def test_cli_reports_bad_settings_without_starting_flower(capsys):
    code = main(["simulate", "aggregate", "--parties", "3", "--min-parties", "5"])
    assert code == 2
    assert "min-parties must be between 1 and parties=3" in capsys.readouterr().err


def test_cli_refuses_an_option_of_another_task(capsys):
    assert main(["simulate", "linreg", "--k", "3"]) == 2
    assert "k=3 applies to task knn only; task linreg would ignore it" in capsys.readouterr().err


def test_cli_groups_the_options_by_the_tasks_that_read_them(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    help_text = capsys.readouterr().out
    assert "knn settings (task knn only)" in help_text
    assert "training settings (tasks aggregate, mlp, linreg, logreg only)" in help_text
    assert "--query-batch" in help_text and "--plaintext-twin" not in help_text


def test_cli_refuses_zero_simulation_workers(capsys):
    assert main(["simulate", "aggregate", "--workers", "0"]) == 2
    assert "workers must be ≥ 1" in capsys.readouterr().err


def test_auto_packing_is_the_default_for_updates_and_others_are_refused():
    assert JobConfig().fedavg.packing == "auto"
    with pytest.raises(ConfigError, match="packing 'real'"):
        JobConfig.of(packing="real")


def test_a_classifying_task_refuses_a_regression_dataset_up_front():
    from fedhe.config import REGRESSION_DATASETS
    from fedhe.data.datasets import BUILTIN_DATASETS

    regression = {name for name, spec in BUILTIN_DATASETS.items() if spec.task == "regression"}
    assert set(REGRESSION_DATASETS) == regression
    for task in ("aggregate", "logreg", "mlp"):
        with pytest.raises(ConfigError, match=r"diabetes has a continuous target.*use linreg"):
            JobConfig.of(task=task, dataset="diabetes")
    JobConfig.of(task="knn", dataset="diabetes")  # knn regresses too
