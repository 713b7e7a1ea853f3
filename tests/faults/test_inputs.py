"""Hostile and odd inputs are refused before any byte is written, with the file and the
problem named (issue 10 items 5, 6 and 8, and the input cases that already worked)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faultkit import (  # noqa: E402
    SHARDS,
    assert_not_complete,
    make_ckpt,
    manifest,
    raw_safetensors,
    tiny_tensors,
)

from finefp8.checkpoint.convert import dequantize_checkpoint, quantize_checkpoint  # noqa: E402
from finefp8.cli import main  # noqa: E402

F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
GOOD = (b'{"a":' + json.dumps(F32_4).encode() + b"}", bytes(16))

HEADERS = {  # case -> (header, data, declared length or None, expected message part)
    "short_file": (None, b"\x01\x02\x03", None, "not a safetensors file"),
    "length_beyond_file": (GOOD[0], GOOD[1], 10**6, "corrupt or truncated safetensors header"),
    "zero_length": (b"", bytes(16), 0, "corrupt or truncated safetensors header"),
    "not_utf8": (b'{"\xff\xfe": 1}', b"", None, "not UTF-8"),
    "not_json": (b"{not json at all", b"", None, "not JSON"),
    "json_array": (b"[]", b"", None, "not an object"),
    "duplicate_key": (b'{"a":' + json.dumps(F32_4).encode() + b',"a":'
                      + json.dumps(F32_4).encode() + b"}", bytes(16), None, "duplicate key"),
    "nan_constant": (b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 16]}}',
                     bytes(16), None, "non-standard JSON constant NaN"),
    "deep_nesting": (b'{"a": ' + b"[" * 200000 + b"]" * 200000 + b"}", b"", None,
                     "nested too deeply"),
    "unknown_dtype": ({"a": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 4]}}, bytes(4),
                      None, "not a safetensors dtype"),
    "negative_dim": ({"a": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}},
                     bytes(16), None, "non-negative integers"),
    "float_dim": ({"a": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}},
                  bytes(16), None, "non-negative integers"),
    "bool_dim": ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
                 bytes(4), None, "non-negative integers"),
    "missing_field": ({"a": {"dtype": "F32", "shape": [4]}}, bytes(16), None,
                      "'dtype', 'shape' and 'data_offsets'"),
    "entry_not_object": ({"a": [1, 2]}, b"", None, "'dtype', 'shape' and 'data_offsets'"),
    "reversed_offsets": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [16, 0]}},
                         bytes(16), None, "0 <= begin <= end"),
    "size_mismatch": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}},
                      bytes(12), None, "needs 16"),
    "overlap": ({"a": F32_4, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},
                bytes(24), None, "overlaps"),
    "gap": ({"a": F32_4, "b": {"dtype": "F32", "shape": [1], "data_offsets": [20, 24]}},
            bytes(24), None, "gap of 4 bytes"),
    "truncated_data": ({"a": F32_4}, bytes(10), None, "truncated"),
    "trailing_bytes": ({"a": F32_4}, bytes(20), None, "bytes after the last tensor"),
    "metadata_not_strings": ({"__metadata__": {"format": 1}, "a": F32_4}, bytes(16), None,
                             "__metadata__"),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_corrupt_header_refused_before_writing(case, tmp_path, capsys):
    src = make_ckpt(tmp_path / "in")
    header, data, length, expect = HEADERS[case]
    if header is None:
        (src / SHARDS[1]).write_bytes(data)
    else:
        raw_safetensors(src / SHARDS[1], header, data, length)
    out = tmp_path / "out"
    assert main(["quantize", str(src), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert SHARDS[1] in err and expect in err, err
    assert "Traceback" not in err
    assert not out.exists()


def _index(src: Path) -> dict:
    return json.loads((src / "model.safetensors.index.json").read_text())


def _put_index(src: Path, index: object) -> None:
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


def _hostile_index(src: Path, case: str) -> str:
    """Damage ``src``'s index as ``case`` says; returns the expected message part."""
    idx = _index(src)
    key = next(iter(idx["weight_map"]))
    if case == "traversal":
        (src.parent / "evil.safetensors").write_bytes((src / SHARDS[0]).read_bytes())
        idx["weight_map"][key] = "../evil.safetensors"
        _put_index(src, idx)
        return "path traversal"
    if case == "absolute":
        idx["weight_map"][key] = str(src / SHARDS[0])
        _put_index(src, idx)
        return "path traversal"
    if case == "not_object":
        _put_index(src, [idx])
        return "not an object"
    if case == "weight_map_list":
        idx["weight_map"] = list(idx["weight_map"])
        _put_index(src, idx)
        return "no weight_map"
    if case == "shard_not_string":
        idx["weight_map"][key] = 3
        _put_index(src, idx)
        return "not a file name"
    if case == "metadata_list":
        idx["metadata"] = [1]
        _put_index(src, idx)
        return "'metadata' must be an object"
    if case == "key_not_in_shard":
        idx["weight_map"]["model.ghost.weight"] = SHARDS[0]
        _put_index(src, idx)
        return "does not hold it"
    if case == "missing_shard":
        (src / SHARDS[2]).unlink()
        return "which is missing"
    if case == "duplicate_key":
        text = (src / "model.safetensors.index.json").read_text()
        (src / "model.safetensors.index.json").write_text(
            text.replace('"weight_map": {', f'"weight_map": {{"{key}": "{SHARDS[2]}", ', 1))
        return "duplicate key"
    if case == "config_index_name":
        idx["weight_map"][key] = "config.json"
        _put_index(src, idx)
        return "special names"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["traversal", "absolute", "not_object", "weight_map_list",
                                  "shard_not_string", "metadata_list", "key_not_in_shard",
                                  "missing_shard", "duplicate_key", "config_index_name"])
