"""Peak memory of ``finefp8 quantize --calibrate gptq`` against the number of decoder layers.

For each layer count, a random float32 Llama checkpoint with those layers (same layer size)
is written, then calibrated in a fresh child process that samples its own resident memory
(psutil RSS, every 5 ms) and reports the peak above its RSS before calibrating (torch and
transformers already imported). Layer-by-layer calibration holds one decoder layer, so the
peak should not grow with the layer count; the float checkpoint size is printed beside it.

    python benchmarks/calibrate_memory.py --layers 2 12 --hidden 512 --intermediate 1536

Prints one row per layer count: layers, checkpoint MB, one layer MB, peak RSS increase MB,
seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, sys, threading, time
import psutil, torch, transformers
from finefp8.nn.calibrate import CalibrationTokens, quantize_calibrated
proc = psutil.Process()
src, dst, tokens, window = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ids = torch.randint(3, 500, (tokens // window, window), generator=torch.Generator().manual_seed(0))
base = proc.memory_info().rss
peak = [base]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.005)
t = threading.Thread(target=sample, daemon=True); t.start()
t0 = time.perf_counter()
quantize_calibrated(src, dst, CalibrationTokens(ids, "random ids", "-"), progress=False)
dt = time.perf_counter() - t0
stop.set(); t.join()
peak[0] = max(peak[0], proc.memory_info().rss)
print(json.dumps({"peak_increase": peak[0] - base, "seconds": dt}))
"""


def write_model(folder: Path, layers: int, hidden: int, intermediate: int,
                seed: int = 0) -> tuple[int, int]:
    """A random float32 Llama with ``layers`` layers saved to ``folder``; returns its weight
    bytes and the bytes of one decoder layer."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=hidden,
                                   intermediate_size=intermediate, num_hidden_layers=layers,
                                   num_attention_heads=max(1, hidden // 64),
                                   num_key_value_heads=max(1, hidden // 128),
                                   max_position_embeddings=512, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    total = sum(p.numel() * 4 for p in model.parameters())
    one = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    return total, one


def measure(src: Path, dst: Path, tokens: int, window: int) -> dict:
    """Run one calibration in a child process; returns its peak RSS increase and time."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    out = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(dst), str(tokens),
                          str(window)], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 12])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--window", type=int, default=128)
    args = p.parse_args(argv)
    print(f"{'layers':>6} {'ckpt MB':>8} {'layer MB':>8} {'peak+ MB':>9} {'s':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.layers:
            src = Path(tmp) / f"in{n}"
            total, one = write_model(src, n, args.hidden, args.intermediate)
            r = measure(src, Path(tmp) / f"out{n}", args.tokens, args.window)
            print(f"{n:>6} {total / 1e6:>8.1f} {one / 1e6:>8.1f} "
                  f"{r['peak_increase'] / 1e6:>9.1f} {r['seconds']:>6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
