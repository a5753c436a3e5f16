"""The house rules as gates: lint, the layer contracts, types and the coverage floor, run by the test command so a
newcomer's run and CI enforce the same thing (configured in pyproject.toml: [tool.ruff], [tool.importlinter],
[tool.mypy], [tool.coverage])."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def installed_layout(tmp_path_factory) -> Path:
    """The source tree laid out as it installs (import-linter and mypy read the package from disk that way)."""
    root = tmp_path_factory.mktemp("layout")
    for target, source in LAYOUT.items():
        shutil.copytree(ROOT / source, root / target, ignore=shutil.ignore_patterns("__pycache__"),
                        dirs_exist_ok=True)
    return root


def test_the_contracts_name_every_module_of_the_doctor():
    """The contracts list the doctor's modules one by one (the subpackages share its root), so a new module
    must join them: else the kernels or the runtime could import it unseen."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    modules = {f"adapter_doctor.{p.stem}" for p in (ROOT / "doctor").glob("*.py") if not p.stem.startswith("__")}
    modules |= {f"adapter_doctor.{p.name}" for p in (ROOT / "doctor").iterdir() if (p / "__init__.py").is_file()}
    allowed = {"the runtime imports": {"adapter_doctor.provenance"},
               "the provenance format": {"adapter_doctor.provenance"}}
    for contract in contracts:
        if contract["source_modules"][0] in ("adapter_doctor.kernels", "adapter_doctor.runtime",
                                             "adapter_doctor.provenance"):
            spared = next((v for k, v in allowed.items() if contract["name"].startswith(k)), set())
            missing = sorted(modules - spared - set(contract["forbidden_modules"]))
            assert not missing, f"contract {contract['name']!r} does not forbid {missing}"


def test_the_layers_import_one_way(installed_layout):
    env = {**os.environ, "PYTHONPATH": str(installed_layout)}
    result = subprocess.run([_tool("lint-imports"), str(ROOT / "pyproject.toml")], cwd=installed_layout, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_the_core_type_checks(installed_layout):
    result = subprocess.run([_tool("mypy"), "--config-file", str(ROOT / "pyproject.toml"), "--no-incremental"],
                            cwd=installed_layout, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "Success: no issues found" in result.stdout
