"""Building and caching the C kernels: file modes, broken caches, killed builds, and the two
other ways to run without the native build (a portable build, no compiler at all)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from finefp8.kernels import cpu, cpu_build

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                              reason="no C compiler")


def _compiler() -> str:
    return shutil.which("cc") or shutil.which("gcc")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@needs_cc
def test_built_library_has_ordinary_permissions_and_no_leftovers(tmp_path, monkeypatch):
    monkeypatch.setenv("FINEFP8_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FINEFP8_CPU_ARCH", "portable")  # the quicker build
    lib, path = cpu_build.load()
    assert lib is not None, path
    mode = stat.S_IMODE(Path(path).stat().st_mode)
    assert mode == 0o755 & ~_umask()
    assert mode != 0o711
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(path).name]


@needs_cc
def test_a_cached_library_that_fails_to_load_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("FINEFP8_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FINEFP8_CPU_ARCH", "portable")
    target = cpu_build.library_file(_compiler(), "portable")
    tmp_path.mkdir(exist_ok=True)
    target.write_bytes(b"\x7fELF truncated by a crash")
    lib, path = cpu_build.load()
    assert lib is not None and path == str(target)
    assert target.stat().st_size > 1000 and lib.ff8_abi_version() == cpu_build.ABI_VERSION


def test_a_killed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    """A build killed with SIGKILL cannot clean up: its folder (named after its process id) is
    removed by the next build; a failed build removes its own folder at once."""
    slow_cc = tmp_path / "slow-cc"
    slow_cc.write_text("#!/bin/sh\nwhile [ $# -gt 1 ]; do [ \"$1\" = -o ] && out=$2; shift; done\n"
                       "echo partial > \"$out\"\nsleep 60\n")
    slow_cc.chmod(0o755)
    cache = tmp_path / "cache"
    env = dict(os.environ, FINEFP8_CACHE_DIR=str(cache), CC=str(slow_cc))
    proc = subprocess.Popen([sys.executable, "-c", "from finefp8.kernels import cpu_build; "
                             "print(cpu_build.load())"], env=env, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(cache.glob(".build-*/*.so")):
        time.sleep(0.2)
    assert any(cache.glob(".build-*/*.so")), "the build did not start"
    os.killpg(proc.pid, signal.SIGKILL)  # the build and its compiler, as a kill of the job
    proc.wait()
    assert not any(cache.glob("*.so")), "a partial library was published"
    failing_cc = tmp_path / "failing-cc"
    failing_cc.write_text("#!/bin/sh\necho 'error: simulated' >&2\nexit 1\n")
    failing_cc.chmod(0o755)
    monkeypatch.setenv("FINEFP8_CACHE_DIR", str(cache))
    monkeypatch.setenv("CC", str(failing_cc))
    lib, why = cpu_build.load()
    assert lib is None and "simulated" in why
    assert list(cache.iterdir()) == [], "leftovers of the killed or the failed build remain"


_SCRIPT = textwrap.dedent("""
    import sys, torch
    from finefp8 import ops
    from finefp8.kernels import cpu_build
    print(cpu_build.available(), cpu_build.instruction_set())
    data = torch.load(sys.argv[1])
    out = {}
    for key, w in data["inputs"].items():
        for fmt in ("fp32", "ue8m0"):
            out[key, fmt, "block"] = ops.quantize_blockwise(w, scale_fmt=fmt)
            out[key, fmt, "group"] = ops.quantize_groupwise(w, scale_fmt=fmt)
        q, s = out[key, "fp32", "block"]
        out[key, "dequant"] = [ops.dequantize_blockwise(q, s, dtype=d)
                               for d in (torch.float32, torch.bfloat16, torch.float16)]
        out[key, "linear"] = [ops.weight_only_linear(x, q, s) for x in data["x"]]
    torch.save({k: v for k, v in out.items()}, sys.argv[2])
