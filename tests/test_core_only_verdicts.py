"""The verdict without torch, transformers and PEFT equals the verdict with them installed.

A child process sees a copy of this interpreter's site-packages without the ML libraries (their files and their
dist-info both gone, as in the core-only install that pre-commit hooks use), and an import of any of them fails.
It checks every fixture and real adapter and plans `doctor fix` for the healthy ones; this process does the same
with whatever is installed here, judged against the same releases.
"""
from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

from adapter_doctor import Options, diagnose
from adapter_doctor.env import installed_version
from adapter_doctor.fixers import FixOptions, plan
from adapter_doctor.knowledge import peft_table
from adapter_doctor.transformers_renames import newest_release
from conftest import DATA, FIXTURES

BLOCKED = ("torch", "functorch", "torchgen", "transformers", "peft", "triton", "accelerate", "trl", "huggingface_hub")


def _adapters() -> list[Path]:
    found = {p.parent for root in (FIXTURES / "healthy", FIXTURES / "broken")
             for p in root.rglob("*") if p.name in ("adapter_config.json", "adapter_model.safetensors")}
    found |= {p for p in (DATA / "real-adapters").iterdir() if p.is_dir()}
    return sorted(found)


HEALTHY = sorted(p.parent for p in (FIXTURES / "healthy").rglob("adapter_config.json"))

CHILD = """
import importlib.abc, json, site, sys
site.addsitedir(sys.argv[1])
blocked = set(sys.argv[2].split(","))

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, Blocked())
from adapter_doctor import Options, diagnose
from adapter_doctor.env import installed_version
from adapter_doctor.fixers import FixOptions, plan
from verdicts import verdicts, plans

paths, healthy = json.loads(sys.argv[3]), json.loads(sys.argv[4])
print(json.dumps({
    "installed": {d: installed_version(d) for d in ("torch", "transformers", "peft")},
    "verdicts": verdicts(diagnose(paths, Options())),
    "plans": plans(plan, FixOptions(), healthy),
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in blocked),
}))
"""

HELPERS = """
def verdicts(report):
    out = {}
    for t in report.targets:
        out[t.path] = {"error": t.error, "findings": sorted([f.id, f.severity.value] for f in t.findings
                                                            if f.severity.value != "info"),
                       "info": sorted({f.id for f in t.findings if f.severity.value == "info"})}
    return out


def plans(plan, options, paths):
    out = {}
    for p in paths:
        try:
            made = plan(p, options)
        except Exception as exc:  # a folder of several adapters is refused as a whole, on both sides alike
            out[p] = {"error": type(exc).__name__}
            continue
        out[p] = {"edits": len(made.edits), "changes": len(made.changes), "refused": sorted(r.finding for r in made.refusals)}
    return out
"""


def _core_site(tmp: Path) -> Path:
    """This interpreter's site-packages, less the ML libraries: a folder of links to everything else."""
    site = tmp / "site"
    site.mkdir()
    for root in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]):
        for entry in Path(root).iterdir():
            top = entry.name.split("-")[0].split(".")[0].lower()
            if top in BLOCKED or top.startswith("nvidia") or (site / entry.name).exists():
                continue
            (site / entry.name).symlink_to(entry)
    (site / "verdicts.py").write_text(HELPERS)
    return site


def _here(paths: list[str], healthy: list[str]) -> dict:
    """The same run in this process, against the releases the child judges by (the newest known)."""
    newest_peft = peft_table().newest.version
    same = installed_version("transformers") in (None, newest_release()) and installed_version("peft") in (None, newest_peft)
    options = {} if same else {"target_transformers": newest_release(), "target_peft": newest_peft}
    namespace: dict = {}
    exec(HELPERS, namespace)  # noqa: S102 - the helpers the child runs, run here on this side
    return {"verdicts": namespace["verdicts"](diagnose(paths, Options(**options))),
            "plans": namespace["plans"](plan, FixOptions(**options), healthy)}


def test_verdicts_and_fix_plans_do_not_depend_on_transformers_being_installed(tmp_path):
    paths, healthy = [str(p) for p in _adapters()], [str(p) for p in HEALTHY]
    site = _core_site(tmp_path)
    out = subprocess.run([sys.executable, "-S", "-c", CHILD, str(site), ",".join(BLOCKED), json.dumps(paths),
                          json.dumps(healthy)], capture_output=True, text=True, timeout=600, cwd=FIXTURES.parent)
    assert out.returncode == 0, out.stderr[-4000:]
    child = json.loads(out.stdout.strip().splitlines()[-1])
    assert child["installed"] == {"torch": None, "transformers": None, "peft": None}
    assert child["loaded"] == []
    here = _here(paths, healthy)
    assert len(child["verdicts"]) == len(paths) > 90
    differ = {p: (child["verdicts"][p], here["verdicts"].get(p)) for p in child["verdicts"]
              if child["verdicts"][p]["error"] != here["verdicts"][p]["error"]
              or child["verdicts"][p]["findings"] != here["verdicts"][p]["findings"]}
    assert differ == {}
    assert child["plans"] == here["plans"]
    # The healthy VLM and MoE adapters in particular: no error, and nothing for `doctor fix` to rename.
    for name in ("v4/llava-lora", "qwen3moe-v5-target-parameters"):
        path = str(FIXTURES / "healthy" / name)
        assert not [f for f in child["verdicts"][path]["findings"] if f[1] == "error"]
        assert child["plans"][path] == {"edits": 0, "changes": 0, "refused": []}
        assert "ADC519" in child["verdicts"][path]["info"]  # and it says which layout it judged
