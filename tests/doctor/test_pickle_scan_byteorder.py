"""The zip scan reads the `byteorder` record as torch.load does: little or big, anything else is damage."""
from __future__ import annotations

import zipfile

import pytest
from adapter_doctor.pickle_scan import scan
from hostile import View, torch_pickle


def _archive(path, byteorder: bytes | None):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", torch_pickle({"w": View((2,))}))
        if byteorder is not None:
            zf.writestr("archive/byteorder", byteorder)
        zf.writestr("archive/data/0", bytes(8))
    return path


@pytest.mark.parametrize("record, expected", [(None, "little"), (b"little", "little"), (b"big", "big")])
def test_byteorder_record_is_read(tmp_path, record, expected):
    result = scan(_archive(tmp_path / "a.bin", record))
    assert result.passed and result.error is None and result.byteorder == expected


@pytest.mark.parametrize("record", [b"middle", b"LITTLE", b"", b"little\n", b"x" * 100])
def test_a_byteorder_torch_refuses_is_damage(tmp_path, record):
    result = scan(_archive(tmp_path / "a.bin", record))
    assert result.error is not None and "byteorder" in result.error and not result.passed
