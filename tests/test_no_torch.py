"""Checking files must not import torch, transformers, peft or triton."""
import json
import subprocess
import sys

from conftest import DATA

HEAVY = ("torch", "transformers", "peft", "triton", "accelerate")


def test_doctor_check_imports_no_ml_framework(tmp_path):
    targets = [str(p) for p in sorted((DATA / "real-adapters").iterdir()) if p.is_dir()]
    code = (
        "import sys, json\n"
        "from adapter_doctor.cli import main\n"
        "try:\n"
        "    main(['check', '--format', 'json', *sys.argv[1:]])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *targets], cwd=tmp_path, capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == []
    report = json.loads(out.stdout[: out.stdout.rindex("\n[")])
    assert report["summary"]["targets"] == len(targets)  # it really checked them, .bin files included


def test_doctor_fix_for_renames_imports_no_ml_framework(tmp_path):
    from conftest import FIXTURES

    code = (
        "import sys, json\n"
        "from adapter_doctor.cli import main\n"
        "try:\n"
        "    main(['fix', '--out', sys.argv[2], sys.argv[1]])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(FIXTURES / "broken" / "keys-orig-mod"), str(tmp_path / "fixed")],
                         cwd=tmp_path, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert (tmp_path / "fixed" / "adapter_model.safetensors").exists()
