"""Staged codes (finefp8.checkpoint.staged): a ``quantize_checkpoint(calibration=...)`` writes
the codes its stage chose, in the plan's layout, and plain codes for everything else."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from finefp8 import ops
from finefp8.checkpoint.convert import ConversionError, quantize_checkpoint
from finefp8.checkpoint.staged import (
    WORK_DIR,
    Calibration,
    StagedCodes,
    staged_path,
    write_staged,
)

sys.path.insert(0, str(Path(__file__).parent))
from ckpt_utils import llama_tensors, write_checkpoint  # noqa: E402

KEY = "model.layers.0.self_attn.k_proj.weight"  # [192, 576] -> scales [2, 5]


def _all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _chosen(shape=(192, 576), grid=(2, 5)):
    """Codes no plain quantizer would produce: random E4M3 bytes (finite), scales 0.5..1.5."""
    g = torch.Generator().manual_seed(3)
    q = (torch.rand(shape, generator=g) * 200 - 100).to(torch.float8_e4m3fn)
    s = torch.rand(grid, generator=g) + 0.5
    return q, s


def test_staged_roundtrip_and_refusals(tmp_path):
    q, s = _chosen()
    write_staged(tmp_path, "a", {KEY: (q, s)}, {"note": "x"})
    (tmp_path / "other.safetensors").write_bytes(b"not read: no codes- prefix")
    staged = StagedCodes(tmp_path)
    assert staged.keys() == [KEY] and "nope" not in staged
    q2, s2 = staged.get(KEY)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, s)
    assert staged_path(tmp_path, "a").is_file()
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        write_staged(tmp_path, "b", {KEY: (q.float(), s)}, {})


def test_quantize_takes_staged_codes_and_records_metadata(tmp_path):
    write_checkpoint(tmp_path / "in", llama_tensors(), n_shards=3)
    q, s = _chosen()
    calls = []

    def stage(work: Path, keys: frozenset[str]) -> dict:
        calls.append(sorted(keys))
        write_staged(work, "one", {KEY: (q, s)}, {})
        return {"calibrated": 1}

    cal = Calibration({"method": "test"}, {"method": "test", "text": "t"}, stage)
    quantize_checkpoint(tmp_path / "in", tmp_path / "plain", progress=False, tp=())
    quantize_checkpoint(tmp_path / "in", tmp_path / "out", progress=False, tp=(),
                        calibration=cal)
    assert KEY in calls[0] and all(k.endswith(".weight") for k in calls[0])
    plain, out = _all(tmp_path / "plain"), _all(tmp_path / "out")
    assert out.keys() == plain.keys()
    assert torch.equal(out[KEY].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(out[KEY + "_scale_inv"], s)
    for k, v in plain.items():
        if k not in (KEY, KEY + "_scale_inv"):
            a, b = (v.view(torch.uint8), out[k].view(torch.uint8)) if v.dtype == \
                torch.float8_e4m3fn else (v, out[k])
            assert torch.equal(a, b), k
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["finefp8_calibration"] == {"method": "test", "text": "t", "calibrated": 1}
    assert not (tmp_path / "out" / WORK_DIR).exists()
    # dequantizing what was written gives q * s: the codes are what the reader sees
    back = ops.dequantize_blockwise(out[KEY], out[KEY + "_scale_inv"], (128, 128),
                                    torch.float32)
    assert torch.equal(back[:128, :128], q[:128, :128].float() * s[0, 0])


def test_staged_codes_of_the_wrong_shape_are_refused(tmp_path):
    write_checkpoint(tmp_path / "in", llama_tensors(), n_shards=2)

    def stage(work: Path, keys: frozenset[str]) -> dict:
        write_staged(work, "bad", {KEY: _chosen((192, 512), (2, 4))}, {})
        return {}

    with pytest.raises(ConversionError, match="staged codes of .*k_proj"):
        quantize_checkpoint(tmp_path / "in", tmp_path / "out", progress=False, tp=(),
                            calibration=Calibration({"m": 1}, {}, stage))
    assert not (tmp_path / "out").exists()  # bad data: nothing of this run is left
