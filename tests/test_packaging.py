"""The repository's four folders install as one import package, and nothing shadows other libraries."""
import importlib.util
import subprocess
import sys
import zipfile

from conftest import ROOT

FOLDERS = ("kernels", "runtime", "fixers", "doctor")  # the repository's folders, never importable by these names


def test_wheel_has_one_top_level_package(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("adapter_doctor-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"adapter_doctor"}
    for sub in ("fixers", "runtime", "kernels", "checks", "knowledge"):
        assert f"adapter_doctor/{sub}/__init__.py" in names
    assert "adapter_doctor/knowledge/peft_releases.json" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "doctor = adapter_doctor.cli:run" in text and "adapter-doctor = adapter_doctor.cli:run" in text


def test_installed_package_maps_the_repository_folders():
    import adapter_doctor.fixers
    import adapter_doctor.kernels
    import adapter_doctor.runtime

    assert adapter_doctor.kernels.__file__.startswith(str(ROOT / "kernels"))
    assert adapter_doctor.runtime.__file__.startswith(str(ROOT / "runtime"))
    assert adapter_doctor.fixers.__file__.startswith(str(ROOT / "fixers"))


def test_no_top_level_module_of_ours_is_importable(tmp_path):
    # Run from an empty folder so the working directory cannot put the repository on sys.path. A module of that
    # name from elsewhere (transformers 5.25 installs a `kernels` package, into a virtualenv that may sit inside
    # the repository) is not ours: only the repository's own folders count.
    code = ("import importlib.util, os, sys; "
            "print([n for n in sys.argv[2:] "
            "if (s := importlib.util.find_spec(n)) and s.origin "
            "and s.origin.startswith(os.path.join(sys.argv[1], n, ''))])")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), *FOLDERS], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert importlib.util.find_spec("adapter_doctor") is not None


def test_tests_see_none_of_our_folders_by_their_bare_names():
    assert [name for name in FOLDERS
            if (spec := importlib.util.find_spec(name)) and spec.origin
            and spec.origin.startswith(str(ROOT / name) + "/")] == []


def test_python_dash_m_pytest_from_the_root_leaves_the_root_off_the_path():
    # `python -m` puts the working directory first on sys.path; conftest takes it off again, or our kernels/
    # folder would stand in for Hugging Face's `kernels`, which transformers >= 5.25 imports.
    test = f"{__file__}::test_tests_see_none_of_our_folders_by_their_bare_names"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "--no-cov", test], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout[-2000:]
