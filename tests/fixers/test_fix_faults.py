"""Faults during `doctor fix --inplace`: SIGKILL at every instrumented point (plain, write-through and in-folder
symlinked weights), concurrent writes, immutable files, shared cache blobs. After each fault, and after the
next run, every original byte is recoverable and nothing the fixer made is left behind."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from adapter_doctor.cli import main
from adapter_doctor.fixers import FixWriteError, apply, plan
from adapter_doctor.fixers import planner as planner_module
from adapter_doctor.fixers.journal import KILL_ENV, POINTS
from click.testing import CliRunner
from conftest import broken, healthy

FILES = ("adapter_config.json", "adapter_model.safetensors")
LAYOUTS = ("plain", "linked-out", "linked-in")
WRITE_THROUGH = {"saved", "replaced"}  # points only a link to a file outside the folder passes


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make(base: Path, layout: str) -> Path:
    """A compiled-model save whose fix touches both files, its weights as `layout` says."""
    root = base / "adapter"
    shutil.copytree(broken("keys-orig-mod"), root)
    config = json.loads((root / "adapter_config.json").read_text())
    config["revision"] = "unsloth"
    (root / "adapter_config.json").write_text(json.dumps(config))
    weights = root / "adapter_model.safetensors"
    if layout == "linked-out":
        (base / "store").mkdir()
        weights.rename(base / "store" / "w.safetensors")
        weights.symlink_to(base / "store" / "w.safetensors")
    elif layout == "linked-in":
        (root / "blobs").mkdir()
        weights.rename(root / "blobs" / "w.safetensors")
        weights.symlink_to("blobs/w.safetensors")
    return root


def every_file(base: Path) -> dict[str, str]:
    out = {}
    for folder, _, names in os.walk(base):
        for name in names:
            path = Path(folder, name)
            if not path.is_symlink():
                out[str(path.relative_to(base))] = sha(path)
    return out


def shape(base: Path) -> list[str]:
    """Every path under `base`, with backup stamps made alike."""
    paths = []
    for folder, dirs, names in os.walk(base):
        for name in dirs + names:
            rel = Path(folder, name).relative_to(base).parts
            paths.append("/".join("STAMP" if i and rel[i - 1] == ".doctor-backup" else p for i, p in enumerate(rel)))
    return sorted(paths)


def view(root: Path) -> dict[str, str]:
    return {name: sha(root / name) for name in FILES}


def killed_at(point: str, root: Path) -> bool:
    """Run the fix in a child process that SIGKILLs itself at `point`; True if it got there."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.environ[KILL_ENV] = point
            apply(plan(root), inplace=True)
        except BaseException:  # noqa: BLE001 - the child reports any failure by its exit code
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, f"the fix failed at {point}"
    return False


def fix_cli(root: Path):
    return CliRunner().invoke(main, ["fix", "--inplace", "--yes", str(root)], catch_exceptions=False)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sigkill_at_every_point_then_the_next_run_recovers(tmp_path, layout):
    reference = tmp_path / "reference"
    root = make(reference, layout)
    original = view(root)
    assert fix_cli(root).exit_code == 0
    fixed = view(root)
    assert all(fixed[n] != original[n] for n in FILES) and plan(root).empty
    expected_shape = shape(reference)

    for point in POINTS:
        base = tmp_path / point
        root = make(base, layout)
        reached = killed_at(point, root)
        assert reached == (layout == "linked-out" or point not in WRITE_THROUGH), point
        assert set(original.values()) <= set(every_file(base).values()), f"{point}: an original byte is lost"
        if layout != "linked-out":  # a link out of the folder is written through: mixed until the next run
            assert view(root) in (original, fixed), f"{point}: a mix of old and new files"

        result = fix_cli(root)  # finishes or undoes the half-done fix, then fixes what is left
        assert result.exit_code == 0, (point, result.output)
        assert view(root) == fixed, point
        (backup,) = (root / ".doctor-backup").iterdir()
        assert {n: sha(backup / n) for n in FILES} == original, f"{point}: originals not all kept"
        assert shape(base) == expected_shape, f"{point}: leftovers"
        shutil.rmtree(base)


def test_every_point_is_reached_on_an_undisturbed_run(tmp_path, monkeypatch):
    from adapter_doctor.fixers import atomic, journal

    seen = []
    monkeypatch.setattr(journal, "crash_point", seen.append)
    monkeypatch.setattr(atomic, "crash_point", seen.append)
    apply(plan(make(tmp_path, "linked-out")), inplace=True)
    assert tuple(dict.fromkeys(seen)) == POINTS


