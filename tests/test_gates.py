"""The house rules as gates: lint and the layer contracts, run by the test command so a newcomer's run and CI
enforce the same thing (configured in pyproject.toml: [tool.ruff], [tool.importlinter])."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The repository keeps the subpackages beside doctor/; installed, they sit inside adapter_doctor/.
LAYOUT = {"adapter_doctor": "doctor", "adapter_doctor/runtime": "runtime", "adapter_doctor/kernels": "kernels",
          "adapter_doctor/fixers": "fixers"}


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[torch,test]'"
    return found


def test_ruff_finds_nothing():
    result = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_layers_import_one_way(tmp_path):
    # import-linter reads the package from disk as it is installed, so lay the tree out that way.
    for target, source in LAYOUT.items():
        shutil.copytree(ROOT / source, tmp_path / target, ignore=shutil.ignore_patterns("__pycache__"),
                        dirs_exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([_tool("lint-imports"), str(ROOT / "pyproject.toml")], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
