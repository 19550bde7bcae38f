"""fedhe: federated learning on CKKS-encrypted contributions, carried by Flower."""

from pathlib import Path as _Path

# clients/ and aggregator/ stand at the repository root and install as fedhe.clients and
# fedhe.aggregator (pyproject's package-dir). Run from a source tree or a Flower app bundle,
# where no install mapped them, find them beside this package instead.
_root = _Path(__file__).resolve().parent.parent
if (_root / "aggregator" / "app.py").is_file() and (_root / "clients" / "app.py").is_file():
    __path__.append(str(_root))

__version__ = "0.1.0"

# The notebook API (fedhe/api.py, fedhe/model.py), imported on first use: `import fedhe` stays
# light (no torch, Flower or Ray until a job runs or a model loads).
_LAZY = {
    "simulate": "fedhe.api",
    "load_run": "fedhe.api",
    "RunResult": "fedhe.api",
    "load_model": "fedhe.model",
}
__all__ = ["RunResult", "load_model", "load_run", "simulate"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'fedhe' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
