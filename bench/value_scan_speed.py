"""Throughput of the value scan (NaN/Inf and all-zero detection) on a large adapter.

    python bench/value_scan_speed.py [--gb 1.0] [--dtype BF16|F16|F32] [--keep DIR]

Writes a synthetic adapter of the given size (LoRA-shaped bf16 tensors), reads it once to warm the
page cache, then times `scan_values` over it. Also times a full `doctor check` process on it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from adapter_doctor.artifact import read_weights
from adapter_doctor.tensor_data import scan_values

_NP = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}


def write_adapter(folder: Path, gigabytes: float, dtype: str) -> Path:
    """LoRA pairs for 4096-wide projections at rank 64 until the file reaches the requested size."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    width = np.dtype(_NP[dtype]).itemsize
    per_tensor = 64 * 4096 * width
    count = max(2, int(gigabytes * 1e9 // per_tensor) // 2 * 2)
    block = rng.integers(0, 2**14, size=64 * 4096, dtype=np.uint16).astype(_NP[dtype]) if dtype != "BF16" else \
        rng.integers(0x3000, 0x3F00, size=64 * 4096, dtype=np.uint16)
    header, offset = {}, 0
    for i in range(count):
        role, shape = ("lora_A", [64, 4096]) if i % 2 == 0 else ("lora_B", [4096, 64])
        name = f"base_model.model.model.layers.{i // 14}.proj{(i // 2) % 7}.{role}.weight"
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + per_tensor]}
        offset += per_tensor
    raw = json.dumps(header).encode()
    path = folder / "adapter_model.safetensors"
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        payload = block.tobytes()
        for _ in range(count):
            fh.write(payload)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 64, "lora_alpha": 16, "target_modules": [f"proj{i}" for i in range(7)]}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--dtype", choices=sorted(_NP), default="BF16")
    parser.add_argument("--keep", type=Path, help="write the adapter here and keep it")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="doctor-scan-"))
    try:
        path = write_adapter(folder, args.gb, args.dtype)
        size = path.stat().st_size
        wf = read_weights(path)
        scan_values(wf)  # warm the page cache
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            scan_values(wf)
            runs.append(time.perf_counter() - start)
        best = min(runs)
        doctor = shutil.which("doctor")
        start = time.perf_counter()
        subprocess.run([doctor, "check", str(folder)], stdout=subprocess.DEVNULL, check=False)
        whole = time.perf_counter() - start
        print(f"adapter: {size / 1e9:.2f} GB of {args.dtype} in {len(wf.header.tensors)} tensors")
        print(f"value scan: best {best:.3f} s of 5 = {size / best / 1e9:.2f} GB/s; `doctor check` process: {whole:.3f} s")
        print(json.dumps({"bytes": size, "dtype": args.dtype, "scan_seconds": runs, "gb_per_s": size / best / 1e9,
                          "doctor_check_seconds": whole}))
    finally:
        if args.keep is None:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
