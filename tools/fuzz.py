"""Coverage-guided fuzzing of the doctor's readers with atheris (libFuzzer).

    python tools/fuzz.py TARGET [libFuzzer flags] [CORPUS_DIR ...]
    python tools/fuzz.py diagnose -max_total_time=3600 -timeout=5 -rss_limit_mb=1024 /tmp/corpus

TARGET is one of: safetensors (the header parser), pickle (the opcode walker on plain and legacy pickles), zip
(the same walker on torch zip archives), config (adapter_config.json), values (the value scan of a weights file
beside a healthy config) and diagnose (config and weights both from the input). An exception out of the code
under test, an internal-error finding (ADC000), a run over -timeout seconds or over -rss_limit_mb is a crash;
libFuzzer writes the input to crash-*/timeout-*/oom-*, which belongs in tests/data/fuzz/TARGET/ as a
regression (tests/doctor/test_fuzz_harness.py replays that corpus on every test run).
Seeds come from the bundled fixtures; with no CORPUS_DIR the run starts from them alone.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("safetensors", "pickle", "zip", "config", "values", "diagnose")
HEALTHY = ROOT / "fixtures" / "healthy" / "llama-lora"
HEALTHY_BIN = ROOT / "fixtures" / "healthy" / "llama-lora-bin"
_WORK = Path(tempfile.mkdtemp(prefix="adapter-doctor-fuzz-"))


class InternalError(Exception):
    """The doctor reported an internal error (ADC000): a bug as much as an exception would be."""


def _diagnose(folder: Path) -> None:
    from adapter_doctor import Options, diagnose

    report = diagnose([str(folder)], Options())
    internal = [f for f in report.findings if f.id == "ADC000"]
    if internal:
        raise InternalError(internal[0].message)


def _adapter(config: bytes | None, weights: bytes | None, name: str) -> Path:
    folder = _WORK / "adapter"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    if config is not None:
        (folder / "adapter_config.json").write_bytes(config)
    if weights is not None:
        (folder / name).write_bytes(weights)
    return folder


def run_one(target: str, data: bytes) -> None:
    """One input through one target; raises what the code under test raised."""
    from adapter_doctor import pickle_scan, safetensors_header

    if target == "safetensors":
        path = _WORK / "x.safetensors"
        path.write_bytes(data)
        try:
            safetensors_header.read_header(path)
        except safetensors_header.HeaderError:
            pass  # a refusal is the answer; anything else escapes
    elif target in ("pickle", "zip"):
        path = _WORK / "x.bin"
        path.write_bytes(data)
        pickle_scan.scan(path)
    elif target == "config":
        _diagnose(_adapter(data, (HEALTHY / "adapter_model.safetensors").read_bytes(), "adapter_model.safetensors"))
    elif target == "values":
        name = "adapter_model.bin" if data[:1] in (b"P", b"\x80") else "adapter_model.safetensors"
        _diagnose(_adapter((HEALTHY / "adapter_config.json").read_bytes(), data, name))
    elif target == "diagnose":
        config, _, weights = data.partition(b"\0\0ADAPTER-DOCTOR\0\0")
        name = "adapter_model.bin" if weights[:1] in (b"P", b"\x80") else "adapter_model.safetensors"
        _diagnose(_adapter(config, weights or None, name))
    else:
        raise ValueError(f"unknown target {target!r}: one of {', '.join(TARGETS)}")


def seeds(target: str) -> list[bytes]:
    """Real files to start from: the bundled healthy adapters, and the committed regressions."""
    config = (HEALTHY / "adapter_config.json").read_bytes()
    safetensors = (HEALTHY / "adapter_model.safetensors").read_bytes()
    pickled = next(HEALTHY_BIN.glob("*.bin")).read_bytes()
    by_target = {"safetensors": [safetensors], "pickle": [pickled[:4096], json.dumps({"a": 1}).encode()],
                 "zip": [pickled], "config": [config], "values": [safetensors, pickled],
                 "diagnose": [config + b"\0\0ADAPTER-DOCTOR\0\0" + safetensors]}
    corpus = ROOT / "tests" / "data" / "fuzz" / target
    return by_target[target] + [p.read_bytes() for p in sorted(corpus.glob("*")) if p.is_file()]


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in TARGETS:
        print(__doc__, file=sys.stderr)
        return 2
    import atheris

    target = argv[1]
    with atheris.instrument_imports():
        import adapter_doctor.diagnose  # noqa: F401 - instrumented for coverage
        import adapter_doctor.pickle_scan  # noqa: F401
        import adapter_doctor.safetensors_header  # noqa: F401
    seed_dir = _WORK / "seeds"
    seed_dir.mkdir(exist_ok=True)
    for i, seed in enumerate(seeds(target)):
        (seed_dir / f"seed-{i}").write_bytes(seed)
    named = [a for a in argv[2:] if not a.startswith("-")]
    for folder in named:
        Path(folder).mkdir(parents=True, exist_ok=True)
    # libFuzzer writes new inputs to the first corpus folder: the one named, else the seeds' own
    args = [argv[0], *[a for a in argv[2:] if a.startswith("-")], *named, str(seed_dir)]
    atheris.Setup(args, lambda data: run_one(target, data))
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
