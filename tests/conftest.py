"""Shared test helpers: paths to committed data and a tiny safetensors writer for byte-level cases; where the
Triton kernels run; and the coverage floor, which holds for the whole suite only."""
from __future__ import annotations

import importlib.util
import json
import os
import struct
import sys
from pathlib import Path

import pytest


def _leave_the_repository_root_off_the_path() -> None:
    # `python -m pytest` puts the working directory first on sys.path. From the repository root, our top-level
    # kernels/ folder would then shadow Hugging Face's `kernels` package, which transformers >= 5.25 imports;
    # the package itself imports as `adapter_doctor`, from the install, so the root is never needed here.
    root = Path(__file__).resolve().parents[1]
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != root]


_leave_the_repository_root_off_the_path()


def _interpret_triton_without_a_gpu() -> None:
    # triton.jit reads TRITON_INTERPRET when a function is defined (triton.language's own helpers too), so it
    # is set here, before any test module imports triton, torch or transformers.
    if "TRITON_INTERPRET" in os.environ or importlib.util.find_spec("torch") is None:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_interpret_triton_without_a_gpu()


def pytest_collection_finish(session: pytest.Session) -> None:
    """[tool.coverage.report] fail_under is the floor of the whole suite; a run of some tests covers less."""
    cov = session.config.pluginmanager.get_plugin("_cov")
    option = session.config.option
    whole = (session.config.args_source is pytest.Config.ArgsSource.TESTPATHS and not option.keyword
             and not option.markexpr and not option.deselect and not getattr(option, "lf", False))
    if cov is not None and not whole:
        cov.options.cov_fail_under = 0

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
FIXTURES = ROOT / "fixtures"


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict | None = None,
                      header_override: dict | None = None, pad: int = 0) -> bytes:
    """Build a safetensors file from name -> (dtype, shape, raw bytes), in name order."""
    header: dict = {}
    offset = 0
    blobs = []
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    if header_override:
        header.update(header_override)
    text = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


@pytest.fixture(autouse=True)
def _repository_root(monkeypatch):
    # Fixture configs name their bases relative to the repository root, as users run doctor from there.
    monkeypatch.chdir(ROOT)


@pytest.fixture
def write_safetensors(tmp_path: Path):
    def write(name: str = "adapter_model.safetensors", **kwargs) -> Path:
        path = tmp_path / name
        path.write_bytes(safetensors_bytes(**kwargs))
        return path

    return write


def check(*paths: Path | str, **options) -> list:
    """Findings for `paths` from the library API, as doctor check computes them."""
    from adapter_doctor import Options, diagnose

    report = diagnose([str(p) for p in paths], Options(**options))
    assert not [t.error for t in report.targets if t.error], report.targets
    assert "ADC000" not in {f.id for f in report.findings}, report.findings
    return report.findings


def ids(*paths: Path | str, **options) -> set[str]:
    """Check ids at warning or error severity (info findings are context, not problems)."""
    return {f.id for f in check(*paths, **options) if f.severity.value != "info"}


def broken(name: str) -> Path:
    return FIXTURES / "broken" / name


def healthy(name: str) -> Path:
    return FIXTURES / "healthy" / name


def peft_logits(adapter: Path, base: Path, tokens: int = 12) -> tuple[object, list[str], list[str]]:
    """Logits of `base` with `adapter` loaded by real PEFT (fp32, CPU), and its missing/unexpected adapter keys."""
    import torch
    import transformers
    from peft import PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    config = transformers.AutoConfig.from_pretrained(base)
    auto = transformers.AutoModelForImageTextToText if "vision_config" in config.to_dict() else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(base, torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(adapter))
    result = set_peft_model_state_dict(peft_model, load_peft_weights(str(adapter)), adapter_name="default")
    missing = [k for k in result.missing_keys if "lora" in k or "modules_to_save" in k]
    peft_model.eval()
    ids = torch.arange(1, tokens + 1).unsqueeze(0) % config.get_text_config().vocab_size
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    return logits, missing, list(result.unexpected_keys)


def load_tool(name: str):
    """A script of tools/ (outside the package) as a module, loaded once per test run."""
    key = f"adapter_doctor_tool_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses in the script look their module up here
        spec.loader.exec_module(module)
    return sys.modules[key]
