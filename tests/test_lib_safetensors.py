"""safetensors reading: truncated/corrupt files are one-line UserErrors; shards == single file."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import assert_one_line
from safetensors.torch import save_file

from weight_geometry import safetensors_file
from weight_geometry.errors import UserError
from weight_geometry.safetensors_file import SafetensorsReader, directory_entries, read_header

#: Chunk size for the chunked-read tests: a few hundred bytes, so tiny tensors span many chunks.
SMALL_CHUNK = 200


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 6, generator=g),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(4, 6, generator=g),
        "model.layers.1.self_attn.q_proj.weight": torch.randn(8, 6, generator=g).bfloat16(),
        "model.layers.1.mlp.gate_proj.weight": torch.randn(10, 6, generator=g).half(),
    }


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_truncated_data_raises_user_error(tmp_path, keep):
    full = tmp_path / "full.safetensors"
    save_file(_tensors(), str(full))
    data = full.read_bytes()
    cut = tmp_path / "model.safetensors"
    cut.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(UserError) as info:
        read_header(cut)
    assert_one_line(info.value, cut)
    with pytest.raises(UserError) as info:
        directory_entries(tmp_path)
    assert_one_line(info.value, cut)


@pytest.mark.parametrize("n_bytes", [0, 5, 8, 20])
def test_truncated_header_raises_user_error(tmp_path, n_bytes):
    full = tmp_path / "full.safetensors"
    save_file(_tensors(), str(full))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:n_bytes])
    with pytest.raises(UserError) as info:
        read_header(cut)
    assert_one_line(info.value, cut)
    assert (f"file is {n_bytes} bytes, shorter than the 8-byte header length" if n_bytes < 8
            else "truncated safetensors file (header says") in str(info.value)


def test_garbage_header_raises_user_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((12).to_bytes(8, "little") + b"not json!!!!" + b"\0" * 16)
    with pytest.raises(UserError) as info:
        read_header(bad)
    assert_one_line(info.value, bad)
    assert "the safetensors header is not valid JSON" in str(info.value)


def _read_all(directory) -> dict[str, np.ndarray]:
    entries = directory_entries(directory)
    reader = SafetensorsReader(entries)
    return {name: reader.read(name) for name in entries}


def test_sharded_reads_same_as_single(tmp_path):
    tensors = _tensors(3)
    single = tmp_path / "single"
    sharded = tmp_path / "sharded"
    single.mkdir()
    sharded.mkdir()
    save_file(tensors, str(single / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2],
              "model-00002-of-00002.safetensors": names[2:]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(sharded / shard))
        weight_map.update(dict.fromkeys(shard_names, shard))
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))

    a, b = _read_all(single), _read_all(sharded)
    assert set(a) == set(b) == set(tensors)
    entries = directory_entries(sharded)
    for name, t in tensors.items():
        assert a[name].dtype == np.float32 and b[name].dtype == np.float32
        np.testing.assert_array_equal(a[name], b[name])
        np.testing.assert_array_equal(b[name], t.float().numpy())
        assert entries[name].shape == tuple(t.shape)
        assert entries[name].file.name == weight_map[name]
    assert {e.dtype for e in entries.values()} == {"F32", "BF16", "F16"}


def test_missing_shard_and_empty_dir(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(UserError, match="model-00001-of-00002.safetensors"):
        directory_entries(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="empty"):
        directory_entries(empty)


def _write_sharded(directory, shards: dict[str, dict[str, torch.Tensor]],
                   weight_map: dict[str, str]) -> None:
    directory.mkdir()
    for shard, tensors in shards.items():
        save_file(tensors, str(directory / shard))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("owner", ["a.safetensors", "b.safetensors"])
def test_a_tensor_in_two_shards_is_read_from_the_one_the_weight_map_names(tmp_path, owner):
    """Both shards hold tensor x (different values); the weight_map's choice is read, whichever
    shard sorts last."""
    shards = {"a.safetensors": {"x": torch.ones(2, 3), "y": torch.zeros(2)},
              "b.safetensors": {"x": torch.full((2, 3), 7.0), "z": torch.zeros(2)}}
    _write_sharded(tmp_path / "m", shards,
                   {"x": owner, "y": "a.safetensors", "z": "b.safetensors"})
    entries = directory_entries(tmp_path / "m")
    assert entries["x"].file.name == owner
    np.testing.assert_array_equal(SafetensorsReader(entries).read("x"), shards[owner]["x"])


def test_a_shard_without_a_tensor_the_weight_map_puts_in_it(tmp_path):
    _write_sharded(tmp_path / "m", {"a.safetensors": {"y": torch.zeros(2)},
                                    "b.safetensors": {"x": torch.ones(2)}},
                   {"x": "a.safetensors", "y": "a.safetensors"})
    with pytest.raises(UserError) as info:
        directory_entries(tmp_path / "m")
    assert_one_line(info.value, tmp_path / "m" / "model.safetensors.index.json")
    assert "weight_map puts tensor x in a.safetensors, which has no such tensor" in str(
        info.value)


def test_every_bf16_bit_pattern_and_f64_decode_like_torch(tmp_path):
    """All 65536 bf16 values (zeros, subnormals, inf, NaNs) decode bit-exactly as torch's
    bfloat16 -> float32; float64 rounds as torch's cast; a repeated read gives the same bits."""
    bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    tensors = {"bf16": bits.view(torch.bfloat16).reshape(256, 256),
               "f64": torch.randn(7, 5, dtype=torch.float64) * 1e3,
               "f16": torch.randn(3, 4).half()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = SafetensorsReader(directory_entries(tmp_path))
    first = {name: reader.read(name) for name in ("bf16", "f64", "f16")}
    again = reader.read("bf16")
    for name, t in tensors.items():
        expected = t.float().numpy()
        assert first[name].dtype == np.float32 and first[name].shape == expected.shape
        np.testing.assert_array_equal(first[name].view(np.uint32), expected.view(np.uint32))
    np.testing.assert_array_equal(again.view(np.uint32), first["bf16"].view(np.uint32))


def test_chunked_reads_equal_torch(tmp_path, monkeypatch):
    """Tensors spanning many chunks, not a whole number of them (nor of elements per chunk for
    bf16/f16/f64), read back bit-exactly as torch's float32 cast; float32 is read whole."""
    monkeypatch.setattr(safetensors_file, "READ_CHUNK", SMALL_CHUNK)
    g = torch.Generator().manual_seed(5)
    base = torch.randn(37, 29, generator=g) * 100  # 1073 elements
    tensors = {"bf16": base.bfloat16(), "f16": base.half(), "f64": base.double() / 3,
               "f32": base, "vector": base[0].bfloat16(), "one": base[:1, :1].half()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = SafetensorsReader(directory_entries(tmp_path))
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if name in ("bf16", "f16", "f64", "f32"):
            assert nbytes > 4 * SMALL_CHUNK and nbytes % SMALL_CHUNK, name
        got = reader.read(name)
        expected = t.float().numpy()
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    # bf16 is the high half of the float32 bits, whatever the value.
    bits = (tensors["bf16"].view(torch.int16).numpy().astype(np.uint16).astype(np.uint32) << 16)
    np.testing.assert_array_equal(reader.read("bf16").view(np.uint32), bits)


def test_concurrent_reads_of_one_reader_match_serial(tmp_path, monkeypatch):
    """8 threads reading different bf16 tensors of one reader, chunk by chunk, get exactly the
    single-threaded results: reads share no buffer."""
    monkeypatch.setattr(safetensors_file, "READ_CHUNK", SMALL_CHUNK)
    g = torch.Generator().manual_seed(6)
    tensors = {f"t{i}": torch.randn(40 + 3 * i, 33, generator=g).bfloat16() for i in range(6)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = SafetensorsReader(directory_entries(tmp_path))
    names = sorted(tensors)
    serial = {name: reader.read(name) for name in names}
    for name, t in tensors.items():
        np.testing.assert_array_equal(serial[name], t.float().numpy())

    def read_many(worker: int) -> list[tuple[str, np.ndarray]]:
        order = names[worker % len(names):] + names[:worker % len(names)]
        return [(name, reader.read(name)) for _ in range(10) for name in order]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(read_many, range(8)))
    assert sum(len(r) for r in results) == 8 * 10 * len(names)
    for result in results:
        for name, got in result:
            np.testing.assert_array_equal(got.view(np.uint32), serial[name].view(np.uint32))


@pytest.mark.parametrize("name", ["bf16", "f32"])
def test_file_truncated_after_header_read_raises_user_error(tmp_path, monkeypatch, name):
    """A file cut after its header was read (the directory is read once, tensors later): the
    short read is the one-line 'is truncated' UserError, for chunked and whole reads."""
    monkeypatch.setattr(safetensors_file, "READ_CHUNK", SMALL_CHUNK)
    path = tmp_path / "model.safetensors"
    save_file({"bf16": torch.randn(30, 20).bfloat16(), "f32": torch.randn(30, 20)}, str(path))
    entries = directory_entries(tmp_path)
    entry = entries[name]
    with open(path, "r+b") as fh:
        fh.truncate(entry.end - 3 * SMALL_CHUNK // 2)
    with pytest.raises(UserError) as info:
        SafetensorsReader(entries).read(name)
    assert_one_line(info.value, path)
    assert str(info.value) == f"{path}: tensor {name} is truncated"


def test_unknown_dtype_and_size_mismatch_raise_user_error(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"x": torch.randn(4, 5)}, str(path))
    entry = directory_entries(tmp_path)["x"]
    reader = SafetensorsReader({
        "i8": safetensors_file.TensorEntry(path, "I8", (4, 5), entry.start, entry.start + 20),
        "short": safetensors_file.TensorEntry(path, "F32", (4, 5), entry.start, entry.end - 4)})
    with pytest.raises(UserError, match="tensor i8 has dtype I8; readable: F64, F32, F16, BF16"):
        reader.read("i8")
    with pytest.raises(UserError, match="tensor short has 76 bytes, not 80"):
        reader.read("short")


def test_byte_range_longer_than_shape_raises_user_error(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"x": torch.randn(4, 5), "y": torch.randn(2)}, str(path))
    entry = directory_entries(tmp_path)["x"]
    reader = SafetensorsReader({
        "long": safetensors_file.TensorEntry(path, "F32", (4, 5), entry.start, entry.end + 4)})
    with pytest.raises(UserError, match="tensor long has 84 bytes, not 80"):
        reader.read("long")


def test_header_offsets_against_hand_built_file(tmp_path):
    """A file written byte by byte: offsets are after the 8-byte length and the header; a
    file one byte short of the last tensor's end is truncated."""
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([1.5, -2.0], dtype=np.float64)
    header = json.dumps({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                         "b": {"dtype": "F64", "shape": [2], "data_offsets": [24, 40]}}).encode()
    data = len(header).to_bytes(8, "little") + header + a.tobytes() + b.tobytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    entries = read_header(path)
    start = 8 + len(header)
    assert (entries["a"].start, entries["a"].end) == (start, start + 24)
    assert (entries["b"].start, entries["b"].end) == (start + 24, start + 40)
    reader = SafetensorsReader(entries)
    np.testing.assert_array_equal(reader.read("a"), a)
    np.testing.assert_array_equal(reader.read("b"), b.astype(np.float32))
    path.write_bytes(data[:-1])
    with pytest.raises(UserError, match="tensor b extends past the end of the file"):
        read_header(path)
