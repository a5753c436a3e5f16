"""The malicious-pickle corpus (tests/malicious.py): every sample is live, and doctor check calls every one unsafe."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from adapter_doctor import Options, diagnose
from malicious import samples, write_corpus

SAMPLES = {s.name: s for s in samples()}

# Loads each sample as an unsafe loader would; torch is imported only here, in the child, to prove liveness.
_LOADER = r"""
import json, os, sys, time
kind, items = sys.argv[1], json.loads(sys.argv[2])
if kind == "torch":
    import torch, warnings
    warnings.simplefilter("ignore")
for path, sentinel in items:
    os.environ["MAL_SENTINEL"] = sentinel
    try:
        if kind == "pickle":
            import pickle
            with open(path, "rb") as fh:
                pickle.load(fh)
        else:
            torch.load(path, weights_only=False)
    except BaseException:
        pass
    sys.stdout.flush()
time.sleep(1.0)  # Popen payloads run their command in the background
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return write_corpus(tmp_path_factory.mktemp("malicious"))


def _live(corpus: dict[str, Path], workdir: Path) -> set[str]:
    out: set[str] = set()
    for kind in ("pickle", "torch"):
        items = [(str(corpus[n] / "adapter_model.bin"), str(workdir / f"sentinel-{n}"))
                 for n, s in SAMPLES.items() if s.loader == kind]
        proc = subprocess.run([sys.executable, "-c", _LOADER, kind, json.dumps(items)], cwd=workdir,
                              capture_output=True, text=True, timeout=300)
        for n, s in SAMPLES.items():
            if s.loader == kind and ((workdir / f"sentinel-{n}").exists() or (s.token and s.token in proc.stdout)):
                out.add(n)
    return out


def test_the_corpus_is_large_and_every_sample_is_live(corpus, tmp_path):
    pytest.importorskip("torch")
    assert len(SAMPLES) >= 45
    live = _live(corpus, tmp_path)
    assert sorted(set(SAMPLES) - live) == []


def _verdicts(corpus: dict[str, Path]) -> dict[str, list[dict]]:
    report = diagnose([str(p) for p in corpus.values()], Options())
    return {Path(t.path).name: [f.to_dict() for f in t.findings] for t in report.targets}


def test_doctor_flags_every_sample_as_unsafe(corpus):
    verdicts = _verdicts(corpus)
    not_unsafe = [n for n, fs in verdicts.items()
                  if not any(f["category"] == "weights-unsafe" and f["severity"] == "error" for f in fs)]
    # Past the opcode bound the file is unverified (unsafe) and also beyond what the doctor reads (ADC412).
    mislabelled = [n for n, fs in verdicts.items() if n != "p2_past_opcode_bound"
                   and {"ADC403", "ADC412"} & {f["id"] for f in fs}]
    assert len(verdicts) == len(SAMPLES)
    assert not_unsafe == [] and mislabelled == []


def _picklescan_flags(path: Path) -> bool:
    from picklescan.scanner import SafetyLevel, scan_file_path

    result = scan_file_path(str(path))
    return any(g.safety in (SafetyLevel.Dangerous, SafetyLevel.Suspicious) for g in result.globals)


def test_doctor_flags_at_least_as_many_as_picklescan(corpus, capsys):
    try:
        import picklescan.scanner  # noqa: F401
    except ImportError:
        pytest.skip("picklescan is not installed (pip install picklescan)")
    verdicts = _verdicts(corpus)
    doctor = {n for n, fs in verdicts.items() if any(f["category"] == "weights-unsafe" and f["severity"] == "error"
                                                     for f in fs)}
    picklescan = {n for n, folder in corpus.items() if _picklescan_flags(folder / "adapter_model.bin")}
    with capsys.disabled():
        print(f"\nmalicious corpus: {len(corpus)} samples; doctor flags {len(doctor)}, "
              f"picklescan flags {len(picklescan)} (dangerous or suspicious)")
    assert len(doctor) >= len(picklescan) and doctor == set(corpus)


@pytest.mark.parametrize("name, reason", [
    ("zip_case_Data_beside_xdata", "pickles besides data.pkl"), ("zip_case_collision", "ignores case"),
    ("zip_duplicate_name", "listed twice"), ("zip_nested_prefix", "pickles besides data.pkl"),
    ("zip_other_prefix", None), ("zip_local_name_mismatch", "local header"), ("zip_data_descriptor", None),
    ("zip_torchscript_constants", "TorchScript"), ("tar_storages", "tar archive"), ("tar_tensors", "tar archive"),
    ("p2_past_opcode_bound", "bound"),
])
def test_tricked_archives_are_read_as_torch_reads_them(corpus, name, reason):
    """The member torch loads is the one scanned (its os.system is seen), and the trick itself is named."""
    findings = _verdicts({name: corpus[name]})[name]
    ids = {f["id"] for f in findings}
    if name != "p2_past_opcode_bound" and "torchscript" not in name:
        assert "ADC421" in ids
    refusals = [f["message"] for f in findings if f["id"] == "ADC424"]
    assert (reason is None and not refusals) or (reason and any(reason in m for m in refusals))
