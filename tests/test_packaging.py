"""The Flower app config in pyproject.toml is what `flwr run` hands the ServerApp."""

import tomllib
from dataclasses import fields
from pathlib import Path

from fedhe.config import JobConfig

ROOT = Path(__file__).resolve().parent.parent


def test_flwr_run_config_covers_every_setting_with_the_defaults():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    run_config = pyproject["tool"]["flwr"]["app"]["config"]
    names = {f.name.replace("_", "-") for f in fields(JobConfig)}
    assert set(run_config) == names  # `flwr run --run-config k=v` only takes declared keys
    config = JobConfig.from_run_config(run_config)
    defaults = JobConfig()
    for f in fields(JobConfig):
        if f.name not in {"out"}:
            assert getattr(config, f.name) == getattr(defaults, f.name), f.name


def test_apps_load_from_the_components_flower_names():
    import importlib

    components = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "components"
    ]
    for reference in components.values():
        module, attribute = reference.split(":")
        assert getattr(importlib.import_module(module), attribute) is not None
