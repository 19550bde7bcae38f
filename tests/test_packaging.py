"""The Flower app config in pyproject.toml is what `flwr run` hands the ServerApp."""

import tomllib
from pathlib import Path

from fedhe.config import JobConfig

ROOT = Path(__file__).resolve().parent.parent


def test_flwr_run_config_covers_every_setting_with_the_defaults():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    run_config = pyproject["tool"]["flwr"]["app"]["config"]
    defaults = JobConfig().to_run_config()
    assert set(run_config) == set(defaults)  # `flwr run --run-config k=v` only takes declared keys
    config = JobConfig.from_run_config(run_config).to_run_config()
    # `out` differs; `flwr run .` simulations await 16 replies at a time (the engine's window).
    assert config["message-window"] == 16
    for key, default in defaults.items():
        if key not in ("out", "message-window"):
            assert config[key] == default, key


def test_apps_load_from_the_components_flower_names():
    import importlib

    components = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "components"
    ]
    for reference in components.values():
        module, attribute = reference.split(":")
        assert getattr(importlib.import_module(module), attribute) is not None
