import struct
import zipfile

import numpy as np
import pytest
from adapter_doctor.artifact import read_weights
from adapter_doctor.tensor_data import TensorDataError, scan_values, tensor_digests
from conftest import safetensors_bytes
from hostile import View, member_span, torch_zip

NAN = struct.pack("<f", float("nan"))
ZERO = struct.pack("<f", 0.0)


def test_a_strided_view_is_read_exactly(tmp_path):
    # Every other element: the zeros, not the NaNs between them.
    path = torch_zip(tmp_path / "adapter_model.bin", {"w": View((2, 2), (4, 2), numel=8)}, {"0": (ZERO + NAN) * 4})
    stats = scan_values(read_weights(path))
    assert stats["w"].all_zero and not stats["w"].nonfinite


def test_a_transposed_view_reads_in_c_order(tmp_path):
    values = np.arange(12, dtype=np.float32)
    bin_path = torch_zip(tmp_path / "adapter_model.bin", {"t": View((4, 3), (1, 4))}, {"0": values.tobytes()})
    st_path = tmp_path / "adapter_model.safetensors"
    st_path.write_bytes(safetensors_bytes({"t": ("F32", [4, 3], values.reshape(3, 4).T.copy().tobytes())}))
    assert tensor_digests(read_weights(bin_path)) == tensor_digests(read_weights(st_path))


@pytest.mark.parametrize("view", [
    View((20000, 20000), (0, 0), numel=4),  # expand(): four elements, 400 million times
    View((3000, 3000), (1, 1), numel=5999),  # overlapping rows
    View((1 << 20, 1 << 20), (0, 1), numel=1 << 20),
])
def test_views_that_repeat_their_storage_read_each_element_once(tmp_path, view):
    path = torch_zip(tmp_path / "adapter_model.bin", {"w": view})
    stats = scan_values(read_weights(path))
    assert stats["w"].all_zero


def test_a_corrupt_deflate_stream_is_a_data_error(tmp_path):
    path = torch_zip(tmp_path / "adapter_model.bin", {"w": View((64,))}, {"0": bytes(range(256))},
                     compression=zipfile.ZIP_DEFLATED)
    raw = path.read_bytes()
    start, end = member_span(raw, "archive/data/0")
    path.write_bytes(raw[:start] + b"\xff" * (end - start) + raw[end:])
    wf = read_weights(path)
    assert wf.pickle.passed
    with pytest.raises(TensorDataError) as info:
        scan_values(wf)
    assert info.value.kind == "damaged"


def test_a_file_that_shrinks_after_its_header_is_read(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(safetensors_bytes({"a": ("F32", [1 << 18], bytes(1 << 20)), "b": ("F32", [4], bytes(16))}))
    wf = read_weights(path)
    path.write_bytes(path.read_bytes()[:-(1 << 19)])
    with pytest.raises(TensorDataError):
        scan_values(wf)


def test_many_small_tensors_are_classified_one_by_one(tmp_path):
    tensors = {f"t{i:05d}": ("BF16", [2], (NAN[2:] * 2) if i == 777 else bytes(4) if i % 2 else b"\x01\x00\x01\x00")
               for i in range(300_000 // 1000 * 1000 // 100)}
    tensors["big"] = ("F32", [1 << 18], bytes(1 << 20))
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(safetensors_bytes(tensors))
    stats = scan_values(read_weights(path))
    assert [n for n, s in stats.items() if s.nonfinite] == ["t00777"]
    assert stats["t00001"].all_zero and not stats["t00002"].all_zero and stats["big"].all_zero


def test_a_big_endian_archive_is_scanned_in_its_own_byte_order(tmp_path):
    # 0x3f80ff7f read big-endian is 1.0039; read little-endian it would be a NaN. 0x7fc00000 big-endian is a NaN;
    # little-endian, a tiny finite number. One element per storage, so each tensor's verdict is its value's.
    finite, nan = bytes([0x3F, 0x80, 0xFF, 0x7F]), struct.pack(">f", float("nan"))
    views = {"finite": View((1,), key="0"), "nan": View((1,), key="1"),
             "half": View((3,), key="2", storage="HalfStorage")}
    halves = struct.pack(">3e", 0.5, -2.0, 0.0)
    path = torch_zip(tmp_path / "adapter_model.bin", views, {"0": finite, "1": nan, "2": halves}, byteorder="big")
    stats = scan_values(read_weights(path))
    assert not stats["finite"].nonfinite and not stats["finite"].all_zero
    assert stats["nan"].nonfinite
    assert not stats["half"].nonfinite and not stats["half"].all_zero
    # The digest is of the values as torch.load returns them: the same as a little-endian file of those values.
    st_path = tmp_path / "adapter_model.safetensors"
    st_path.write_bytes(safetensors_bytes({"finite": ("F32", [1], finite[::-1]), "nan": ("F32", [1], nan[::-1]),
                                           "half": ("F16", [3], struct.pack("<3e", 0.5, -2.0, 0.0))}))
    assert tensor_digests(read_weights(path)) == tensor_digests(read_weights(st_path))


def test_a_big_endian_element_split_across_reads_is_swapped_whole(monkeypatch):
    from adapter_doctor import tensor_data

    chunks = [memoryview(b"\x3f\x80"), memoryview(b"\x00\x00\x40"), memoryview(b"\x00\x00\x00")]
    out = b"".join(bytes(c) for c in tensor_data._swapped(iter(chunks), "F32"))
    assert np.frombuffer(out, dtype="<f4").tolist() == [1.0, 2.0]
