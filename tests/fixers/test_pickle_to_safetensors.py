"""pickle-to-safetensors: torch zip archives become safetensors without torch and without unpickling.

The byte-level cases are archives written opcode by opcode (tests/hostile.py), with random storage bytes and
the expected tensors gathered element by element here, independently of the fixer's own code. The
core-only cases run `doctor fix` in a child process where torch, transformers and peft cannot be imported,
and compare its output with torch's own load and safetensors save of the same file.
"""
from __future__ import annotations

import itertools
import json
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from adapter_doctor.fixers import FixOptions, FixWriteError, apply, plan
from adapter_doctor.fixers.pickle_to_safetensors import NEEDS_TORCH, read_zip_tensors, verify_zip_conversion
from adapter_doctor.fixers.tensors import RawTensor, read_tensors, write_tensors
from conftest import healthy
from hostile import View, torch_pickle

HEAVY = ("torch", "transformers", "peft", "triton", "accelerate")
WIDTH = {"FloatStorage": 4, "BFloat16Storage": 2, "LongStorage": 8, "BoolStorage": 1, "HalfStorage": 2,
         "ComplexFloatStorage": 8, "DoubleStorage": 8}
ST_DTYPE = {"FloatStorage": "F32", "BFloat16Storage": "BF16", "LongStorage": "I64", "BoolStorage": "BOOL",
            "HalfStorage": "F16", "ComplexFloatStorage": "C64", "DoubleStorage": "F64"}
ONLY = FixOptions(only=frozenset({"ADC423"}))


def archive(path: Path, views: dict[str, View], storages: dict[str, bytes], byteorder: str | None = "little") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", torch_pickle(views))
        if byteorder is not None:
            zf.writestr("archive/byteorder", byteorder)
        for key, raw in storages.items():
            zf.writestr(f"archive/data/{key}", raw)
        zf.writestr("archive/version", "3\n")
    return path


def gather(storage: bytes, v: View) -> bytes:
    """The view's elements in C order, one index at a time (what tensor.contiguous() holds)."""
    width = WIDTH[v.storage]
    out = bytearray()
    for index in itertools.product(*(range(d) for d in v.shape)):
        at = v.offset + sum(i * s for i, s in zip(index, v.strides()))
        out += storage[at * width:(at + 1) * width]
    return bytes(out)


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


VIEWS = {
    "plain": View((3, 4), key="0", numel=12),
    "transposed": View((4, 3), stride=(1, 4), key="0", numel=12),  # shares storage 0 with "plain"
    "slice": View((2, 2), stride=(4, 1), offset=5, key="0", numel=12),
    "expanded": View((3, 4), stride=(0, 1), key="1", numel=4),  # expand(): one row repeated
    "every_other": View((3,), stride=(2,), offset=1, key="2", numel=8, storage="BFloat16Storage"),
    "long": View((2, 3), stride=(1, 2), key="3", storage="LongStorage"),
    "mask": View((5,), key="4", storage="BoolStorage"),
    "scalar": View((), offset=2, key="5", numel=3),
    "empty": View((0, 4), key="6", numel=0),
}


def storages_for(views: dict[str, View]) -> dict[str, bytes]:
    sizes: dict[str, int] = {}
    for v in views.values():
        sizes[v.key] = max(sizes.get(v.key, 0), v.storage_numel() * WIDTH[v.storage])
    out = {key: random_bytes(n, seed=int(key)) for key, n in sizes.items()}
    out["4"] = bytes(b % 2 for b in out["4"])  # a bool is 0 or 1
    return out


def test_every_view_is_gathered_exactly_and_shared_storage_is_split(tmp_path):
    storages = storages_for(VIEWS)
    path = archive(tmp_path / "adapter_model.bin", VIEWS, storages)
    got = read_zip_tensors(path)
    assert list(got) == list(VIEWS)  # the pickle's order
    for name, v in VIEWS.items():
        assert got[name].dtype == ST_DTYPE[v.storage] and got[name].shape == v.shape, name
        assert got[name].data == gather(storages[v.key], v), name
    assert got["transposed"].data != got["plain"].data  # a view's own C order, not its storage's
    assert got["expanded"].data == got["expanded"].data[:16] * 3