""")


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(300, 700, generator=g) * torch.exp(torch.empty(300, 700).uniform_(-10, 5,
                                                                                        generator=g))
    base[:128, :128] = 0.0
    return {str(dt): base.to(dt) for dt in (torch.float32, torch.bfloat16, torch.float16)}


def _run_other_build(tmp_path: Path, env: dict[str, str]) -> tuple[str, dict]:
    inp, outp = tmp_path / "in.pt", tmp_path / "out.pt"
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(t, 700, generator=g).to(dt) for t in (1, 5)
          for dt in (torch.float32, torch.bfloat16)]
    torch.save({"inputs": _inputs(), "x": xs}, inp)
    res = subprocess.run([sys.executable, "-c", _SCRIPT, str(inp), str(outp)],
                         env=dict(os.environ, **env), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip(), torch.load(outp)


def _assert_same_as_native(results: dict, c_linear: bool) -> None:
    """Compare with the native C build in this process: every code, scale and value equal;
    the linear layers against float64 (``c_linear``: the C kernels' fp32 sums of exact
    products; else the reference, which rounds the weight to the input dtype first)."""
    for key, w in _inputs().items():
        for fmt in ("fp32", "ue8m0"):
            for kind, fn in (("block", cpu.quantize_blockwise), ("group", cpu.quantize_groupwise)):
                q, s = fn(w, scale_fmt=fmt)
                oq, os_ = results[key, fmt, kind]
                assert torch.equal(oq.view(torch.uint8), q.view(torch.uint8)), (key, fmt, kind)
                assert torch.equal(os_, s), (key, fmt, kind)
        q, s = cpu.quantize_blockwise(w)
        for got, dt in zip(results[key, "dequant"], (torch.float32, torch.bfloat16, torch.float16),
                           strict=True):
            assert torch.equal(got, cpu.dequantize_blockwise(q, s, dtype=dt))
        g = torch.Generator().manual_seed(4)
        xs = [torch.randn(t, 700, generator=g).to(dt) for t in (1, 5)
              for dt in (torch.float32, torch.bfloat16)]
        w64 = q.double() * s.double().repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :700]
        for x, y in zip(xs, results[key, "linear"], strict=True):
            ref = x.double() @ w64.T  # fp32 sums of exact products, one rounding to x.dtype
            eps = 2.0**-8 if x.dtype == torch.bfloat16 else 2.0**-23
            tol = eps * ref.abs() + (1e-5 if c_linear else eps) * (x.double().abs() @ w64.abs().T)
            assert y.dtype == x.dtype and bool(((y.double() - ref).abs() <= tol).all())


@pytest.mark.skipif(not cpu.available(), reason="the CPU kernels did not build")
def test_no_compiler_runs_the_torch_code_bit_identical_to_the_c_kernels(tmp_path):
    """CC names a compiler that does not exist: the kernels are unavailable, "auto" runs the
    pure-torch reference, and its codes and scales equal the native C kernels' bit for bit."""
    status, results = _run_other_build(tmp_path, {"CC": str(tmp_path / "no-such-cc"),
                                                  "FINEFP8_CACHE_DIR": str(tmp_path / "cache")})
    assert status.splitlines()[-1] == "False unavailable"
    _assert_same_as_native(results, c_linear=False)


def _has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return False
    return {"avx2", "fma", "f16c"} <= set(flags)


@needs_cc
@pytest.mark.skipif(not cpu.available(), reason="the CPU kernels did not build")
@pytest.mark.parametrize("target,isa", [
    ("portable", "portable C"),
    pytest.param("avx2", "AVX2+F16C+FMA", marks=pytest.mark.skipif(
        not _has_avx2(), reason="the CPU has no AVX2/FMA/F16C")),
])
def test_other_builds_are_bit_identical_to_the_native_one(tmp_path, target, isa):
    """FINEFP8_CPU_ARCH=portable: no -march=native, so none of the AVX2/AVX-512 paths (the
    portable C code); =avx2: the AVX2 paths only. Both give the same codes, scales and values
    as the native build, and their linear layer matches float64."""
    status, results = _run_other_build(tmp_path, {"FINEFP8_CPU_ARCH": target,
                                                  "FINEFP8_CACHE_DIR": str(tmp_path / "cache")})
    assert status.splitlines()[-1].startswith(f"True {isa}")
    assert "AVX-512" not in status
    _assert_same_as_native(results, c_linear=True)


@needs_cc
def test_prebuild_command(tmp_path):
    """``python -m finefp8.kernels.cpu_build`` builds into the cache and says what it built."""
    env = dict(os.environ, FINEFP8_CACHE_DIR=str(tmp_path), FINEFP8_CPU_ARCH="portable")
    res = subprocess.run([sys.executable, "-m", "finefp8.kernels.cpu_build"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-1000:]
    built = list(tmp_path.glob("finefp8_cpu_*.so"))
    assert len(built) == 1 and str(built[0]) in res.stdout and "portable C" in res.stdout
    bad = subprocess.run([sys.executable, "-m", "finefp8.kernels.cpu_build"],
                         env=dict(env, CC=str(tmp_path / "missing-cc")), capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode == 1 and "no C compiler" in bad.stderr
