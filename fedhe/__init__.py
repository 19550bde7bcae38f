"""fedhe: federated learning on CKKS-encrypted contributions, carried by Flower."""

from pathlib import Path as _Path

# clients/ and aggregator/ stand at the repository root and install as fedhe.clients and
# fedhe.aggregator (pyproject's package-dir). Run from a source tree or a Flower app bundle,
# where no install mapped them, find them beside this package instead.
_root = _Path(__file__).resolve().parent.parent
if (_root / "aggregator" / "app.py").is_file() and (_root / "clients" / "app.py").is_file():
    __path__.append(str(_root))

__version__ = "0.1.0"
