"""A numerical emulation of how vLLM loads a block-FP8 checkpoint at TP 1 (test helper).

Written from vLLM's loader, independently of ``finefp8.checkpoint.serving``:

* merged layers: ``q_proj/k_proj/v_proj`` -> one ``qkv_proj``, ``gate_proj/up_proj`` -> one
  ``gate_up_proj``, MLA's ``q_a_proj/kv_a_proj_with_mqa`` -> one ``fused_qkv_a_proj``. The FP8
  codes of the parts are stacked by rows; each part's block scales are copied to row
  ``ceil(row_offset / 128)`` of the fused scale grid (``adjust_block_scale_shard``), parts in
  order, a later part overwriting; rows of the grid nobody writes keep the initial value
  ``torch.finfo(float32).min``. The GEMM then scales fused weight row ``x`` with grid row
  ``x // 128`` and column block ``c // 128``.
* every other FP8 weight: ``W = Q * s`` per 128 x 128 block (a single part is always right).

``engine_weights`` returns the float32 weights the engine computes with; a checkpoint folder
of them (``write_engine_checkpoint``) loads in transformers like any bf16 model.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BLOCK = 128
MERGED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
          ("q_a_proj", "kv_a_proj_with_mqa"))
_SCALE = {"fp8": ".weight_scale_inv", "compressed-tensors": ".weight_scale"}


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in ``folder``."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _expand(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    s = scale.float().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    return s[:rows, :cols]


def _fused(codes: list[torch.Tensor], scales: list[torch.Tensor]) -> list[torch.Tensor]:
    rows = [q.shape[0] for q in codes]
    cols = codes[0].shape[1]
    grid = torch.full((math.ceil(sum(rows) / BLOCK), scales[0].shape[1]),
                      torch.finfo(torch.float32).min)
    offset = 0
    for r, s in zip(rows, scales, strict=True):
        first = math.ceil(offset / BLOCK)
        n = math.ceil(r / BLOCK)
        assert first + n <= grid.shape[0], "the engine's scale copy falls outside the grid"
        grid[first:first + n] = s[:n].float()
        offset += r
    w = torch.cat(codes).float() * _expand(grid, sum(rows), cols)
    return list(torch.split(w, rows))


def engine_weights(tensors: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """``{key: float32 tensor}``: what the engine computes with, for every tensor but scales."""
    suffix = _SCALE[layout]
    fp8 = {k for k, v in tensors.items() if v.dtype == torch.float8_e4m3fn}
    out = {k: v.float() for k, v in tensors.items()
           if k not in fp8 and not k.endswith(suffix)}
    for key in sorted(fp8):
        if key in out:
            continue
        parent, last = key[: -len(".weight")].rsplit(".", 1)
        group = next((g for g in MERGED if last in g
                      and all(f"{parent}.{p}.weight" in tensors for p in g)), None)
        keys = [f"{parent}.{p}.weight" for p in group] if group else [key]
        assert all(k in fp8 for k in keys), f"engine refuses a mixed-precision merged layer {keys}"
        codes = [tensors[k] for k in keys]
        scales = [tensors[k[: -len(".weight")] + suffix] for k in keys]
        for k, w in zip(keys, _fused(codes, scales), strict=True):
            out[k] = w
    return out


def write_engine_checkpoint(fp8_folder: Path, out: Path) -> Path:
    """A checkpoint of ``engine_weights(fp8_folder)`` (FP8 weights as bf16, the rest in its own
    dtype) with the FP8 folder's config (``quantization_config`` removed), loadable by
    transformers."""
    cfg = json.loads((Path(fp8_folder) / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    tensors = read_tensors(fp8_folder)
    weights = engine_weights(tensors, qc["quant_method"])
    out.mkdir(parents=True, exist_ok=True)
    dtype = {k: torch.bfloat16 if v.dtype == torch.float8_e4m3fn else v.dtype
             for k, v in tensors.items()}
    save_file({k: v.to(dtype[k]).contiguous() for k, v in weights.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg))
    for f in ("generation_config.json",):
        if (Path(fp8_folder) / f).is_file():
            shutil.copy(Path(fp8_folder) / f, out / f)
    return out