def test_hostile_index_refused_before_writing(case, tmp_path, capsys):
    src = make_ckpt(tmp_path / "in")
    expect = _hostile_index(src, case)
    out = tmp_path / "out"
    assert main(["quantize", str(src), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "model.safetensors.index.json" in err and expect in err, err
    assert not out.exists()


CONFIGS = {
    "list": ("[1, 2]", "not an object"),
    "not_json": ("{'model_type': 'llama'}", "not JSON"),
    "nan": ('{"model_type": "llama", "rope_theta": NaN}', "non-standard JSON constant"),
    "quantization_config_string": ('{"quantization_config": "fp8"}', "must be an object"),
    "duplicate_key": ('{"model_type": "llama", "model_type": "x"}', "duplicate key"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_hostile_config_refused_before_writing(case, tmp_path, capsys):
    src = make_ckpt(tmp_path / "in")
    text, expect = CONFIGS[case]
    (src / "config.json").write_text(text)
    out = tmp_path / "out"
    assert main(["quantize", str(src), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "config.json" in err and expect in err, err
    assert not out.exists()


def test_missing_config_refused_before_writing(tmp_path, capsys):
    """Choice: quantize refuses a checkpoint without config.json (the output would have no
    quantization_config, so no engine would know it is FP8); dequantize accepts one."""
    src = make_ckpt(tmp_path / "in")
    q = tmp_path / "q"
    quantize_checkpoint(src, q, progress=False, tp=())
    (src / "config.json").unlink()
    out = tmp_path / "out"
    assert main(["quantize", str(src), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "no config.json" in err and "quantization_config" in err
    assert not out.exists()
    (q / "config.json").unlink()
    dequantize_checkpoint(q, tmp_path / "deq", progress=False)
    assert manifest(tmp_path / "deq")["status"] == "complete"


def test_bad_block_size_in_config_refused(tmp_path, capsys):
    src = make_ckpt(tmp_path / "in")
    q = tmp_path / "q"
    quantize_checkpoint(src, q, progress=False, tp=())
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [0, 128]
    (q / "config.json").write_text(json.dumps(cfg))
    assert main(["dequantize", str(q), str(tmp_path / "out"), "--quiet"]) == 1
    assert "two positive integers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bin_named_shard_is_not_overwritten_by_the_file_copy(tmp_path):
    """Issue 10 item 5: the index names a shard ``*.bin`` (a safetensors file all the same)."""
    src = make_ckpt(tmp_path / "in")
    idx = _index(src)
    (src / SHARDS[0]).rename(src / "model-00001-of-00003.bin")
    idx["weight_map"] = {k: ("model-00001-of-00003.bin" if v == SHARDS[0] else v)
                         for k, v in idx["weight_map"].items()}
    _put_index(src, idx)
    out = tmp_path / "out"
    quantize_checkpoint(src, out, progress=False, tp=())
    with safe_open(str(out / "model-00001-of-00003.bin"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert "F8_E4M3" in dtypes  # the quantized shard, not the BF16 input copied over it
    assert manifest(out)["status"] == "complete"
    back = tmp_path / "back"
    dequantize_checkpoint(out, back, progress=False)
    assert set(load_file(str(back / "model-00001-of-00003.bin"))) == {
        k for k, v in idx["weight_map"].items() if v == "model-00001-of-00003.bin"}


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_zero_element_tensor_anywhere(where, tmp_path):
    """Issue 10 item 6: a [0, 256] weight (and a [0] vector) in any position of a shard."""
    t = tiny_tensors(seed=2)
    keys = list(t)
    empty = {"model.layers.0.mlp.empty_proj.weight": torch.zeros(0, 256, dtype=torch.bfloat16),
             "model.layers.0.empty_vec": torch.zeros(0, dtype=torch.bfloat16)}
    pos = {"first": 0, "middle": len(keys) // 2, "last": len(keys)}[where]
    tensors = {k: t[k] for k in keys[:pos]} | empty | {k: t[k] for k in keys[pos:]}
    src = make_ckpt(tmp_path / "in", tensors, n_shards=1)
    out = tmp_path / "out"
    assert main(["quantize", str(src), str(out), "--quiet", "--no-serving-check"]) == 0
    got = load_file(str(out / "model.safetensors"))
    assert got["model.layers.0.mlp.empty_proj.weight"].shape == (0, 256)
    assert got["model.layers.0.empty_vec"].shape == (0,)
    back = tmp_path / "back"
    dequantize_checkpoint(out, back, progress=False)
    assert load_file(str(back / "model.safetensors"))["model.layers.0.empty_vec"].shape == (0,)


def test_zero_element_fp8_weight_dequantizes(tmp_path):
    root = tmp_path / "fp8"
    root.mkdir()
    save_file({"model.layers.0.mlp.down_proj.weight": torch.zeros(0, 256).to(torch.float8_e4m3fn),
               "model.layers.0.mlp.down_proj.weight_scale_inv": torch.ones(0, 2),
               "model.norm.weight": torch.ones(8)}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "fp8", "weight_block_size": [128, 128]}}))
    dequantize_checkpoint(root, tmp_path / "out", progress=False)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert got["model.layers.0.mlp.down_proj.weight"].shape == (0, 256)
    assert manifest(tmp_path / "out")["status"] == "complete"


def test_nan_weight_refused_and_out_removed(tmp_path, capsys):
    t = tiny_tensors(seed=3)
    t["model.layers.1.mlp.up_proj.weight"][200, 100] = float("nan")
    src = make_ckpt(tmp_path / "in", t)
    out = tmp_path / "out"
    assert main(["quantize", str(src), str(out), "--quiet", "--no-serving-check"]) == 1
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.up_proj.weight" in err and "row 200, column 100" in err
    assert not out.exists()
    assert main(["quantize", str(src), str(out), "--quiet", "--no-serving-check",
                 "--allow-nonfinite"]) == 0
    codes = load_file(str(out / SHARDS[2]))["model.layers.1.mlp.up_proj.weight"]
    assert bool(codes.float().isnan()[200, 100])


def test_already_fp8_refused(src, ref, tmp_path, capsys):
    assert main(["quantize", str(ref), str(tmp_path / "out"), "--quiet"]) == 1
    assert "already quantized" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_out_inside_in_refused(src, capsys):
    assert main(["quantize", str(src), str(src / "sub"), "--quiet"]) == 1
    assert "outside IN" in capsys.readouterr().err
    assert_not_complete(src / "sub")
    assert not (src / "sub").exists()
