"""Split GGUF files (``NAME-0000i-of-0000N.gguf``, as llama.cpp's ``llama-gguf-split`` and gguf's
``GGUFWriter(split_max_tensors=...)`` write them): opened by the first part, each tensor read
from the part holding it, the same weights as the unsplit file; broken splits are one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import assert_ok, assert_one_line, make_llama_checkpoint, run_snakemake
from gguf_convert import convert_hf_to_gguf

from weight_geometry.checkpoint import open_checkpoint
from weight_geometry.errors import UserError
from weight_geometry.gguf_file import GGUFFile

# The tiny Llama (4 layers) has 9 tensors a layer, 3 more outside them: 39 tensors.
N_TENSORS = 39


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return make_llama_checkpoint(tmp_path_factory.mktemp("hf") / "tiny-llama")


def converted(hf, directory, qtype=None, split_max_tensors=0):
    directory.mkdir(parents=True, exist_ok=True)
    return convert_hf_to_gguf(hf, directory / "tiny.gguf", qtype, split_max_tensors)


def user_error(path, fold_norms=False) -> str:
    with pytest.raises(UserError) as info:
        open_checkpoint(str(path), fold_norms)
    return assert_one_line(info.value)


@pytest.mark.parametrize("qtype,max_tensors,n_parts", [
    ("F32", 20, 2), ("Q8_0", 15, 3), ("Q8_0", 38, 2)])
def test_split_reads_as_the_unsplit_file(tmp_path, tiny_hf, qtype, max_tensors, n_parts):
    """Every weight of every layer, raw and with the norms folded, equals the unsplit file's;
    the first part names the model, and each tensor is read from (and its errors name) the
    part that holds it. With 38 tensors a part, the second holds one tensor."""
    from gguf import GGMLQuantizationType as QT

    whole = converted(tiny_hf, tmp_path / "whole", QT[qtype])
    parts = converted(tiny_hf, tmp_path / "split", QT[qtype], max_tensors)
    assert len(parts) == n_parts and parts[0].name == f"tiny-00001-of-0000{n_parts}.gguf"
    ref = open_checkpoint(str(whole[0]), fold_norms=True)
    ckpt = open_checkpoint(str(parts[0]), fold_norms=True)
    assert ckpt.dims == ref.dims and ckpt.storage_dtype == ref.storage_dtype
    assert ckpt.path == parts[0]
    assert {k: v for k, v in ckpt.describe(True).items() if k not in ("source", "path")} == {
        k: v for k, v in ref.describe(True).items() if k not in ("source", "path")}
    held = {name: part for part in parts for name in GGUFFile(part).tensors}
    assert len(held) == N_TENSORS and ckpt._files == held
    for layer in range(ref.dims.n_layers):
        for fold in (False, True):
            got, expected = ckpt.read_layer(layer, fold), ref.read_layer(layer, fold)
            assert got.keys() == expected.keys()
            for wt, w in expected.items():
                np.testing.assert_array_equal(got[wt], w, err_msg=f"{wt} {layer} {fold}")


def test_a_later_part_names_the_first(tmp_path, tiny_hf):
    parts = converted(tiny_hf, tmp_path, split_max_tensors=15)
    assert user_error(parts[1]) == (
        f"{parts[1]}: part 2 of a split GGUF (GGUF metadata split.no = 1, split.count = 3);"
        " open the model by its first part, tiny-00001-of-00003.gguf (allowed: a .gguf file,"
        " or the first part of a split one)")


def test_missing_part(tmp_path, tiny_hf):
    parts = converted(tiny_hf, tmp_path, split_max_tensors=15)
    parts[2].unlink()
    assert user_error(parts[0]) == (
        f"{parts[0]}: part 3 of this split GGUF (3 parts), {parts[2]}, does not exist"
        " (allowed: all 3 parts side by side)")


def test_first_part_renamed(tmp_path, tiny_hf):
    """The other parts' names follow from the first's: a renamed first part cannot find
    them."""
    parts = converted(tiny_hf, tmp_path, split_max_tensors=15)
    renamed = parts[0].rename(tmp_path / "model.gguf")
    msg = user_error(renamed)
    assert msg.startswith(f"{renamed}: the first part of a split GGUF (GGUF metadata"
                          " split.count = 3) whose name does not end in -00001-of-00003.gguf")


def test_part_of_another_split(tmp_path, tiny_hf):
    """Part 2 of a two-part split, named as part 2 of a three-part one."""
    parts = converted(tiny_hf, tmp_path / "three", split_max_tensors=15)
    other = converted(tiny_hf, tmp_path / "two", split_max_tensors=20)
    shutil.copy(other[1], parts[1])
    assert user_error(parts[0]) == (
        f"{parts[1]}: GGUF metadata split.no = 1, split.count = 2; as part 2 of"
        " tiny-00001-of-00003.gguf it must say split.no = 1, split.count = 3 (a part of"
        " another split?)")


def write_part(path, number, count, tensors, total, arch=True):
    """A hand-made part: ``tensors`` (name -> array), split.* keys, the model's metadata in
    the first part only."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    if not arch:
        writer.kv_data[0].clear()
    writer.add_uint16("split.no", number)
    writer.add_uint16("split.count", count)
    writer.add_int32("split.tensors.count", total)
    for name, a in tensors.items():
        writer.add_tensor(name, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tensor_in_two_parts(tmp_path):
    a = np.zeros((4, 4), np.float32)
    first = write_part(tmp_path / "m-00001-of-00002.gguf", 0, 2, {"x": a, "y": a}, 3)
    second = write_part(tmp_path / "m-00002-of-00002.gguf", 1, 2, {"y": a}, 3, arch=False)
    assert user_error(first) == (
        f"{second}: tensor y is also in {first} (allowed: each tensor in one part of a split"
        " GGUF)")


def test_tensor_count_differs_from_split_tensors_count(tmp_path):
    a = np.zeros((4, 4), np.float32)
    first = write_part(tmp_path / "m-00001-of-00002.gguf", 0, 2, {"x": a}, 3)
    write_part(tmp_path / "m-00002-of-00002.gguf", 1, 2, {"y": a}, 3, arch=False)
    assert user_error(first) == (
        f"{first}: the 2 parts of this split GGUF hold 2 tensors, its GGUF metadata"
        " split.tensors.count says 3 (a part truncated or from another model?)")


def test_bad_split_count(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "m.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_string("split.count", "two")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert user_error(path) == (f"{path}: GGUF metadata split.count: 'two' is not allowed (an"
                                " integer >= 1)")


def test_one_part_split_is_one_file(tmp_path, tiny_hf):
    """split.count = 1 (what llama-gguf-split writes for a model that fits one part) is a
    plain file, whatever its name."""
    whole = converted(tiny_hf, tmp_path)[0]
    ref = open_checkpoint(str(whole)).read_layer(2)
    from gguf import GGUFReader, GGUFWriter

    reader = GGUFReader(str(whole))
    single = tmp_path / "single.gguf"
    writer = GGUFWriter(str(single), "llama")
    for key in ("block_count", "embedding_length", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv", "attention.key_length"):
        writer.add_uint32(f"llama.{key}", int(reader.fields[f"llama.{key}"].contents()))
    writer.add_uint16("split.no", 0)
    writer.add_uint16("split.count", 1)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data).reshape(tuple(reversed(t.shape.tolist()))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    got = open_checkpoint(str(single)).read_layer(2)
    for wt, w in ref.items():
        np.testing.assert_array_equal(got[wt], w)


@pytest.mark.workflow
def test_workflow_split_equals_unsplit(tmp_path, tiny_hf):
    """The workflow on a three-part split gives the unsplit file's numbers (norms folded,
    the default)."""
    whole = converted(tiny_hf, tmp_path / "whole")[0]
    first = converted(tiny_hf, tmp_path / "split", split_max_tensors=15)[0]
    models = {"whole": {"source": str(whole)}, "split": {"source": str(first)}}
    per_model = ["model.json", "effective_ranks.csv", "k4/alignment.parquet",
                 "k4/similarity_head0.npy"]
    targets = [f"results/{name}/{path}" for name in models for path in per_model]
    work = tmp_path / "run"
    assert_ok(run_snakemake(work, *targets, config={
        "models": models, "top_k": 4, "heads": {"sample": 2}, "device": "cpu"}))
    a, b = work / "results/whole", work / "results/split"
    meta = json.loads((b / "model.json").read_text())
    assert meta["path"] == str(first) and meta["norm_gains"] == "folded into the projections"
    pd.testing.assert_frame_equal(pd.read_csv(a / "effective_ranks.csv"),
                                  pd.read_csv(b / "effective_ranks.csv"))
    pd.testing.assert_frame_equal(pd.read_parquet(a / "k4/alignment.parquet"),
                                  pd.read_parquet(b / "k4/alignment.parquet"))
    np.testing.assert_array_equal(np.load(a / "k4/similarity_head0.npy"),
                                  np.load(b / "k4/similarity_head0.npy"))
