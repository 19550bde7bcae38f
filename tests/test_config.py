import pytest

from fedhe.cli import main
from fedhe.config import ConfigError, JobConfig


def test_run_config_round_trips_and_coerces_types():
    config = JobConfig(parties=7, min_parties=4, lr=0.05, hidden="16,8")
    assert JobConfig.from_run_config(config.to_run_config()) == config
    parsed = JobConfig.from_run_config({"parties": "6", "plaintext-twin": "false", "lr": 1})
    assert parsed.parties == 6 and parsed.plaintext_twin is False and parsed.lr == 1.0
    assert parsed.hidden_widths == ()
    assert config.hidden_widths == (16, 8)


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"partys": 3}, "unknown setting 'partys'"),
        ({"parties": "many"}, "is not a int"),
        ({"parties": 3, "min-parties": 5}, "between 1 and parties=3"),
        ({"rounds": 0}, "rounds must be"),
        ({"clip": 0.5}, "clip must be"),
        ({"hidden": "8,x"}, "comma-separated"),
        ({"data-dir": "somewhere"}, "needs --target"),
        ({"task": "mlp-v2"}, "is not one of"),
        ({"query": "fuzzy"}, "is not one of"),
        ({"optimizer": "rmsprop"}, "is not one of"),
        ({"task": "mlp", "activation": "relu"}, "polynomial activation"),
        ({"activation": "tanh"}, "is not one of"),
        ({"k": 0}, "must be ≥ 1"),
        ({"querier": 9}, "querier must be"),
        ({"plaintext-twin": "maybe"}, "is not a bool"),
    ],
)
def test_bad_settings_name_the_problem(settings, match):
    with pytest.raises(ConfigError, match=match):
        JobConfig.from_run_config(settings)


def test_cli_reports_bad_settings_without_starting_flower(capsys):
    code = main(["simulate", "aggregate", "--parties", "3", "--min-parties", "5"])
    assert code == 2
    assert "min-parties must be between 1 and parties=3" in capsys.readouterr().err


def test_cli_refuses_zero_simulation_workers(capsys):
    assert main(["simulate", "aggregate", "--workers", "0"]) == 2
    assert "workers must be ≥ 1" in capsys.readouterr().err


def test_auto_packing_is_the_default_for_updates_and_others_are_refused():
    assert JobConfig().packing == "auto"
    with pytest.raises(ConfigError, match="packing 'real'"):
        JobConfig(packing="real")
