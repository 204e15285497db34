from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_pipelines_imports_no_search_stack() -> None:
    script = (
        "import sys\n"
        "import pipelines, pipelines.trial, pipelines.teacher, pipelines.data, pipelines.export, pipelines.latency\n"
        "assert 'pipelines.trial' in sys.modules\n"
        "print(','.join(sorted(m for m in ('ray', 'optuna', 'mlflow') if m in sys.modules)) or 'clean')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"
