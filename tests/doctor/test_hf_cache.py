"""The local Hugging Face cache is found where huggingface_hub puts it."""
import pytest
from adapter_doctor.base_model import hf_cache_dir

CLEAR = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


@pytest.mark.parametrize("env, expected", [
    ({}, "~/.cache/huggingface/hub"),
    ({"XDG_CACHE_HOME": "/x"}, "/x/huggingface/hub"),
    ({"HF_HOME": "/h", "XDG_CACHE_HOME": "/x"}, "/h/hub"),
    ({"HUGGINGFACE_HUB_CACHE": "/old", "HF_HOME": "/h"}, "/old"),
    ({"HF_HUB_CACHE": "/new", "HUGGINGFACE_HUB_CACHE": "/old"}, "/new"),
])
def test_cache_dir_follows_huggingface_hub(monkeypatch, env, expected):
    import os

    for name in CLEAR:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert str(hf_cache_dir()) == os.path.expanduser(expected)


def test_agrees_with_huggingface_hub_itself(monkeypatch, tmp_path):
    import importlib
    import subprocess
    import sys

    if importlib.util.find_spec("huggingface_hub") is None:
        pytest.skip("huggingface_hub is not installed")
    env = {k: v for k, v in __import__("os").environ.items() if k not in CLEAR}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", "from huggingface_hub import constants; print(constants.HF_HUB_CACHE)"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    for name in CLEAR:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert str(hf_cache_dir()) == out