def test_big_endian_archive_becomes_little_endian(tmp_path):
    import numpy as np

    values = {"F32": np.arange(6, dtype="<f4") - 2.5, "I64": np.array([1, -2, 3 << 40], dtype="<i8"),
              "C64": np.array([1 + 2j, -3.5 + 0.25j], dtype="<c8"), "F16": np.array([0.5, -7, 1e4], dtype="<f2")}
    bf16 = np.array([0x3F80, 0xC000, 0x7FC0], dtype="<u2")  # 1.0, -2.0, NaN as bf16 bit patterns
    views = {"f": View((2, 3), stride=(1, 2), key="0"), "i": View((3,), key="1", storage="LongStorage"),
             "c": View((2,), key="2", storage="ComplexFloatStorage"), "h": View((3,), key="3", storage="HalfStorage"),
             "b": View((3,), key="4", storage="BFloat16Storage")}
    big = {"0": values["F32"].astype(">f4").tobytes(), "1": values["I64"].astype(">i8").tobytes(),
           "2": values["C64"].astype(">c8").tobytes(), "3": values["F16"].astype(">f2").tobytes(),
           "4": bf16.astype(">u2").tobytes()}
    got = read_zip_tensors(archive(tmp_path / "big.bin", views, big, byteorder="big"))
    assert got["f"].data == values["F32"].reshape(3, 2).T.copy().tobytes()  # the transpose of a 3x2 storage
    assert got["i"].data == values["I64"].tobytes()
    assert got["c"].data == values["C64"].tobytes()  # each half of a complex swapped on its own
    assert got["h"].data == values["F16"].tobytes()
    assert got["b"].data == bf16.tobytes()
    little = read_zip_tensors(archive(tmp_path / "little.bin", views, big, byteorder=None))  # no record: little
    assert little["i"].data == big["1"]


def test_verify_compares_every_byte(tmp_path):
    storages = storages_for(VIEWS)
    path = archive(tmp_path / "adapter_model.bin", VIEWS, storages)
    tensors = read_zip_tensors(path)
    good = tmp_path / "good.safetensors"
    write_tensors(good, tensors, {"format": "pt"})
    assert verify_zip_conversion(path, good, {})
    flipped = dict(tensors)
    raw = bytearray(tensors["slice"].data)
    raw[-1] ^= 1  # one bit of one element
    flipped["slice"] = RawTensor("F32", (2, 2), bytes(raw))
    bad = tmp_path / "bad.safetensors"
    write_tensors(bad, flipped, {"format": "pt"})
    with pytest.raises(FixWriteError, match="slice differs"):
        verify_zip_conversion(path, bad, {})


def _transposed_bin(path: Path) -> None:
    """The real adapter's tensors, each stored as torch stores `t.t().contiguous().t()`: a strided view."""
    real = read_zip_tensors(healthy("llama-lora-bin") / "adapter_model.bin")
    views, storages = {}, {}
    for i, (name, t) in enumerate(real.items()):
        rows, cols = t.shape
        elements = [t.data[k * 2:(k + 1) * 2] for k in range(rows * cols)]
        storages[str(i)] = b"".join(elements[r * cols + c] for c in range(cols) for r in range(rows))
        views[name] = View((rows, cols), stride=(1, rows), key=str(i), storage="BFloat16Storage")
    archive(path, views, storages)


def test_verification_catches_a_fault_in_the_conversions_gather(tmp_path, monkeypatch):
    """The read-back does not reuse the conversion's gather: a strided view gathered wrongly is refused."""
    from adapter_doctor.fixers import pickle_to_safetensors

    adapter = adapter_with(tmp_path, _transposed_bin)
    apply(plan(adapter, ONLY), out=tmp_path / "good", options=ONLY)  # the same file converts when nothing is wrong
    written, _ = read_tensors(tmp_path / "good" / "adapter_model.safetensors")
    assert written == read_zip_tensors(healthy("llama-lora-bin") / "adapter_model.bin")

    def ignores_strides(storage: bytes, t, byteorder: str) -> bytes:  # the bug: a view read as if contiguous
        return storage[t.offset * 2:(t.offset + t.numel) * 2]

    monkeypatch.setattr(pickle_to_safetensors, "_tensor_bytes", ignores_strides)
    with pytest.raises(FixWriteError, match="differs after conversion"):
        apply(plan(adapter, ONLY), out=tmp_path / "bad", options=ONLY)
    assert not (tmp_path / "bad").exists() and (adapter / "adapter_model.bin").is_file()