def test_link_inside_the_folder_is_fixed_in_the_folder(tmp_path):
    root = make(tmp_path, "linked-in")
    original = (root / "blobs" / "w.safetensors").read_bytes()
    result = apply(plan(root), inplace=True)
    assert os.readlink(root / "adapter_model.safetensors") == "blobs/w.safetensors"
    assert (root / "blobs" / "w.safetensors").read_bytes() != original
    assert (result.backup / "adapter_model.safetensors").read_bytes() == original
    assert result.after.counts()["error"] == 0 and plan(root).empty


def hf_cache(tmp_path: Path) -> tuple[Path, Path]:
    """models--x/snapshots/{a,b}/ whose files link to one set of ../../blobs/<hash>."""
    repo = tmp_path / "models--org--adapter"
    source = make(tmp_path / "src", "plain")
    (repo / "blobs").mkdir(parents=True)
    for name in FILES:
        digest = sha(source / name)
        shutil.copy(source / name, repo / "blobs" / digest)
        for snapshot in ("a", "b"):
            (repo / "snapshots" / snapshot).mkdir(parents=True, exist_ok=True)
            (repo / "snapshots" / snapshot / name).symlink_to(f"../../blobs/{digest}")
    return repo, repo / "snapshots" / "a"


def test_shared_cache_blob_is_not_rewritten_without_out(tmp_path):
    repo, snapshot = hf_cache(tmp_path)
    before, before_shape = every_file(repo), shape(repo)
    result = fix_cli(snapshot)
    assert result.exit_code == 2
    assert "Hugging Face cache" in result.output and "--out" in result.output
    assert every_file(repo) == before and shape(repo) == before_shape
    assert not [p for p in tmp_path.rglob(".doctor-*")]
    out = tmp_path / "fixed"
    assert CliRunner().invoke(main, ["fix", "--out", str(out), str(snapshot)]).exit_code == 0
    assert every_file(repo) == before and plan(out).empty


def test_a_concurrent_write_during_planning_is_not_lost(tmp_path, monkeypatch):
    root = make(tmp_path, "plain")
    config = root / "adapter_config.json"
    real = planner_module.findings_of

    def meddling(check):
        found = real(check)
        config.write_text(config.read_text().replace('"r"', '"r" ', 1))  # someone saves while we plan
        return found

    monkeypatch.setattr(planner_module, "findings_of", meddling)
    p = plan(root)
    monkeypatch.undo()
    expected = every_file(tmp_path)
    with pytest.raises(FixWriteError, match="changed while it was being fixed") as err:
        apply(p, inplace=True)
    assert "\n" not in str(err.value)
    assert every_file(tmp_path) == expected and shape(tmp_path) == ["adapter"] + [f"adapter/{n}" for n in FILES]


def chattr(flag: str, path: Path) -> None:
    done = subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr {flag} does not work here: {done.stderr.strip() or done.returncode}")


@pytest.mark.skipif(shutil.which("chattr") is None, reason="chattr is not installed")
@pytest.mark.parametrize("layout", ["plain", "linked-out", "unchanged-file"])
def test_immutable_weights_are_refused_and_nothing_is_left(tmp_path, layout):
    """An immutable file can be neither replaced nor removed with the old folder: refuse before writing."""
    root = make(tmp_path, "plain" if layout == "unchanged-file" else layout)
    weights = (root / "adapter_model.safetensors").resolve()
    if layout == "unchanged-file":
        weights = root / "README.md"
        weights.write_text("a model card the fix does not change")
    before, before_shape = every_file(tmp_path), shape(tmp_path)
    chattr("+i", weights)
    try:
        result = fix_cli(root)
        assert result.exit_code == 2 and "immutable" in result.output, result.output
        assert every_file(tmp_path) == before and shape(tmp_path) == before_shape
    finally:
        subprocess.run(["chattr", "-i", str(weights)], check=False)


def test_a_fully_refused_fix_exits_one(tmp_path):
    args = ["fix", "--target-peft", "0.8.0", "--out", str(tmp_path / "x"), str(healthy("mistral-dora-rslora"))]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 1 and "refused" in result.output and not (tmp_path / "x").exists()


def test_temp_files_of_killed_runs_beside_a_link_target_are_removed(tmp_path):
    root = make(tmp_path, "linked-out")
    child = subprocess.Popen(["true"])
    child.wait()  # a process id that is surely gone
    store = tmp_path / "store"
    stale = [store / f".w.safetensors.20261201-093000-{child.pid}.tmp",  # an earlier release's name
             store / f".w.safetensors.doctor-20261201-093000-{child.pid}.tmp"]
    alive = store / f".w.safetensors.doctor-20261201-093000-{os.getpid()}.tmp"
    for path in [*stale, alive, store / "notes.tmp"]:
        path.write_bytes(b"new content")
    apply(plan(root), inplace=True)
    assert not any(p.exists() for p in stale) and alive.exists() and (store / "notes.tmp").exists()
