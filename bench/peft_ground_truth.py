"""Measure what real PEFT releases do when they load an ``adapter_config.json``.

The doctor predicts, without importing PEFT, how a given release will treat a
saved config. This harness produces the ground truth those predictions are
tested against: for each PEFT release it builds a throwaway virtualenv (CPU
torch, plus transformers/accelerate/huggingface_hub releases contemporaneous
with that PEFT), then runs a probe that repeats, for every input file, the
config-loading steps of that release's ``PeftModel.from_pretrained``:

* ``untyped``: ``PeftConfig.from_pretrained(dir)``;
* ``get_peft_type``: ``PeftConfig._get_peft_type(dir)``, which is what
  ``PeftModel.from_pretrained`` calls instead of the untyped step from 0.4 on
  (``skipped`` where the release lacks it; see ``from_pretrained_steps``);
* ``typed``: ``PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].from_pretrained(dir)``,
  with ``peft_type`` taken from the untyped result, else from the raw JSON.

Each step is recorded as ``loads``, ``warns`` or ``raises`` (``skipped`` when no
``peft_type`` is known), with the error, the config-related warnings, the
top-level keys that did not survive into the config object, and its class.

Run (needs the network for pip; takes a few minutes per new release)::

    python bench/peft_ground_truth.py [--versions 0.3.0,0.6.2] [--venvs DIR] \
        [--out PATH] [INPUT ...]

INPUT is a directory of ``*.json`` files or a single file; by default
``tests/data/real-adapter-configs/`` and ``tests/data/peft_ground_truth.json``.
Results for releases not measured in a run are kept from the existing output.
CI never runs this: it compares the doctor's predictions with the committed
table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"  # a CPU wheel on local disk; a bare "torch" pulls a CUDA build
# Old transformers/accelerate import pkg_resources; torch itself wants setuptools>=77.
COMMON = ["setuptools>=77.0.3,<81"]
# Per release: the transformers and accelerate published last before it (pinned
# exactly), and caps for the libraries they pull in, so old code meets the APIs
# it was written against. tokenizers 0.13.3 is the oldest with Python 3.11 wheels.
PINS: dict[str, list[str]] = {
    "0.1.0": ["transformers==4.26.1", "accelerate==0.16.0", "huggingface_hub<=0.12.0", "tokenizers<=0.13.3", "numpy<2"],
    "0.2.0": ["transformers==4.26.1", "accelerate==0.16.0", "huggingface_hub<=0.13.1", "tokenizers<=0.13.3", "numpy<2"],
    "0.3.0": ["transformers==4.28.1", "accelerate==0.18.0", "huggingface_hub<=0.14.1", "tokenizers<=0.13.3", "numpy<2"],
    "0.4.0": ["transformers==4.30.2", "accelerate==0.21.0", "huggingface_hub<=0.16.4", "tokenizers<=0.13.3", "numpy<2"],
    "0.5.0": ["transformers==4.31.0", "accelerate==0.21.0", "huggingface_hub<=0.16.4", "tokenizers<=0.13.3", "numpy<2"],
    "0.6.2": ["transformers==4.35.1", "accelerate==0.24.1", "huggingface_hub<=0.19.1", "tokenizers<=0.14.1", "numpy<2"],
    "0.7.1": ["transformers==4.36.0", "accelerate==0.25.0", "huggingface_hub<=0.19.4", "tokenizers<=0.15.0", "numpy<2"],
    "0.8.2": ["transformers==4.37.2", "accelerate==0.26.1", "huggingface_hub<=0.20.3", "tokenizers<=0.15.1", "numpy<2"],
    "0.9.0": ["transformers==4.38.1", "accelerate==0.27.2", "huggingface_hub<=0.21.2", "tokenizers<=0.15.2", "numpy<2"],
    "0.10.0": ["transformers==4.38.2", "accelerate==0.28.0", "huggingface_hub<=0.21.4", "tokenizers<=0.15.2", "numpy<2"],
    "0.11.1": ["transformers==4.40.2", "accelerate==0.30.1", "huggingface_hub<=0.23.0", "tokenizers<=0.19.1", "numpy<2"],
    "0.12.0": ["transformers==4.43.1", "accelerate==0.32.1", "huggingface_hub<=0.24.1", "tokenizers<=0.19.1", "numpy<2.1"],
    "0.13.2": ["transformers==4.45.2", "accelerate==1.0.1", "huggingface_hub<=0.25.2", "tokenizers<=0.20.1", "numpy<2.2"],
    "0.14.0": ["transformers==4.47.0", "accelerate==1.1.1", "huggingface_hub<=0.26.3", "tokenizers<=0.21.0", "numpy<2.2"],
    "0.15.2": ["transformers==4.51.3", "accelerate==1.6.0", "huggingface_hub<=0.30.2", "tokenizers<=0.21.1", "numpy<2.3"],
    "0.16.0": ["transformers==4.53.0", "accelerate==1.8.1", "huggingface_hub<=0.33.1", "tokenizers<=0.21.2", "numpy<2.4"],
    "0.17.1": ["transformers==4.55.2", "accelerate==1.10.0", "huggingface_hub<=0.34.4", "tokenizers<=0.21.4", "numpy<2.4"],
    "0.18.1": ["transformers==4.57.3", "accelerate==1.12.0", "huggingface_hub<=0.36.0", "tokenizers<=0.22.1"],
    "0.19.1": ["transformers==5.5.4", "accelerate==1.13.0", "huggingface_hub<=1.11.0", "tokenizers<=0.22.2"],
    "0.20.0": ["transformers==5.14.1", "accelerate==1.14.0", "huggingface_hub<=1.25.1", "tokenizers<=0.23.1"],
    "0.21.2": ["transformers==5.18.0", "accelerate==1.15.0", "huggingface_hub<=2.1.1", "tokenizers<=0.23.2"],
}
REPORTED = ["peft", "torch", "transformers", "accelerate", "huggingface_hub", "tokenizers", "safetensors", "numpy", "setuptools"]

# Runs inside each venv, so it may only use the standard library and that venv's peft.
PROBE = r'''
import dataclasses, enum, json, logging, os, shutil, sys, tempfile, warnings

import peft
from peft import PeftConfig

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING  # where every release so far keeps it

PEFT_DIR = os.path.dirname(peft.__file__)
WHERE = "peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING"


class Collect(logging.Handler):
    records = []

    def emit(self, record):
        self.records.append(record)


HANDLER = Collect(logging.WARNING)
for name in ("peft", "transformers"):  # transformers' logger does not propagate to root
    logging.getLogger(name).addHandler(HANDLER)


def first_line(text):
    lines = str(text).strip().splitlines()
    return (lines[0] if lines else "")[:300]


def plain(value):
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, (set, frozenset)):
        return sorted((plain(v) for v in value), key=repr)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def survives(raw, attr):
    if isinstance(attr, (set, frozenset)) and isinstance(raw, list):
        try:
            raw = set(raw)  # peft turns target_modules lists into sets: order is not data
        except TypeError:
            pass
    raw, attr = plain(raw), plain(attr)
    if isinstance(raw, dict) and isinstance(attr, dict):  # a dataclass may add defaults
        return all(k in attr and survives(v, attr[k]) for k, v in raw.items())
    return raw == attr


def relevant(w):
    # Import-time and third-party deprecation noise is not about the config.
    path = os.path.abspath(w.filename)
    return path.startswith(PEFT_DIR) or "site-packages" not in path


def step(fn):
    """Run one loading step; return its record (without config details) and its result."""
    HANDLER.records.clear()
    out = {"status": "loads", "error": None, "dropped": None, "kept_type": None}
    result = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn()
        except Exception as exc:
            out["status"], out["error"] = "raises", f"{type(exc).__name__}: {first_line(exc)}"
    kept = [f"{w.category.__name__}: {first_line(w.message)}" for w in caught if relevant(w)]
    kept += [f"logging.{r.levelname}: {first_line(r.getMessage())}" for r in HANDLER.records]
    out["warnings"], out["raw_warning_count"] = kept, len(caught) + len(HANDLER.records)
    if out["status"] == "loads" and kept:
        out["status"] = "warns"
    return out, result


def config_step(fn, raw):
    out, config = step(fn)
    if out["status"] != "raises":
        out["kept_type"] = type(config).__name__
        if isinstance(raw, dict):
            out["dropped"] = sorted(k for k in raw if not hasattr(config, k) or not survives(raw[k], getattr(config, k)))
    return out, config


def skipped():
    return {"status": "skipped", "error": None, "warnings": [], "raw_warning_count": 0,
            "dropped": None, "kept_type": None}


# From 0.4 on, PeftModel.from_pretrained reads peft_type with this helper and never
# calls PeftConfig.from_pretrained; earlier releases use the untyped config's peft_type.
GET_PEFT_TYPE = getattr(PeftConfig, "_get_peft_type", None)
STEPS = ["get_peft_type" if GET_PEFT_TYPE else "untyped", "typed"]


def probe(path):
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(path, os.path.join(tmp, "adapter_config.json"))
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except Exception:
            raw = None
        untyped, config = config_step(lambda: PeftConfig.from_pretrained(tmp), raw)
        found = dict(skipped(), value=None)
        if GET_PEFT_TYPE:
            found, value = step(lambda: GET_PEFT_TYPE(tmp))
            found["value"] = plain(value)
        peft_type = getattr(config, "peft_type", None)
        if peft_type is None and isinstance(raw, dict) and isinstance(raw.get("peft_type"), str):
            peft_type = raw["peft_type"]
        if peft_type is None:
            typed = skipped()
        else:
            peft_type = plain(peft_type)
            typed, _ = config_step(lambda: PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].from_pretrained(tmp), raw)
        typed["peft_type"] = peft_type
        return {"untyped": untyped, "get_peft_type": found, "typed": typed}


paths, out_path = json.loads(sys.argv[1]), sys.argv[2]
results = {key: probe(path) for key, path in paths.items()}
env = {"python": sys.version.split()[0], "mapping": WHERE, "from_pretrained_steps": STEPS}
with open(out_path, "w", encoding="utf-8") as f:
    json.dump({"environment": env, "results": results}, f)
'''


def pip(python: Path, args: list[str], log: Path) -> None:
    with log.open("a") as f:
        subprocess.run([str(python), "-m", "pip", "install", *args], stdout=f, stderr=subprocess.STDOUT, check=True)


def ensure_venv(venv: Path, version: str) -> Path:
    """Build the venv for one release, or reuse it if it was built with the same pins."""
    python, stamp = venv / "bin" / "python", venv / "peft-gt-requirements.json"
    wanted = [f"peft=={version}", *PINS.get(version, []), *COMMON]  # unlisted: newest deps
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    log = venv / "install.log"
    pip(python, [TORCH], log)  # first, so peft's torch requirement is already met
    pip(python, [TORCH, *wanted], log)
    stamp.write_text(json.dumps(wanted))
    return python


def installed(python: Path) -> dict[str, str]:
    listing = subprocess.run([str(python), "-m", "pip", "list", "--format=json"],
                             capture_output=True, text=True, check=True).stdout
    found = {p["name"].lower().replace("-", "_"): p["version"] for p in json.loads(listing)}
    return {name: found[name] for name in REPORTED if name in found}


def measure(version: str, venvs: Path, inputs: dict[str, str]) -> tuple[dict, dict]:
    """Return (environment, {input: outcome}) for one release; never raises."""
    env: dict = {"importable": False, "pins": {}, "python": None}
    venv = venvs / f"peft-{version}"
    try:
        python = ensure_venv(venv, version)
    except subprocess.CalledProcessError:
        lines = (venv / "install.log").read_text(errors="replace").strip().splitlines()
        env["error"] = "install failed: " + " | ".join([line for line in lines if line.startswith("ERROR")] or lines[-3:])[-600:]
        return env, {}
    env["pins"] = installed(python)
    env["requested"] = json.loads((venv / "peft-gt-requirements.json").read_text())
    imported = subprocess.run([str(python), "-c", "import peft"], capture_output=True, text=True)
    if imported.returncode != 0:
        env["error"] = "import failed: " + imported.stderr.strip().splitlines()[-1][-600:]
        return env, {}
    env["importable"] = True
    with tempfile.TemporaryDirectory() as tmp:
        script, out = Path(tmp, "probe.py"), Path(tmp, "out.json")
        script.write_text(PROBE)
        offline = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="")
        done = subprocess.run([str(python), str(script), json.dumps(inputs), str(out)], cwd=tmp,
                              env=offline, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            env["error"] = "probe failed: " + " | ".join(done.stderr.strip().splitlines()[-3:])[-600:]
            return env, {}
        measured = json.loads(out.read_text())
    env.update(measured["environment"])
    return env, measured["results"]


def collect_inputs(paths: list[Path]) -> dict[str, str]:
    """Map "<parent dir>/<file>" keys, stable across machines, to absolute paths."""
    files: list[Path] = []
    for path in paths:
        files += sorted(path.glob("*.json")) if path.is_dir() else [path]
    return {f"{f.parent.name}/{f.name}": str(f.resolve()) for f in files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", default=",".join(PINS), help="comma-separated PEFT releases")
    parser.add_argument("--venvs", type=Path, default=Path("/tmp/peft-gt-venvs"))
    parser.add_argument("--out", type=Path, default=ROOT / "tests/data/peft_ground_truth.json")
    parser.add_argument("--jobs", type=int, default=2, help="releases set up and probed at once")
    parser.add_argument("inputs", nargs="*", type=Path, default=[ROOT / "tests/data/real-adapter-configs"])
    args = parser.parse_args()
    versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    inputs = collect_inputs(args.inputs)
    args.venvs.mkdir(parents=True, exist_ok=True)

    table = json.loads(args.out.read_text()) if args.out.exists() else {"environments": {}, "results": {}}
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = pool.map(lambda v: measure(v, args.venvs, inputs), versions)
        for version, (env, results) in zip(versions, runs):
            print(f"peft {version}: {env.get('error', 'ok')}", file=sys.stderr)
            table["environments"][version] = env
            for key in inputs:
                table["results"].setdefault(key, {}).pop(version, None)
                if key in results:
                    table["results"][key][version] = results[key]
    table.update(schema=1, generated=datetime.date.today().isoformat())
    args.out.write_text(json.dumps(table, sort_keys=True, indent=1) + "\n")


if __name__ == "__main__":
    main()
