"""Build, cache and load the C kernels of ``cpu_kernels.c``: the compiler and its cache, nothing else.

The C file is compiled on first use (not at install time: ``-march=native`` must see the
machine that runs it, and the package stays pure Python) with the system C compiler (``$CC``,
else ``cc``, else ``gcc``) into a per-user cache directory (``$FINEFP8_CACHE_DIR``, else
``$XDG_CACHE_HOME/finefp8``, else ``~/.cache/finefp8``), keyed by the source, the compiler, the
CPU's feature flags and the flags. ``python -m finefp8.kernels.cpu_build`` builds it ahead of
time (e.g. in a container image) and prints what it built.

``FINEFP8_CPU_ARCH=portable`` builds without ``-march=native`` (baseline x86-64 / aarch64: the
portable C code, no AVX2 or AVX-512 paths; ``avx2``: the AVX2 paths only); ``FINEFP8_DISABLE_CPU_KERNELS=1`` turns the kernels
off. When no library can be built, ``available()`` is False, one warning says why, and
``finefp8.ops`` runs the pure-torch reference (a forced ``backend="cpu"`` raises).

The cache is safe against crashes and concurrent builds: each build runs in its own temporary
folder inside the cache directory (the compiler's own temporary files included, through
``TMPDIR``), the finished library gets ordinary permissions (``0o755`` less the umask) and is
moved into place with one atomic rename; a failed build removes its folder, a killed build's
folder is removed by the next build (its process id is in the name), and a cached library that
fails to load (truncated, foreign, wrong ABI) is deleted and rebuilt once.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

__all__ = [
    "ABI_VERSION",
    "SOURCE",
    "ARCH_FLAGS",
    "ISA_BITS",
    "SIGNATURES",
    "cache_dir",
    "arch",
    "compile_flags",
    "library_file",
    "build",
    "load",
    "library",
    "available",
    "unavailable_reason",
    "library_path",
    "instruction_set",
    "openmp",
    "reset",
]

SOURCE = Path(__file__).with_name("cpu_kernels.c")
ABI_VERSION = 6  # must equal ff8_abi_version() in cpu_kernels.c
_BUILD_PREFIX = ".build-"
_COMMON_FLAGS = ["-O3", "-fno-trapping-math", "-fPIC", "-shared", "-Wno-psabi"]

_i64, _i32, _f32, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
#: name -> (restype, argtypes) of every exported C function.
SIGNATURES = {
    "ff8_abi_version": (_i32, []),
    "ff8_isa": (_i32, []),
    "ff8_cast_e4m3": (None, [_ptr, _ptr, _i64]),
    "ff8_advise_hugepages": (_i32, [_ptr, _i64]),
    "ff8_quant_block": (_i64, [_ptr, _i32, _i64, _i64, _i64, _i64, _i64, _i64, _f32, _i32,
                               _ptr, _ptr]),
    "ff8_quant_group": (_i64, [_ptr, _i32, _i64, _i64, _i64, _i64, _i64, _f32, _i32, _ptr, _ptr]),
    "ff8_dequant_block": (None, [_ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _ptr, _i32]),
    "ff8_dequant_group": (None, [_ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _i32]),
    "ff8_linear_w8": (_i32, [_ptr, _i64, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64,
                             _ptr]),
    "ff8_linear_w8_bf16": (_i32, [_ptr, _i64, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64,
                                  _i64, _ptr]),
    "ff8_quant_block_mt": (_i64, [_ptr, _i32, _i64, _i64, _i64, _i64, _f32, _i32, _ptr, _ptr,
                                  _i32]),
    "ff8_quant_group_mt": (_i64, [_ptr, _i32, _i64, _i64, _i64, _f32, _i32, _ptr, _ptr, _i32]),
    "ff8_dequant_block_mt": (None, [_ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _i32, _i32]),
    "ff8_dequant_group_mt": (None, [_ptr, _ptr, _i64, _i64, _i64, _ptr, _i32, _i32]),
    "ff8_linear_mt": (_i32, [_ptr, _i32, _i64, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _ptr,
                             _i32]),
}

#: Bits of ``ff8_isa()``: the vector paths compiled into the library.
ISA_BITS = {1: "AVX2+F16C+FMA", 2: "AVX-512F/BW", 4: "AVX-512-BF16", 8: "OpenMP"}
#: Tried in order: with OpenMP (the library then shares PyTorch's OpenMP threads), without.
THREAD_FLAGS = (["-fopenmp"], [])


def cache_dir() -> Path:
    """Where built libraries are kept (see the module docstring for the variables)."""
    if os.environ.get("FINEFP8_CACHE_DIR"):
        return Path(os.environ["FINEFP8_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "finefp8"


#: ``$FINEFP8_CPU_ARCH`` values and the flags each adds to ``_COMMON_FLAGS``.
ARCH_FLAGS = {
    "native": ["-march=native"],  # every vector path this CPU has
    "portable": [],  # baseline instruction set: the portable C code only
    "avx2": ["-mavx2", "-mfma", "-mf16c"],  # the AVX2 paths only (what an AVX2 machine runs)
}


def arch() -> str:
    """The build target from ``$FINEFP8_CPU_ARCH``: ``"native"`` (default), ``"portable"`` or
    ``"avx2"`` (x86-64 only: to measure the AVX2 paths on an AVX-512 machine)."""
    value = os.environ.get("FINEFP8_CPU_ARCH", "native").strip().lower() or "native"
    if value not in ARCH_FLAGS:
        raise ValueError(f"FINEFP8_CPU_ARCH={value!r}: expected one of {sorted(ARCH_FLAGS)}")
    return value


def compile_flags(target: str | None = None) -> list[str]:
    """The compiler flags of a build for ``target`` (``arch()`` by default)."""
    target = arch() if target is None else target
    return ARCH_FLAGS[target] + _COMMON_FLAGS


def _cpu_tag() -> str:
    """What ``-march=native`` depends on: the machine and its CPU feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {flags}"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:  # an explicit choice: use it or nothing
        return shutil.which(cc)
    return shutil.which("cc") or shutil.which("gcc")


