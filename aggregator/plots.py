"""Figures a run leaves beside result.json (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the headless backend
from matplotlib.ticker import MaxNLocator


def accuracy_per_round(result: dict[str, Any], path: Path) -> Path | None:
    """Test accuracy per round, HE training vs its plaintext twin (and the central model)."""
    he = [h for h in result["encrypted"].get("history", []) if "accuracy" in h]
    if not he:
        return None
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([h["round"] for h in he], [h["accuracy"] for h in he], "o-", label="HE-FedAvg")
    twin = (result.get("plaintext") or {}).get("history", [])
    if twin:
        axes.plot(
            [h["round"] for h in twin],
            [h["accuracy"] for h in twin],
            "x--",
            label="plaintext FedAvg (twin)",
        )
    central = result.get("central")
    if central:
        axes.axhline(central["accuracy"], color="grey", linestyle=":", label="central (pooled)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("round")
    axes.set_ylabel("test accuracy")
    axes.set_title(f"fedhe {result['task']}: accuracy per round")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
