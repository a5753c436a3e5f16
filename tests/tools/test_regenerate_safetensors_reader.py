"""The generator's `reads_safetensors` fact: a loader that names adapter_model.safetensors and reads it."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from conftest import load_tool

ROOT = Path(__file__).resolve().parents[2]


regen = load_tool("regenerate_peft_table")
CONSTANTS = 'WEIGHTS_NAME = "adapter_model.bin"\nSAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"\n'


def tree(files: dict[str, str]):
    return regen.SourceTree({path: textwrap.dedent(text) for path, text in files.items()})


LOADER_04 = """
    from safetensors.torch import load_file as safe_load_file
    from safetensors.torch import save_file as safe_save_file
    from .utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

    class PeftModel:
        def load_adapter(self, path):
            if os.path.exists(os.path.join(path, SAFETENSORS_WEIGHTS_NAME)):
                return safe_load_file(os.path.join(path, SAFETENSORS_WEIGHTS_NAME))
            return torch.load(os.path.join(path, WEIGHTS_NAME))
"""


def test_a_loader_that_reads_the_safetensors_file():
    assert regen.reads_safetensors(tree({"peft/utils/__init__.py": CONSTANTS, "peft/peft_model.py": LOADER_04}))


@pytest.mark.parametrize("model", [
    # 0.2/0.3: only the .bin name and torch.load
    """
    from .utils import WEIGHTS_NAME
    def load(path):
        return torch.load(os.path.join(path, WEIGHTS_NAME))
    """,
    # saving safetensors is not reading them
    """
    from safetensors.torch import save_file as safe_save_file
    from .utils import SAFETENSORS_WEIGHTS_NAME
    def save(path, sd):
        safe_save_file(sd, os.path.join(path, SAFETENSORS_WEIGHTS_NAME))
    """,
    # load_file imported, but no function opens the adapter file with it
    """
    from safetensors.torch import load_file
    def other(path):
        return load_file(path)
    """,
])
def test_releases_that_do_not_read_it(model):
    assert not regen.reads_safetensors(tree({"peft/utils/__init__.py": CONSTANTS, "peft/peft_model.py": model}))


def test_the_literal_file_name_inside_the_loader_counts_too():
    model = """
    def load(path):
        from safetensors.torch import load_file
        return load_file(os.path.join(path, "adapter_model.safetensors"))
    """
    assert regen.reads_safetensors(tree({"peft/peft_model.py": model}))


def test_analyse_records_it():
    enums = "import enum\nclass PeftType(str, enum.Enum):\n    LORA = 'LORA'\nclass TaskType(str, enum.Enum):\n    CAUSAL_LM = 'CAUSAL_LM'\n"
    sources = {"peft/__init__.py": "from .utils import PeftType, TaskType\n", "peft/utils/__init__.py":
               "from .peft_types import PeftType, TaskType\n" + CONSTANTS, "peft/utils/peft_types.py": enums,
               "peft/peft_model.py": textwrap.dedent(LOADER_04)}
    assert regen.analyse("9.9.9", "2030-01-01", sources)["release"]["reads_safetensors"] is True
    sources["peft/peft_model.py"] = "import torch\n"
    assert regen.analyse("9.9.9", "2030-01-01", sources)["release"]["reads_safetensors"] is False
