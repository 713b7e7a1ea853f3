"""Helpers of the fault-injection suite: tiny synthetic checkpoints, raw safetensors files,
tree comparisons and the "complete or clearly not complete" checks."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checkpoint"))
from ckpt_utils import write_checkpoint  # noqa: E402

from finefp8.checkpoint.manifest import MANIFEST_NAME  # noqa: E402

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "driver.py"
SHARDS = [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]


def tiny_tensors(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A 2-layer Llama-like state dict, about 2 MB in bf16: fresh random weights, one
    200-row weight (a partial block), norms, tied embeddings."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    t = {"model.embed_tokens.weight": r(320, 256)}
    for i in range(2):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (1 + r(256)).to(dtype)
        t[p + "self_attn.q_proj.weight"] = r(256, 256)
        t[p + "self_attn.k_proj.weight"] = r(200, 256)
        t[p + "self_attn.v_proj.weight"] = r(128, 256)
        t[p + "self_attn.o_proj.weight"] = r(256, 256)
        t[p + "mlp.gate_proj.weight"] = r(384, 256)
        t[p + "mlp.up_proj.weight"] = r(384, 256)
        t[p + "mlp.down_proj.weight"] = r(256, 384)
    t["model.norm.weight"] = torch.ones(256, dtype=dtype)
    return t


def make_ckpt(root: Path, tensors: dict[str, torch.Tensor] | None = None, n_shards: int = 3,
              config: dict | None = None, **kw) -> Path:
    """A checkpoint of ``tensors`` (default ``tiny_tensors()``) in ``root``."""
    return write_checkpoint(root, tiny_tensors() if tensors is None else tensors, n_shards,
                            config=config, **kw)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """``{relative path: bytes}`` of every file under ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def assert_not_complete(out: Path, partial_ok: bool = False) -> None:
    """OUT is clearly not a finished conversion: absent, or no config.json and no manifest
    that says complete; no ``.partial`` left unless ``partial_ok`` (a SIGKILL leaves the file
    being written, under its ``.partial`` name)."""
    if not out.exists():
        return
    m = manifest(out)
    assert m is None or m["status"] != "complete", m
    assert not (out / "config.json").exists()
    assert partial_ok or not list(out.glob("*.partial"))


def assert_complete_as(out: Path, ref: Path) -> None:
    """OUT is complete and byte-identical to the reference conversion ``ref``."""
    assert manifest(out)["status"] == "complete"
    assert tree_bytes(out) == tree_bytes(ref)


def raw_safetensors(path: Path, header: bytes | dict, data: bytes = b"",
                    length: int | None = None) -> Path:
    """Write a safetensors-like file: ``u64 length`` (default: the header's), the header
    (a dict is JSON-encoded), then ``data``."""
    raw = json.dumps(header).encode() if isinstance(header, dict) else header
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def run_driver(kwargs: dict, env: dict | None = None, wait: bool = True,
               timeout: float = 120) -> subprocess.Popen | subprocess.CompletedProcess:
    """Run ``driver.py`` (``quantize_checkpoint(**kwargs)`` with fault hooks set by ``env``)."""
    e = dict(os.environ, **(env or {}))
    cmd = [sys.executable, str(DRIVER), json.dumps(kwargs)]
    if wait:
        return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)
    return subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(cond, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def children(pid: int) -> list[int]:
    """PIDs of the direct children of ``pid`` (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
