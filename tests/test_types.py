"""The package type-checks under `mypy --strict` (settings in pyproject.toml), so CI keeps it so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_package_passes_mypy_strict() -> None:
    r = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "Success" in r.stdout
