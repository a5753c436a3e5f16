"""Kill `doctor fix --inplace` (SIGKILL) at many moments: the folder always holds either the original
files or the complete fixed ones, and no original byte is ever lost."""
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from adapter_doctor.fixers.tensors import RawTensor, write_tensors
from conftest import broken

FILES = ("adapter_config.json", "adapter_model.safetensors")
KILLS = 20


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_large_adapter(folder: Path, megabytes: int = 128) -> None:
    """A torch.compile save (`_orig_mod.` keys) with a config the fix also edits, so both files change."""
    shutil.copytree(broken("keys-orig-mod"), folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(revision="unsloth", r=64, target_modules=["q_proj", "v_proj"])
    (folder / "adapter_config.json").write_text(json.dumps(config))
    block = np.full(64 * 4096, 0x3C00, dtype="<u2").tobytes()  # bf16 1/128: finite, non-zero
    tensors = {}
    for i in range(megabytes * (1 << 20) // (2 * len(block))):
        for proj in ("q_proj", "v_proj"):
            prefix = f"_orig_mod.base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = RawTensor("BF16", (64, 4096), block)
            tensors[f"{prefix}.lora_B.weight"] = RawTensor("BF16", (4096, 64), block)
    write_tensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"})


def fix_command(folder: Path) -> list[str]:
    return [sys.executable, "-m", "adapter_doctor", "fix", "--inplace", "--yes", str(folder)]


def test_sigkill_at_any_moment_leaves_old_or_new_never_a_mix(tmp_path):
    pristine = tmp_path / "pristine"
    make_large_adapter(pristine)
    original = {name: sha(pristine / name) for name in FILES}

    reference = tmp_path / "reference"
    shutil.copytree(pristine, reference)
    start = time.perf_counter()
    subprocess.run(fix_command(reference), cwd=tmp_path, check=True, capture_output=True)
    duration = time.perf_counter() - start
    fixed = {name: sha(reference / name) for name in FILES}
    assert fixed != original and all(fixed[n] != original[n] for n in FILES)

    outcomes = []
    for i in range(KILLS + 1):
        work = tmp_path / f"run{i}"
        shutil.copytree(pristine, work)
        process = subprocess.Popen(fix_command(work), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if i < KILLS:  # the last run is left to finish
            time.sleep(duration * i / KILLS)
            process.send_signal(signal.SIGKILL)
        process.wait()
        now = {name: sha(work / name) for name in FILES}
        if now == original:
            outcomes.append("original")
        else:
            assert now == fixed, f"kill {i}: a mix of old and new files"
            (backup,) = (work / ".doctor-backup").iterdir()
            assert {name: sha(backup / name) for name in FILES} == original, f"kill {i}: originals not all kept"
            outcomes.append("fixed")
        # A killed run may leave its half-built copy beside the folder; the next run finishes and clears it.
        subprocess.run(fix_command(work), cwd=tmp_path, check=True, capture_output=True)
        assert {name: sha(work / name) for name in FILES} == fixed
        assert not list(tmp_path.glob(f".doctor-staging-{work.name}-*"))
        shutil.rmtree(work)
    assert outcomes[0] == "original" and outcomes[-1] == "fixed", outcomes