def library_file(compiler: str, target: str | None = None) -> Path:
    """Cache path of the library built by ``compiler`` for ``target`` on this machine."""
    flags = compile_flags(target)
    key = hashlib.sha256(SOURCE.read_bytes() + compiler.encode() + _cpu_tag().encode()
                         + repr((flags, THREAD_FLAGS)).encode())
    return cache_dir() / f"finefp8_cpu_{key.hexdigest()[:16]}.so"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_builds(folder: Path) -> None:
    """Delete the temporary folders of builds whose process no longer runs (killed builds)."""
    for entry in folder.glob(f"{_BUILD_PREFIX}*"):
        try:
            pid = int(entry.name[len(_BUILD_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


def _file_mode() -> int:
    """``0o755`` less the process umask (what a compiler-written executable would get)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o755 & ~mask


def build(compiler: str, out: Path, target: str | None = None, timeout: float = 300.0) -> None:
    """Compile ``cpu_kernels.c`` into ``out``; raises ``RuntimeError`` with the compiler's error.

    It is compiled with ``-fopenmp`` when the compiler supports it, else without (then each
    call runs on the Python thread pool of ``cpu_threads``). The build happens in a fresh
    folder ``out.parent/.build-<pid>-*`` (the compiler's temporary files too); the result is chmod-ed to ``0o755 & ~umask`` and renamed onto ``out`` atomically,
    so a concurrent reader sees a whole library or none. The folder is removed in every case.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out.parent)
    work = Path(tempfile.mkdtemp(prefix=f"{_BUILD_PREFIX}{os.getpid()}-", dir=out.parent))
    errors = []
    try:
        tmp = work / out.name
        env = dict(os.environ, TMPDIR=str(work))
        for extra in THREAD_FLAGS:
            cmd = [compiler, *compile_flags(target), *extra, "-o", str(tmp), str(SOURCE), "-lm"]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(f"{' '.join(cmd)}: {e}")
                continue
            if res.returncode == 0 and tmp.exists():
                os.chmod(tmp, _file_mode())
                os.replace(tmp, out)
                return
            errors.append(f"{' '.join(cmd)}: {res.stderr.strip()[-400:]}")
        raise RuntimeError("; ".join(errors))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _open(path: Path) -> ctypes.CDLL:
    """Load ``path`` and declare every signature; ``OSError`` when it is not a usable library."""
    lib = ctypes.CDLL(str(path))
    try:
        for fname, (restype, argtypes) in SIGNATURES.items():
            fn = getattr(lib, fname)
            fn.restype, fn.argtypes = restype, argtypes
    except AttributeError as e:
        raise OSError(f"{path} lacks a kernel: {e}") from None
    if lib.ff8_abi_version() != ABI_VERSION:
        raise OSError(f"{path} has ABI {lib.ff8_abi_version()}, expected {ABI_VERSION}")
    return lib


def load() -> tuple[ctypes.CDLL | None, str]:
    """Build if needed and load the library: ``(lib, path)`` or ``(None, why it is unavailable)``.

    A cached file that fails to load is deleted and rebuilt once.
    """
    if os.environ.get("FINEFP8_DISABLE_CPU_KERNELS", "") not in ("", "0"):
        return None, "disabled by FINEFP8_DISABLE_CPU_KERNELS"
    compiler = _compiler()
    if compiler is None:
        which = os.environ.get("CC") or "cc/gcc"
        return None, f"no C compiler found ({which}; set CC or install gcc)"
    try:
        target = arch()
        path = library_file(compiler, target)
    except (OSError, ValueError) as e:
        return None, str(e)
    for attempt in (1, 2):
        try:
            if not path.exists():
                build(compiler, path, target)
            return _open(path), str(path)
        except RuntimeError as e:
            return None, f"compiling {SOURCE.name} failed: {e}"
        except OSError as e:
            if attempt == 2:
                return None, f"loading the kernel library failed: {e}"
            path.unlink(missing_ok=True)  # a broken cached library: build it again
    return None, "unreachable"


_STATE: list[tuple[ctypes.CDLL | None, str]] = []  # [(lib, info)] once loaded in this process


def _loaded() -> tuple[ctypes.CDLL | None, str]:
    """``load()`` once per process; warns (one line) when the kernels are unavailable.

    The result is kept in a plain module list (not ``functools.cache``), so that code traced
    by ``torch.compile`` reads it as a constant instead of tracing the loader.
    """
    if not _STATE:
        lib, info = load()
        if lib is None:
            warnings.warn(f"finefp8: fast CPU kernels unavailable ({info}); using the pure-torch "
                          f"reference", RuntimeWarning, stacklevel=5)
        _STATE.append((lib, info))
    return _STATE[0]


def reset() -> None:
    """Forget the loaded library so the next use loads (or builds) it again (for tests)."""
    _STATE.clear()


def library() -> ctypes.CDLL | None:
    """The loaded library, or ``None`` (builds it on the first call)."""
    return _loaded()[0]


def available() -> bool:
    """True when the compiled CPU kernels can be used (builds them on the first call)."""
    return library() is not None


def unavailable_reason() -> str | None:
    """Why the kernels are unavailable, or ``None`` when they are loaded."""
    lib, info = _loaded()
    return None if lib is not None else info


def library_path() -> str | None:
    """Path of the loaded kernel library, or ``None`` when unavailable."""
    lib, info = _loaded()
    return info if lib is not None else None


def openmp() -> bool:
    """True when the loaded library was built with OpenMP (its ``*_mt`` functions use threads)."""
    lib = library()
    return lib is not None and bool(lib.ff8_isa() & 8)


def instruction_set() -> str:
    """The vector paths compiled into the loaded library (e.g. ``"AVX2+F16C+FMA, AVX-512-BF16"``,
    or ``"portable C"`` when none), then ``", OpenMP"`` when it splits calls with OpenMP;
    ``"unavailable"`` when there is no library."""
    lib = library()
    if lib is None:
        return "unavailable"
    bits = int(lib.ff8_isa())
    names = [name for bit, name in ISA_BITS.items() if bits & bit and bit != 8]
    return (", ".join(names) or "portable C") + (", OpenMP" if bits & 8 else "")


def _main() -> int:
    lib, info = load()
    if lib is None:
        print(f"finefp8 CPU kernels unavailable: {info}", file=sys.stderr)
        return 1
    _STATE[:] = [(lib, info)]
    print(f"{info} ({arch()}: {instruction_set()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
