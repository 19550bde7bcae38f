"""The benchmark report renders from its JSON: benchmarks/README.md is exactly what
`simulations/benchmark.py --from-json benchmarks/benchmark.json` writes (nothing is run)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"


def test_report_renders_from_committed_json(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the report's plots need matplotlib (test extra)")
    command = [sys.executable, "simulations/benchmark.py", "--from-json"]
    command += [str(BENCHMARKS / "benchmark.json"), "--out-dir", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rendered = (tmp_path / "README.md").read_text()
    assert rendered == (BENCHMARKS / "README.md").read_text()
    plots = re.findall(r"^!\[([^]]+)\]", rendered, flags=re.MULTILINE)
    assert plots and all((tmp_path / name).stat().st_size > 0 for name in plots)
    assert not (tmp_path / "benchmark.json").exists()  # rendering writes no JSON
