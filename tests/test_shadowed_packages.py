"""`python -m trainer` refuses to run with a user's `models` / `data` shadowing ours: one line naming
the shadowing path, exit 2."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = [sys.executable, "-m", "trainer", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--check",
         f"data.path={ROOT / 'examples' / 'quickstart_data'}"]


def _run(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(CHECK, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("decoy", ["models.py", "data.py", "models/__init__.py"])
def test_a_shadowing_module_stops_the_cli_with_one_line(tmp_path, decoy):
    path = tmp_path / decoy
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("raise SystemExit('the decoy was imported')\n")
    proc = _run(tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    shadow = tmp_path / decoy.split("/")[0]
    assert line.startswith("error: ") and str(shadow) in line and "rename" in line and "another directory" in line
    assert "decoy was imported" not in proc.stderr


def test_without_a_decoy_the_same_command_passes(tmp_path):
    (tmp_path / "unrelated.py").write_text("")
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "config OK" in proc.stderr
