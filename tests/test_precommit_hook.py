"""The shipped pre-commit hook, run by the real pre-commit against this repository."""
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import FIXTURES, ROOT

PRE_COMMIT = [sys.executable, "-m", "pre_commit"]


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True, capture_output=True)


def _try_repo(repo: Path, files: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*PRE_COMMIT, "try-repo", str(ROOT), "doctor-check", "--files", *files], cwd=repo,
                          capture_output=True, text=True, timeout=900)


def test_hook_passes_good_adapters_and_fails_bad_ones(tmp_path):
    repo = tmp_path / "models"
    repo.mkdir()
    _git(repo, "init", "-q")
    shutil.copytree(FIXTURES / "healthy" / "llama-lora", repo / "good")
    shutil.copytree(FIXTURES / "healthy" / "qwen3-lora", repo / "good2")
    shutil.copytree(FIXTURES / "broken" / "keys-orig-mod", repo / "compiled")
    shutil.copytree(FIXTURES / "broken" / "weights-lfs-pointer", repo / "lfs")
    _git(repo, "add", ".")
    good = ["good/adapter_config.json", "good/adapter_model.safetensors", "good2/adapter_config.json"]
    passed = _try_repo(repo, good)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "Passed" in passed.stdout
    for bad, why in (("compiled", "ADC501"), ("lfs", "ADC402")):
        failed = _try_repo(repo, [f"{bad}/adapter_config.json", f"{bad}/adapter_model.safetensors"])
        assert failed.returncode == 1, failed.stdout
        assert "Failed" in failed.stdout and why in failed.stdout
        assert failed.stdout.count(f"{bad}  (adapter)") == 1  # both files named, the folder checked once