def test_a_file_that_no_longer_passes_the_scan_is_not_converted(tmp_path):
    path = tmp_path / "adapter_model.bin"
    path.write_bytes(b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.")
    with pytest.raises(FixWriteError, match="no longer passes the opcode scan"):
        read_zip_tensors(path)


def test_views_that_expand_past_the_budget_are_refused(tmp_path):
    huge = {"w": View((1 << 16, 1 << 14), stride=(0, 0), key="0", numel=1)}  # 4 GiB from one element
    path = archive(tmp_path / "adapter_model.bin", huge, {"0": b"\0\0\x80?"})
    with pytest.raises(FixWriteError, match="expand"):
        read_zip_tensors(path)


# --- doctor fix without torch --------------------------------------------------------------------------

BLOCKER = f"""
import importlib.abc, sys
class _NoHeavy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {HEAVY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _NoHeavy())
from adapter_doctor.cli import run
sys.argv = ["doctor", *sys.argv[1:]]
try:
    run()
finally:
    print("heavy:", sorted(m for m in sys.modules if m.partition(".")[0] in {HEAVY!r}), file=sys.stderr)
"""


def core_only(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`doctor ARGS` run as the console script runs it, where torch, transformers and peft cannot be imported."""
    result = subprocess.run([sys.executable, "-c", BLOCKER, *args], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert "heavy: []" in result.stderr, result.stderr  # nothing of them got in
    return result


def adapter_with(tmp_path: Path, bin_writer=None) -> Path:
    adapter = tmp_path / "adapter"
    shutil.copytree(healthy("llama-lora-bin"), adapter)
    if bin_writer is not None:
        bin_writer(adapter / "adapter_model.bin")
    return adapter


def test_core_only_fix_converts_the_real_peft_bin(tmp_path):
    adapter = adapter_with(tmp_path)
    dry = core_only(tmp_path, "fix", str(adapter), "--only", "ADC423")
    assert dry.returncode == 1 and "pickle -> safetensors (28 tensors)" in dry.stdout
    assert "needs torch" not in dry.stdout
    done = core_only(tmp_path, "fix", str(adapter), "--only", "ADC423", "--out", str(tmp_path / "fixed"))
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "fixed"
    assert (out / "adapter_model.safetensors").is_file() and not (out / "adapter_model.bin").exists()
    written, metadata = read_tensors(out / "adapter_model.safetensors")
    assert metadata == {"format": "pt"} and len(written) == 28
    assert written == read_zip_tensors(adapter / "adapter_model.bin")
    assert {t.dtype for t in written.values()} == {"BF16"} and all(t.data.strip(b"\0") for t in written.values())


def test_core_only_conversion_of_the_real_peft_bin_equals_torchs_own_save(tmp_path):
    pytest.importorskip("torch", reason="the comparison with torch's own save needs torch")
    adapter = adapter_with(tmp_path)
    done = core_only(tmp_path, "fix", str(adapter), "--only", "ADC423", "--out", str(tmp_path / "fixed"))
    assert done.returncode == 0, done.stdout + done.stderr
    _same_as_torch(adapter / "adapter_model.bin", tmp_path / "fixed" / "adapter_model.safetensors", tmp_path)


def _same_as_torch(pickled: Path, converted: Path, tmp_path: Path) -> None:
    """Every tensor's bytes equal those of torch's own load of the pickle, saved by safetensors' torch writer."""
    torch = pytest.importorskip("torch", reason="the comparison with torch's own save needs torch")
    from safetensors.torch import save_file

    state = torch.load(pickled, map_location="cpu", weights_only=True)
    reference = tmp_path / "reference.safetensors"
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(reference), metadata={"format": "pt"})
    ours, _ = read_tensors(converted)
    theirs, _ = read_tensors(reference)
    assert set(ours) == set(theirs)
    for name in theirs:
        assert (ours[name].dtype, ours[name].shape, ours[name].data) == \
            (theirs[name].dtype, theirs[name].shape, theirs[name].data), name


def test_core_only_fix_of_views_shared_storage_and_dtypes_matches_torch(tmp_path):
    torch = pytest.importorskip("torch", reason="writing the archive with torch.save needs torch")
    real = torch.load(healthy("llama-lora-bin") / "adapter_model.bin", map_location="cpu", weights_only=True)
    names = sorted(real)

    def write(path: Path) -> None:
        # The same values, stored as torch stores views: transposes of their storage, slices of one shared
        # buffer at offsets, and another dtype.
        pool = torch.cat([real[n].reshape(-1) for n in names[4:10]])
        state, at = {}, 0
        for i, name in enumerate(names):
            t = real[name]
            if i < 4:
                state[name] = t.t().contiguous().t()
            elif i < 10:
                state[name] = pool[at:at + t.numel()].view(t.shape)
                at += t.numel()
            else:
                state[name] = t.float() if i == 10 else t
        torch.save(state, path)

    adapter = adapter_with(tmp_path, write)
    done = core_only(tmp_path, "fix", str(adapter), "--only", "ADC423", "--out", str(tmp_path / "fixed"))
    assert done.returncode == 0, done.stdout + done.stderr
    converted = tmp_path / "fixed" / "adapter_model.safetensors"
    _same_as_torch(adapter / "adapter_model.bin", converted, tmp_path)
    from safetensors.torch import load_file

    reloaded = load_file(str(converted))
    saved = torch.load(adapter / "adapter_model.bin", map_location="cpu", weights_only=True)
    assert all(torch.equal(reloaded[n], saved[n]) and reloaded[n].dtype == saved[n].dtype for n in saved)


def test_legacy_pickle_without_torch_is_a_one_line_error(tmp_path):
    torch = pytest.importorskip("torch", reason="writing a legacy-format file needs torch")
    state = torch.load(healthy("llama-lora-bin") / "adapter_model.bin", map_location="cpu", weights_only=True)
    adapter = adapter_with(tmp_path, lambda p: torch.save(state, p, _use_new_zipfile_serialization=False))
    dry = core_only(tmp_path, "fix", str(adapter), "--only", "ADC423")
    assert dry.returncode == 1 and NEEDS_TORCH in dry.stdout  # the dry run says so
    failed = core_only(tmp_path, "fix", str(adapter), "--only", "ADC423", "--out", str(tmp_path / "fixed"))
    assert failed.returncode == 2
    errors = [line for line in (failed.stdout + failed.stderr).splitlines() if line.startswith("✗")]
    assert errors == [f"✗ {NEEDS_TORCH}"]  # one line, naming the extra to install
    assert "Traceback" not in failed.stderr and "internal error" not in failed.stderr
    assert not (tmp_path / "fixed").exists() and (adapter / "adapter_model.bin").is_file()


def test_legacy_pickle_with_torch_converts_and_matches(tmp_path):
    torch = pytest.importorskip("torch", reason="the legacy format is read by torch")
    state = torch.load(healthy("llama-lora-bin") / "adapter_model.bin", map_location="cpu", weights_only=True)
    adapter = adapter_with(tmp_path, lambda p: torch.save(state, p, _use_new_zipfile_serialization=False))
    p = plan(adapter, ONLY)
    assert p.weights is not None and NEEDS_TORCH not in json.dumps(p.to_dict())
    apply(p, out=tmp_path / "fixed", options=ONLY)
    _same_as_torch(adapter / "adapter_model.bin", tmp_path / "fixed" / "adapter_model.safetensors", tmp_path)


def test_conversion_and_cast_together(tmp_path):
    adapter = adapter_with(tmp_path)
    options = FixOptions(only=frozenset({"ADC423", "ADC704"}), dtype="fp16")
    apply(plan(adapter, options), out=tmp_path / "fixed", options=options)
    written, _ = read_tensors(tmp_path / "fixed" / "adapter_model.safetensors")
    source = read_zip_tensors(adapter / "adapter_model.bin")
    assert {t.dtype for t in written.values()} == {"F16"} and written.keys() == source.keys()


# --- conversions that would leave the adapter unloadable -------------------------------------------------

def _set_config(adapter: Path, **keys) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(keys)
    path.write_text(json.dumps(config, indent=2))


def test_an_adapter_of_the_merged_qkv_era_keeps_its_bin(tmp_path):
    adapter = adapter_with(tmp_path)
    _set_config(adapter, enable_lora=[True, False, True])  # PEFT 0.2's layout, read by no release after 0.2.0
    p = plan(adapter, ONLY)
    (refusal,) = [r for r in p.refusals if r.finding == "ADC423"]
    assert "enable_lora" in refusal.reason and "PEFT <= 0.2.0" in refusal.reason and "0.4.0" in refusal.reason
    assert p.weights is None and not p.remove
    from adapter_doctor.cli import main
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["fix", str(adapter), "--only", "ADC423", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and not (tmp_path / "o").exists()
    check = CliRunner().invoke(main, ["check", str(adapter)])
    assert "fix: Keep the .bin: enable_lora" in check.output and "--only ADC423" not in check.output


@pytest.mark.parametrize("target, converts", [("0.3.0", False), ("0.2.0", False), ("0.4.0", True), ("0.21.2", True)])
def test_a_target_peft_that_reads_only_bin_keeps_it(tmp_path, target, converts):
    adapter = adapter_with(tmp_path)
    options = FixOptions(only=frozenset({"ADC423"}), target_peft=target)
    p = plan(adapter, options)
    assert (p.weights is not None) is converts
    if not converts:
        (refusal,) = [r for r in p.refusals if r.finding == "ADC423"]
        assert f"PEFT {target} reads only adapter_model.bin" in refusal.reason


def test_the_table_says_from_which_release_safetensors_are_read():
    from adapter_doctor.knowledge import peft_table

    table = peft_table()
    assert table.first_reading_safetensors().version == "0.4.0"
    assert [r.version for r in table.releases if not r.reads_safetensors] == ["0.1.0", "0.2.0", "0.3.0"]
