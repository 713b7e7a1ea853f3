"""``finefp8 quantize --calibrate gptq``: GPTQ-chosen FP8 codes, one decoder layer at a time.

The output has exactly the layout of a plain ``quantize`` (E4M3 codes, fp32 128x128 scales
``amax/448``, ``fp8`` or compressed-tensors names, the same keep-rules and ``--tp`` keep-set):
only the codes differ. They are chosen by GPTQ (``finefp8.calibration.gptq_quantize``, columns
in act-order, damping 1% of the mean diagonal) with each layer's input Hessian
``H = 2 X^T X / T`` over the calibration tokens. Steps (``stage_gptq_codes``):

1. The model is built on the meta device (``finefp8.nn.loading.empty_model``); only the input
   embedding is loaded. The calibration token windows ``[n, L]`` run through it up to the
   first decoder layer, whose inputs (hidden states and the keyword arguments the model passes:
   position embeddings, mask) are captured.
2. For each decoder layer ``i``: its tensors are read from the safetensors shards
   (``CheckpointReader``; routed experts through ``finefp8.nn.expert_checkpoint``), the layer
   runs on the calibration hidden states with forward hooks summing ``X^T X`` of the input of
   each Linear to quantize (layers fed one tensor, q/k/v and gate/up, share one Hessian and one
   GPTQ factor) and, for each routed expert ``e``, of its routed tokens ``X_e`` and its
   intermediate ``act(X_e Wg^T) * (X_e Wu^T)``; GPTQ picks the codes; they are staged
   (``checkpoint.staged.write_staged``); the layer runs again with the dequantized weights
   ``q * s`` to give the next layer's inputs (so layer ``i+1`` calibrates on what the FP8 layers
   before it produce); the hidden states are saved; the layer's tensors are freed (back to the
   meta device).
3. ``quantize_checkpoint`` then writes the shards, taking the staged codes.

What each layer's FP8 output is made to reproduce, ``target``:

* ``"layer"`` (the default, above): the layer's own float weights applied to the inputs the
  quantized model gives it. The block scales stay DeepSeek-V3's ``amax/448``.
* ``"float-weights"``: the float model's output. A second stream of hidden states, the float
  model's, runs alongside; within the layer, group by group (q/k/v, o, gate/up, down: the
  Linear layers fed one tensor, in forward order) the inputs ``X_q`` the partly quantized layer
  gives the group and ``X_f`` the float layer gives it are collected, each weight becomes
  ``calibration.float_target_weight`` (GPTAQ's correction ``W + W (X_f - X_q)^T X_q H^-1``) and
  GPTQ rounds that, with fresh ``amax/448`` scales of it.
* ``"float-scales"``: the ``"layer"`` codes, then each 128x128 block scale of the layer's Linear
  weights is tuned (``SCALE_TUNING_STEPS`` Adam passes over the windows, codes fixed) so that
  the FP8 layer's output on the quantized model's inputs approaches the float layer's output
  on the float model's inputs (``_tune_block_scales``).

The measured effect of each on SmolLM2 is in docs/eval.md; ``"layer"`` stays the default.

Keys and values, ``kv_hessian``: with ``"attention"`` (the default), the ``k_proj`` and
``v_proj`` of each self-attention module ``kv_attention_modules`` accepts (separate q/k/v
projections, no q/k normalization) get one Hessian per key/value head from
``calibration.attention_hessian_sums``: the tokens weighted by the attention they receive, so
that GPTQ minimises the attention output's error rather than the keys' and values' own. The
Hessian pass then runs transformers' eager attention (which returns the probabilities; a
causal mask is passed where the model relied on SDPA's implicit one). ``"input"``: their
input's Hessian, shared with ``q_proj``. The ``"float-weights"`` target always uses
``"input"`` (GPTAQ's correction is per input).

Experts routed fewer than ``min_expert_tokens`` calibration tokens keep DeepSeek-V3's plain
rounding and are listed (``config.json`` ``finefp8_calibration.plain``), as are planned weights
outside the decoder layers (an untied ``lm_head`` without the keep-rule, DeepSeek-V3's MTP
layer). Fused 3-D expert stacks on disk are quantized plainly by the shard writer (not listed).

Memory: peak resident memory is about the input embedding + one decoder layer in float32
(GPTQ and the forward run in float32 whatever the checkpoint's dtype) + its Hessians
(``N^2`` float64 per distinct input) + the calibration activations ``2 * n * L * hidden * 4``
bytes (inputs and outputs of the layer) + the per-window keyword arguments; the attention
Hessians add ``2 * kv_heads * N^2`` float64 and one window's probabilities
``heads * L^2 * 4`` bytes (with a few ``L^2`` temporaries); the float targets
add the float model's stream (``2 * n * L * hidden * 4`` more) and ``"float-weights"`` keeps the
float inputs of the layer's Linear groups (``n * L * (sum of their widths) * 4``), ``"float-
scales"`` the autograd graph of one window through one layer. None grows with the number of
layers.

Resume: after each layer, its codes and then the hidden states after it
(``hidden.safetensors``, with the layer index, both streams for the float targets) are
written atomically in OUT's scratch folder.
A killed run rerun with the same command continues after the last layer whose hidden states
were saved (per-layer granularity: the layer in progress is redone), then writes the shards.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import calibration, ops
from ..checkpoint import CheckpointReader
from ..checkpoint.convert import ConversionResult, quantize_checkpoint
from ..checkpoint.errors import ConversionError
from ..checkpoint.layout import FP8
from ..checkpoint.reader import read_rows
from ..checkpoint.staged import Calibration, read_staged_meta, staged_path, write_staged
from ..quantization import expand_block_scales
from .config import FP8Config
from .expert_checkpoint import expert_keys, key_renamer, read_experts
from .experts import experts_modules
from .loading import empty_model

__all__ = ["METHODS", "TARGETS", "KV_HESSIANS", "SCALE_TUNING_STEPS", "DEFAULT_CALIB_TOKENS",
           "DEFAULT_CALIB_WINDOW", "DEFAULT_MIN_EXPERT_TOKENS",
           "CalibrationTokens", "calibration_token_windows", "decoder_layers",
           "kv_attention_modules",
           "stage_gptq_codes", "quantize_calibrated", "CalibratedResult",
           "release_freed_memory", "fix_mmap_threshold", "text_sha256",
           "fake_quantize_activation"]

METHODS = ("gptq",)
TARGETS = ("layer", "float-weights", "float-scales")
KV_HESSIANS = ("attention", "input")
SCALE_TUNING_STEPS = 20
DEFAULT_CALIB_TOKENS = 65536
DEFAULT_CALIB_WINDOW = 1024
DEFAULT_MIN_EXPERT_TOKENS = 16
_HIDDEN = "hidden"


@dataclass(frozen=True)
class CalibrationTokens:
    """The calibration text as token windows: ``ids [n, L]`` int64, the text's ``name`` and
    ``sha256`` (of its UTF-8 bytes), recorded in the checkpoint."""

    ids: torch.Tensor
    name: str
    sha256: str


def calibration_token_windows(ids: torch.Tensor, tokens: int = DEFAULT_CALIB_TOKENS,
                              window: int = DEFAULT_CALIB_WINDOW) -> torch.Tensor:
    """The last ``tokens`` ids of a 1-D token stream as ``[tokens // w, w]`` windows,
    ``w = min(window, tokens)`` (a remainder shorter than a window is dropped).

    The end of the text, so that the start (what ``finefp8 eval`` evaluates on by default)
    stays disjoint from it. Raises ``ValueError`` when the text is shorter than ``tokens``.
    """
    if ids.dim() != 1:
        raise ValueError(f"calibration ids must be 1-D, got shape {tuple(ids.shape)}")
    if tokens < 2 or window < 2:
        raise ValueError(f"--calib-tokens ({tokens}) and the window ({window}) must be >= 2")
    if ids.numel() < tokens:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than "
                         f"--calib-tokens {tokens}: pass a longer --text or fewer tokens")
    w = min(window, tokens)
    n = tokens // w
    return ids[ids.numel() - n * w:].reshape(n, w).long()


def decoder_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """``(name, layers)``: the model's ``nn.ModuleList`` of ``num_layers`` decoder layers."""
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == num_layers and name.endswith("layers"):
            return name, m
    raise ConversionError(f"{type(model).__name__}: no list of {num_layers} decoder layers "
                          f"(num_hidden_layers) found; --calibrate supports transformers "
                          f"decoder-only models")


class _PreadReader(CheckpointReader):
    """A ``CheckpointReader`` whose ``get`` reads with ``pread`` instead of a memory map: pages
    of a map stay in the resident set (RSS) until it is closed, so a calibration reading every
    layer through maps would look as large as the model."""

    def get(self, key: str) -> torch.Tensor:
        info = self.info(key)
        if len(info.shape) < 2:
            return read_rows(self.root, info, 0, 1).clone()
        return read_rows(self.root, info, 0, info.shape[0])


class _Stop(Exception):
    """Raised by the capture hook once the first decoder layer's inputs are in hand."""


def _first_layer_inputs(model: nn.Module, layer: nn.Module, ids: torch.Tensor
                        ) -> list[tuple[torch.Tensor, dict]]:
    """Per window of ``ids [n, L]``: the first decoder layer's ``(hidden [1, L, H], kwargs)``."""
    got: list[tuple[torch.Tensor, dict]] = []

    def pre(_m, args, kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        got.append((x.detach(), kw))
        raise _Stop

    handle = layer.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            for row in ids:
                try:
                    model(input_ids=row.unsqueeze(0), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if len(got) != ids.shape[0]:
        raise ConversionError("the model did not reach its first decoder layer while capturing "
                              "the calibration inputs")
    return got


def _layer_out(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def fake_quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """What a W8A8 layer's GEMM sees of its input ``x [..., K]``: DeepSeek-V3's dynamic 1x128
    groups, ``q = cast_e4m3(x / s)``, ``s = amax / 448`` per token and group, returned as
    ``q * s`` in ``x``'s dtype (``ops.quantize_groupwise`` / ``dequantize_groupwise``)."""
    q, sc = ops.quantize_groupwise(x, 128, "fp32")
    return ops.dequantize_groupwise(q, sc, 128, x.dtype)


class _FakeQuantInputs:
    """Forward pre-hook replacing a module's first input by its W8A8 view; modules fed the
    same tensor (q/k/v) get the same quantized tensor, so they still share one Hessian."""

    def __init__(self) -> None:
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, _mod, args, kwargs):
        if not args:
            return args, kwargs
        x = args[0]
        hit = self.cache.get(id(x))
        if hit is None or hit[0] is not x:
            xd = x.detach()
            # straight-through when a gradient flows (block-scale tuning)
            hit = (x, x + (fake_quantize_activation(xd) - xd) if x.requires_grad
                   else fake_quantize_activation(x))
            self.cache[id(x)] = hit
        return (hit[1], *args[1:]), kwargs


class _Groups:
    """The Linear layers fed one tensor (q/k/v, gate/up) form a group, numbered in the order
    the forward first reaches them (as ``finefp8.eval.variants.collect_hessians`` groups)."""

    def __init__(self) -> None:
        self.group_of: dict[str, int] = {}
        self.count = 0
        self.seen: dict[int, tuple[torch.Tensor, int]] = {}
        self.done: set[int] = set()

    def visit(self, name: str, x: torch.Tensor) -> int | None:
        """The group of module ``name`` fed ``x``, or ``None`` when the group was already fed
        in this window."""
        hit = self.seen.get(id(x))
        if name not in self.group_of:
            if hit is not None and hit[0] is x:
                self.group_of[name] = hit[1]
            else:
                self.group_of[name] = self.count
                self.count += 1
        g = self.group_of[name]
        self.seen[id(x)] = (x, g)
        if g in self.done:
            return None
        self.done.add(g)
        return g

    def next_window(self) -> None:
        self.seen.clear()
        self.done.clear()

    def members(self, g: int) -> list[str]:
        return [n for n, k in self.group_of.items() if k == g]

    def hook(self, name: str, take: Callable[[int, torch.Tensor], None]):
        """A forward pre-hook for module ``name`` that calls ``take(group, input)`` the first
        time the module's group is fed in a window."""
        def pre(_mod, args):
            g = self.visit(name, args[0])
            if g is not None:
                take(g, args[0])
        return pre


class _Sums:
    """``X^T X`` sums of the inputs of named Linear layers, one per group."""

    def __init__(self) -> None:
        self.groups = _Groups()
        self.sums: list[torch.Tensor] = []
        self.count = 0

    def hook(self, name: str):
        return self.groups.hook(name, self.take)

    def take(self, g: int, x: torch.Tensor) -> None:
        if g == len(self.sums):
            self.sums.append(torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64))
        x2 = x.reshape(-1, x.shape[-1]).float()
        self.sums[g] += (x2.T @ x2).double()

    def next_window(self, tokens: int) -> None:
        self.groups.next_window()
        self.count += tokens

    def hessians(self) -> dict[str, torch.Tensor]:
        hs = [(2.0 * s / max(self.count, 1)).float() for s in self.sums]
        return {n: hs[g] for n, g in self.groups.group_of.items()}


class _AttentionSums:
    """``calibration.attention_hessian_sums`` of one self-attention module over the windows:
    hooks on ``k_proj`` (its input), ``q_proj`` and ``v_proj`` (their outputs) and the module
    (its attention probabilities, which it returns when it runs as ``"eager"``)."""

    def __init__(self, name: str, attn: nn.Module) -> None:
        self.name = name
        self.head_dim = int(attn.head_dim)
        self.kv_heads = attn.k_proj.out_features // self.head_dim
        self.seen: dict[str, torch.Tensor] = {}
        self.sk: torch.Tensor | None = None
        self.sv: torch.Tensor | None = None
        self.count = 0

    def hooks(self) -> tuple[list[tuple[str, Callable]], list[tuple[str, Callable]]]:
        """``(pre-hooks, forward hooks)`` as ``(module name, hook)``."""
        def k_in(_m, args):
            self.seen["x"] = args[0].detach().reshape(-1, args[0].shape[-1])

        def out(key: str):
            def f(_m, _args, o):
                self.seen[key] = o.detach().reshape(o.shape[0] * o.shape[1], -1,
                                                    self.head_dim)
            return f

        def done(_m, _args, o):
            probs = o[1] if isinstance(o, tuple) and len(o) > 1 else None
            if probs is None or probs.dim() != 4 or probs.shape[0] != 1:
                raise ConversionError(f"{self.name} did not return its attention probabilities "
                                      f"for one window; pass --kv-hessian input")
            sk, sv = calibration.attention_hessian_sums(self.seen["x"], probs[0].detach(),
                                                        self.seen["q"], self.seen["v"])
            self.sk = sk if self.sk is None else self.sk + sk
            self.sv = sv if self.sv is None else self.sv + sv
            self.count += int(self.seen["x"].shape[0])
            self.seen.clear()

        return ([(f"{self.name}.k_proj", k_in)],
                [(f"{self.name}.q_proj", out("q")), (f"{self.name}.v_proj", out("v")),
                 (self.name, done)])

    def factors(self, percdamp: float) -> dict[str, list[tuple[int, int, tuple]]]:
        """``{"k_proj": row factors, "v_proj": row factors}`` for ``gptq_quantize_rows``:
        one Hessian ``2 S[g] / T`` per key/value head."""
        out: dict[str, list[tuple[int, int, tuple]]] = {}
        for part, sums in (("k_proj", self.sk), ("v_proj", self.sv)):
            if sums is None:
                raise ConversionError(f"{self.name} never ran during calibration; pass "
                                      f"--kv-hessian input")
            out[part] = [(g * self.head_dim, (g + 1) * self.head_dim,
                          calibration.gptq_factor((2.0 * sums[g] / max(self.count, 1)).float(),
                                                  percdamp, act_order=True))
                         for g in range(self.kv_heads)]
        return out


def kv_attention_modules(layer: nn.Module, layer_name: str, linears: dict[str, str]
                         ) -> dict[str, nn.Module]:
    """The self-attention modules of ``layer`` whose keys and values the attention-weighted
    Hessians apply to: separate ``q_proj`` / ``k_proj`` / ``v_proj`` Linear layers (both k and
    v to be calibrated), a ``head_dim``, no normalization of q or k (Qwen3's ``q_norm`` /
    ``k_norm`` put a nonlinearity between ``k_proj`` and the scores), and a ``config`` whose
    attention implementation can be set. Keyed by the module's full name."""
    found: dict[str, nn.Module] = {}
    for n, m in layer.named_modules():
        full = f"{layer_name}.{n}" if n else layer_name
        projs = [getattr(m, p, None) for p in ("q_proj", "k_proj", "v_proj")]
        if not all(isinstance(x, nn.Linear) for x in projs) or not hasattr(m, "head_dim"):
            continue
        if hasattr(m, "q_norm") or hasattr(m, "k_norm") or not hasattr(m, "config"):
            continue
        if f"{full}.k_proj" in linears and f"{full}.v_proj" in linears:
            found[full] = m
    return found


@contextlib.contextmanager
def _eager_attention(modules: dict[str, nn.Module]):
    """Run ``modules`` with transformers' ``"eager"`` attention (which returns the
    probabilities) until exit."""
    configs = {id(m.config): m.config for m in modules.values()}
    was = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = "eager"
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = was[k]


def _with_causal_mask(kwargs: list[dict], hidden: list[torch.Tensor]) -> list[dict]:
    """The layer's keyword arguments with an explicit additive causal mask ``[1, 1, L, L]``
    where the model passed none (SDPA's ``is_causal`` path, which eager attention lacks); the
    windows of one length share one mask."""
    masks: dict[tuple[int, torch.dtype], torch.Tensor] = {}
    out = []
    for kw, h in zip(kwargs, hidden, strict=True):
        if kw.get("attention_mask") is None:
            key = (h.shape[1], h.dtype)
            if key not in masks:
                n = h.shape[1]
                masks[key] = torch.full((n, n), torch.finfo(h.dtype).min,
                                        dtype=h.dtype).triu(1)[None, None]
            kw = {**kw, "attention_mask": masks[key]}
        out.append(kw)
    return out


class _Inputs:
    """The inputs ``[T, N]`` float32 of each group of Linear layers, per window."""

    def __init__(self) -> None:
        self.groups = _Groups()
        self.inputs: list[list[torch.Tensor]] = []

    def hook(self, name: str):
        return self.groups.hook(name, self.take)

    def take(self, g: int, x: torch.Tensor) -> None:
        if g == len(self.inputs):
            self.inputs.append([])
        self.inputs[g].append(x.detach().reshape(-1, x.shape[-1]).float().clone())

    def next_window(self, _tokens: int = 0) -> None:
        self.groups.next_window()


class _ExpertSums:
    """Per expert of one fused experts module: routed-token count, ``X_e^T X_e`` and
    ``Z_e^T Z_e`` of its intermediate ``Z_e = act(X_e Wg^T) * (X_e Wu^T)`` (float weights)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.sums: dict[int, list] = {}

    def hook(self, _m, args):
        x, idx = args[0].detach().float(), args[1]
        gu_all, n_exp = self.module.gate_up_proj, self.module.gate_up_proj.shape[0]
        for e in range(n_exp):
            rows = torch.nonzero((idx == e).any(-1)).flatten()
            if rows.numel() == 0:
                continue
            gu = gu_all[e].detach().float()
            i = gu.shape[0] // 2
            xe = x[rows]
            z = self.module.act_fn(xe @ gu[:i].T) * (xe @ gu[i:].T)
            entry = self.sums.setdefault(e, [0, 0.0, 0.0])
            entry[0] += int(rows.numel())
            entry[1] = entry[1] + (xe.T @ xe).double()
            entry[2] = entry[2] + (z.T @ z).double()


def release_freed_memory() -> None:
    """``gc.collect()`` then glibc's ``malloc_trim(0)``: hand the freed heap back to the OS.

    Without it, glibc keeps the freed blocks of each layer (its mmap threshold rises after
    large frees, so later layer-sized buffers come from the heap and fragment it) and resident
    memory creeps up with the layer count although nothing is retained. A no-op where there
    is no glibc."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def fix_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Set glibc's ``M_MMAP_THRESHOLD`` to ``nbytes`` (1 MiB) for this process: every larger
    allocation gets its own mapping, returned to the OS when freed. glibc otherwise raises the
    threshold after each large free (up to 32 MiB), so the buffers of the next layer come from
    the heap, fragment it, and each layer's peak is higher than the last (measured: 625 MB
    rising to 750 MB over 10 identical layers; flat at 588 MB with the threshold fixed).
    Returns whether it was set (``False`` where there is no glibc). A process-wide setting: it
    stays for the rest of the process."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        return False


def _save_hidden(work: Path, hidden: list[torch.Tensor], layer: int,
                 floats: list[torch.Tensor] | None = None) -> None:
    """Atomically save the hidden states after ``layer`` (one tensor per window): the quantized
    model's ``h{j}`` and, for the float targets, the float model's ``f{j}``."""
    from ..checkpoint.writer import ShardWriter, fsync_dir

    tensors = {f"h{j}": h for j, h in enumerate(hidden)}
    tensors.update({f"f{j}": f for j, f in enumerate(floats or [])})
    entries = [(k, _st_dtype(t), tuple(t.shape)) for k, t in tensors.items()]
    with ShardWriter(work / f"{_HIDDEN}.safetensors", entries, {"after_layer": str(layer)}) as w:
        for k, t in tensors.items():
            w.write(k, t.contiguous())
    fsync_dir(work)


def _st_dtype(t: torch.Tensor) -> str:
    return {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[t.dtype]


def _resume_point(work: Path, windows: int, floats: bool
                  ) -> tuple[int, list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """``(first layer to do, quantized-model hidden states before it, float-model ones)`` from a
    previous run's scratch folder (``floats``: the float stream is needed too)."""
    path = work / f"{_HIDDEN}.safetensors"
    meta = read_staged_meta(path)
    if meta is None or not meta.get("after_layer", "").isdigit():
        return 0, None, None
    last = int(meta["after_layer"])
    if any(read_staged_meta(staged_path(work, f"layer-{i:05d}")) is None
           for i in range(last + 1)):
        return 0, None, None
    from ..checkpoint.reader import read_header

    infos, _ = read_header(path)
    if len(infos) != windows * (2 if floats else 1):
        return 0, None, None

    def stream(p: str) -> list[torch.Tensor] | None:
        names = [f"{p}{j}" for j in range(windows)]
        if any(n not in infos for n in names):
            return None
        return [read_rows(work, infos[n], 0, infos[n].shape[0]) for n in names]

    hidden = stream("h")
    fl = stream("f") if floats else None
    if hidden is None or (floats and fl is None):
        return 0, None, None
    return last + 1, hidden, fl


def _set_module(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(state, strict=False, assign=True)


def _to_meta(module: nn.Module) -> None:
    """Free a layer's tensors: parameters back to the meta device (buffers kept)."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            setattr(sub, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                            requires_grad=False))


@dataclass
class _LayerTargets:
    """What one decoder layer quantizes: Linear module name -> checkpoint key, and per fused
    experts module the checkpoint key of each (expert, part, param) matrix."""

    linears: dict[str, str] = field(default_factory=dict)
    experts: dict[str, list] = field(default_factory=dict)


def stage_gptq_codes(src: str | os.PathLike, work: Path, keys: frozenset[str],
                     tokens: CalibrationTokens, *, dtype: torch.dtype = torch.float32,
                     min_expert_tokens: int = DEFAULT_MIN_EXPERT_TOKENS, percdamp: float = 0.01,
                     trust_remote_code: bool = False, act_quant_inputs: bool = False,
                     target: str = "layer", kv_hessian: str = "input",
                     on_layer: Callable[[int, int], None] | None = None) -> dict:
    """Stage GPTQ codes of the planned weights ``keys`` of checkpoint ``src`` into ``work``,
    one decoder layer at a time (module doc). Returns the metadata recorded in config.json:
    ``{"calibrated": count, "plain": [keys], "plain_reasons": {key: why},
    "kv_attention_modules": count}`` (the attention modules whose k/v had attention-weighted
    Hessians).

    ``act_quant_inputs``: Hessians and propagation from the W8A8-quantized inputs
    (``_calibrate_layer``). ``target`` (module doc): ``"layer"``, ``"float-weights"``
    (``_calibrate_layer_float_target``) or ``"float-scales"`` (``_tune_block_scales``).
    ``kv_hessian``: ``"attention"`` or ``"input"`` (``_calibrate_layer``; the float-weights
    target always uses the input Hessians). ``on_layer(i, n)`` is called after layer ``i``
    of ``n``.
    """
    if kv_hessian not in KV_HESSIANS:
        raise ConversionError(f"unknown --kv-hessian {kv_hessian!r}; expected one of "
                              f"{KV_HESSIANS}")
    if target not in TARGETS:
        raise ConversionError(f"unknown calibration target {target!r}; expected one of {TARGETS}")
    from transformers import AutoConfig

    src = Path(src)
    work.mkdir(parents=True, exist_ok=True)
    fix_mmap_threshold()
    hf_config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    n_layers = int(hf_config.num_hidden_layers)
    model = empty_model(hf_config, dtype, trust_remote_code).eval()
    prefix, layers = decoder_layers(model, n_layers)
    rename = key_renamer(model)
    ids = tokens.ids
    with _PreadReader(src) as reader:
        model_key = {rename(k): k for k in reader.keys()}
        targets = _targets(model, prefix, n_layers, model_key, keys, reader)
        start, hidden, floats = _resume_point(work, ids.shape[0], target != "layer")
        emb_name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
        _set_module(model, {f"{emb_name}.weight":
                            reader.get(model_key[f"{emb_name}.weight"]).to(dtype)})
        captured = _first_layer_inputs(model, layers[0], ids)
        kwargs = [kw for _, kw in captured]
        if hidden is None:
            hidden = [h for h, _ in captured]
            floats = [h for h, _ in captured] if target != "layer" else None
        del captured
        _to_meta(model.get_input_embeddings())
        for i in range(start, n_layers):
            if target == "float-weights":
                hidden, floats = _calibrate_layer_float_target(
                    model, reader, prefix, i, targets[i], hidden, floats, kwargs, model_key,
                    dtype, work, min_expert_tokens, percdamp, act_quant_inputs)
            else:
                hidden, floats = _calibrate_layer(
                    model, reader, prefix, i, targets[i], hidden, kwargs, model_key, dtype,
                    work, min_expert_tokens, percdamp, act_quant_inputs, floats,
                    SCALE_TUNING_STEPS if target == "float-scales" else 0, kv_hessian)
            _save_hidden(work, hidden, i, floats)
            release_freed_memory()
            if on_layer is not None:
                on_layer(i, n_layers)
    staged, plain, kv_attention = 0, {}, 0
    for i in range(n_layers):
        meta = read_staged_meta(staged_path(work, f"layer-{i:05d}")) or {}
        staged += int(meta.get("calibrated", "0"))
        kv_attention += int(meta.get("kv_attention", "0"))
        plain.update(json.loads(meta.get("plain", "{}")))
    done = {k for t in targets for k in list(t.linears.values())
            + [x[0] for v in t.experts.values() for x in v]}
    for k in sorted(keys - done):
        plain[k] = "not in a decoder layer's Linear or per-expert matrices"
    return {"calibrated": staged, "plain": sorted(plain), "plain_reasons": dict(sorted(
        plain.items())), "kv_attention_modules": kv_attention}


def _targets(model: nn.Module, prefix: str, n_layers: int, model_key: dict[str, str],
             keys: frozenset[str], reader: CheckpointReader) -> list[_LayerTargets]:
    """The Linear modules and expert matrices of each decoder layer whose checkpoint weight
    is in ``keys`` (planned to be quantized)."""
    out = [_LayerTargets() for _ in range(n_layers)]
    exp = experts_modules(model)
    for i in range(n_layers):
        p = f"{prefix}.{i}."
        for name, m in model.named_modules():
            if not name.startswith(p):
                continue
            if isinstance(m, nn.Linear) and model_key.get(f"{name}.weight") in keys:
                out[i].linears[name] = model_key[f"{name}.weight"]
        for name, m in exp.items():
            if not name.startswith(p):
                continue
            mats = []
            for k in expert_keys(model, name, m.gate_up_proj.shape[0]):
                if k.expert is not None and k.key in reader and k.key in keys:
                    mats.append((k.key, k.param, k.expert, k.part))
            out[i].experts[name] = mats
    return out


def _load_layer(model: nn.Module, reader: CheckpointReader, name: str,
                model_key: dict[str, str], dtype: torch.dtype) -> None:
    """Read decoder layer ``name``'s tensors from the shards into ``model``."""
    layer = model.get_submodule(name)
    state: dict[str, torch.Tensor] = {}
    claimed: set[str] = set()
    for ename, module in experts_modules(model).items():
        if ename.startswith(name + "."):
            _, tensors, used = read_experts(model, ename, module, reader, FP8, FP8Config(), dtype)
            state.update(tensors)
            claimed |= used
    for mkey, ckey in model_key.items():
        if mkey.startswith(name + ".") and ckey not in claimed:
            t = reader.get(ckey)
            state[mkey] = t.to(dtype) if t.is_floating_point() else t
    _set_module(model, state)
    missing = [f"{name}.{n}" for n, p in layer.named_parameters() if p.is_meta]
    if missing:
        raise ConversionError(f"{reader.root}: decoder layer {name!r} lacks tensors "
                              f"{', '.join(missing[:5])} in the checkpoint")


def _run_layer(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict],
               after: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for h, kw in zip(hidden, kwargs, strict=True):
            out.append(_layer_out(layer(h, **kw)).detach())
            if after is not None:
                after(int(h.shape[0] * h.shape[1]))
    return out


def _quantize_experts(model: nn.Module, targets: _LayerTargets, esums: dict[str, _ExpertSums],
                      min_expert_tokens: int, percdamp: float,
                      codes: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      plain: dict[str, str]) -> None:
    """GPTQ codes of every routed expert matrix of one layer, each on its routed tokens
    (``esums``), into ``codes``; experts routed too few tokens get plain rounding and a line in
    ``plain``. The module's weights are replaced by the dequantized codes."""
    with torch.no_grad():
        for ename, mats in targets.experts.items():
            mod = model.get_submodule(ename)
            es = esums[ename]
            fx: dict[int, tuple] = {}
            for ckey, param, e, part in mats:
                full = getattr(mod, param)
                w = full[e].detach().float()
                rows = w.shape[0] // 2 if param == "gate_up_proj" else w.shape[0]
                w = w[part * rows:(part + 1) * rows]
                count, sx, sz = es.sums.get(e, (0, None, None))
                if count < min_expert_tokens:
                    q, s = ops.quantize_blockwise(w, (128, 128), "fp32", name=ckey)
                    plain[ckey] = (f"expert {e} of {ename} was routed {count} calibration "
                                   f"tokens (< {min_expert_tokens}): plain amax/448 rounding")
                else:
                    key = (e, param)
                    if key not in fx:
                        src_sum = sx if param == "gate_up_proj" else sz
                        fx[key] = calibration.gptq_factor((2.0 * src_sum / count).float(),
                                                          percdamp, act_order=True)
                    q, s = calibration.gptq_quantize(w, None, None, factor=fx[key], name=ckey)
                codes[ckey] = (q, s)
                deq = ops.dequantize_blockwise(q, s, (128, 128), full.dtype, name=ckey)
                full[e, part * rows:(part + 1) * rows].copy_(deq)


def _stage_and_propagate(work: Path, i: int, codes: dict[str, tuple[torch.Tensor, torch.Tensor]],
                         plain: dict[str, str], layer: nn.Module, hidden: list[torch.Tensor],
                         kwargs: list[dict], fq_hook: _FakeQuantInputs,
                         kv_attention: int = 0) -> list[torch.Tensor]:
    """Write layer ``i``'s codes (and the weights left plain, and how many attention modules
    had attention-weighted k/v Hessians) to the scratch folder, then run the FP8 layer on
    ``hidden``: the next layer's inputs in the quantized model."""
    n_cal = len(codes) - len(plain)
    write_staged(work, f"layer-{i:05d}", codes,
                 {"layer": str(i), "calibrated": str(n_cal), "plain": json.dumps(plain),
                  "kv_attention": str(kv_attention)})
    fq_hook.cache.clear()
    return _run_layer(layer, hidden, kwargs, lambda _n: fq_hook.cache.clear())


def _tune_block_scales(layer: nn.Module, layer_name: str, linears: dict[str, str],
                       codes: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       hidden: list[torch.Tensor], wanted: list[torch.Tensor],
                       kwargs: list[dict], steps: int, lr: float = 2e-3,
                       after_window: Callable[[], None] | None = None) -> None:
    """Tune the fp32 block scales of one decoder layer's FP8 Linear weights, codes fixed, so
    that the layer's output on the quantized model's inputs ``hidden`` matches ``wanted``
    (the float model's output for the same tokens).

    Each weight is ``q * (s0 * exp(u))`` per 128x128 block, ``u`` ``[gm, gn]`` starting at 0;
    ``steps`` passes over the windows of Adam (``lr``) on the loss
    ``sum ||layer(h) - y||^2 / sum ||y||^2``. The W8A8 case needs nothing here: the caller's
    ``_FakeQuantInputs`` hooks stay on the Linear layers and pass the gradient straight
    through (``after_window`` clears their cache). ``codes`` is updated in place with the tuned
    scales (float32, one a block); a weight whose tuning left a non-finite or zero scale keeps
    its ``amax/448`` scales."""
    names = {m: m[len(layer_name) + 1:] for m in linears}
    base = {m: (codes[k][0].float(), codes[k][1].float()) for m, k in linears.items()}
    u = {m: torch.zeros_like(s, requires_grad=True) for m, (_q, s) in base.items()}
    opt = torch.optim.Adam(list(u.values()), lr=lr)
    frozen = {n: p.detach() for n, p in layer.named_parameters()}
    norm = sum(float(y.float().pow(2).sum()) for y in wanted) or 1.0
    for _ in range(steps):
        for h, kw, y in zip(hidden, kwargs, wanted, strict=True):
            params = dict(frozen)
            for m, (q, s0) in base.items():
                scale = s0 * torch.exp(u[m])
                key = f"{names[m]}.weight"
                params[key] = (q * expand_block_scales(scale, tuple(q.shape))).to(frozen[key].dtype)
            out = _layer_out(torch.func.functional_call(layer, params, (h,), kw))
            loss = (out.float() - y.float()).pow(2).sum() / norm
            opt.zero_grad()
            loss.backward()
            opt.step()
            if after_window is not None:
                after_window()
    with torch.no_grad():
        for m, k in linears.items():
            q, s0 = base[m]
            tuned = (s0 * torch.exp(u[m])).float()
            if not bool((torch.isfinite(tuned) & (tuned > 0)).all()):  # diverged: amax/448
                tuned = s0
            _keep_codes(layer.get_submodule(names[m]), k, codes[k][0], tuned, codes)


@contextlib.contextmanager
def _pre_hooks(model: nn.Module, hooks: list[tuple[str, Callable]], with_kwargs: bool = False,
               post: Sequence[tuple[str, Callable]] = ()):
    """Forward pre-hooks ``(module name, hook)`` and forward hooks ``post`` on ``model``'s
    submodules, removed on exit."""
    handles = [model.get_submodule(n).register_forward_pre_hook(fn, with_kwargs=with_kwargs)
               for n, fn in hooks]
    handles += [model.get_submodule(n).register_forward_hook(fn) for n, fn in post]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _w8a8_inputs(model: nn.Module, names: list[str], enabled: bool):
    """With ``enabled``, the modules ``names`` see their input as W8A8 computes with it
    (``_FakeQuantInputs``) until exit; yields the hook (its cache is cleared per window by the
    caller, and on exit)."""
    hook = _FakeQuantInputs()
    with _pre_hooks(model, [(n, hook) for n in names] if enabled else [], with_kwargs=True):
        try:
            yield hook
        finally:
            hook.cache.clear()


def _keep_codes(mod: nn.Module, ckey: str, q: torch.Tensor, s: torch.Tensor,
                codes: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Record checkpoint weight ``ckey``'s codes and put ``q * s`` in Linear ``mod``."""
    codes[ckey] = (q, s)
    with torch.no_grad():
        mod.weight.copy_(ops.dequantize_blockwise(q, s, (128, 128), mod.weight.dtype, name=ckey))


def _calibrate_layer(model: nn.Module, reader: CheckpointReader, prefix: str, i: int,
                     targets: _LayerTargets, hidden: list[torch.Tensor], kwargs: list[dict],
                     model_key: dict[str, str], dtype: torch.dtype, work: Path,
                     min_expert_tokens: int, percdamp: float,
                     act_quant_inputs: bool = False, floats: list[torch.Tensor] | None = None,
                     tune_steps: int = 0, kv_hessian: str = "input"
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Calibrate decoder layer ``i``: load, collect Hessians, GPTQ, stage, propagate, free.
    Returns the next layer's inputs in the quantized model and (given ``floats``, this layer's
    inputs in the float model) in the float model. With ``tune_steps``, the Linear weights'
    block scales are then tuned (``_tune_block_scales``) towards the float layer's outputs.
    ``kv_hessian="attention"``: ``k_proj`` and ``v_proj`` of the attention modules
    ``kv_attention_modules`` finds get one attention-weighted Hessian per key/value head
    (``calibration.attention_hessian_sums``; the collection pass runs eager attention).

    ``act_quant_inputs``: every target Linear and experts module sees its input as W8A8 will
    (``fake_quantize_activation``) in both passes, so the Hessians are of the quantized
    activations and the next layer's inputs are those of the W8A8 model (the experts'
    intermediate, inside the fused module, stays float)."""
    name = f"{prefix}.{i}"
    _load_layer(model, reader, name, model_key, dtype)
    layer = model.get_submodule(name)
    floats_out = None if floats is None else _run_layer(layer, floats, kwargs)
    codes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    plain: dict[str, str] = {}
    # the W8A8 hooks come first: the Hessian hooks then see the quantized input
    with _w8a8_inputs(model, list(targets.linears) + list(targets.experts),
                      act_quant_inputs) as fq_hook:
        sums = _Sums()
        esums = {n: _ExpertSums(model.get_submodule(n)) for n in targets.experts}

        def next_window(tokens: int) -> None:
            sums.next_window(tokens)
            fq_hook.cache.clear()

        mods = kv_attention_modules(layer, name, targets.linears) \
            if kv_hessian == "attention" else {}
        attn = {n: _AttentionSums(n, m) for n, m in mods.items()}
        pre = [(n, sums.hook(n)) for n in targets.linears] + [(n, e.hook) for n, e in
                                                              esums.items()]
        post = []
        for a in attn.values():
            a_pre, a_post = a.hooks()
            pre += a_pre
            post += a_post
        with _pre_hooks(model, pre, post=post), _eager_attention(mods):
            _run_layer(layer, hidden, _with_causal_mask(kwargs, hidden) if attn else kwargs,
                       next_window)
        hessians, factors = sums.hessians(), {}
        rows = {f"{n}.{part}": f for n, a in attn.items()
                for part, f in a.factors(percdamp).items()}
        for mname, ckey in targets.linears.items():
            h, mod = hessians[mname], model.get_submodule(mname)
            if mname in rows:
                q, s = calibration.gptq_quantize_rows(mod.weight.detach().float(), rows[mname],
                                                      name=ckey)
            else:
                if id(h) not in factors:
                    factors[id(h)] = calibration.gptq_factor(h, percdamp, act_order=True)
                q, s = calibration.gptq_quantize(mod.weight.detach().float(), None, None,
                                                 factor=factors[id(h)], name=ckey)
            _keep_codes(mod, ckey, q, s, codes)
        kv_attention = len(attn)
        del hessians, factors, rows, attn, mods
        _quantize_experts(model, targets, esums, min_expert_tokens, percdamp, codes, plain)
        del esums
        if tune_steps and floats_out is not None and targets.linears:
            _tune_block_scales(layer, name, targets.linears, codes, hidden, floats_out, kwargs,
                               tune_steps, after_window=fq_hook.cache.clear)
        out = _stage_and_propagate(work, i, codes, plain, layer, hidden, kwargs, fq_hook,
                                   kv_attention)
    _to_meta(layer)
    return out, floats_out


def _group_input(layer: nn.Module, module: nn.Module, hidden: torch.Tensor, kw: dict
                 ) -> torch.Tensor:
    """Run ``layer`` on one window until ``module`` is called; its first input ``[T, N]``
    float32 (as the hooks registered before this one leave it)."""
    got: list[torch.Tensor] = []

    def pre(_m, args):
        got.append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
        raise _Stop

    handle = module.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            layer(hidden, **kw)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise ConversionError(f"the decoder layer never called {type(module).__name__} "
                              f"during calibration")
    return got[0]


def _calibrate_layer_float_target(
        model: nn.Module, reader: CheckpointReader, prefix: str, i: int,
        targets: _LayerTargets, hidden: list[torch.Tensor], floats: list[torch.Tensor],
        kwargs: list[dict], model_key: dict[str, str], dtype: torch.dtype, work: Path,
        min_expert_tokens: int, percdamp: float, act_quant_inputs: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Calibrate decoder layer ``i`` against the float model's outputs (``target="float-weights"``).

    ``hidden``: the layer's inputs in the quantized model, ``floats``: in the float model (one
    ``[1, L, H]`` tensor per window each). Steps: (1) the float layer runs on ``floats``, the
    inputs ``X_f`` of each group of Linear layers fed one tensor are kept, its outputs are the
    next float inputs; (2) group by group, in the order the forward reaches them, the layer
    (earlier groups already FP8, with W8A8 inputs when ``act_quant_inputs``) runs on ``hidden``
    up to the group, giving ``X_q``; each weight of the group becomes
    ``calibration.float_target_weight(W, X_q^T X_q, (X_f - X_q)^T X_q)`` (the correction computed
    once per group) and GPTQ rounds it with
    the Hessian of ``X_q`` and fresh ``amax/448`` block scales of it; (3) routed experts as in
    ``_calibrate_layer`` (their own inputs, float target within the layer); (4) the FP8 layer
    runs on ``hidden``: the next quantized inputs. Returns ``(next hidden, next floats)``."""
    name = f"{prefix}.{i}"
    _load_layer(model, reader, name, model_key, dtype)
    layer = model.get_submodule(name)
    inputs = _Inputs()
    with _pre_hooks(model, [(n, inputs.hook(n)) for n in targets.linears]):
        floats_out = _run_layer(layer, floats, kwargs, inputs.next_window)
    codes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    plain: dict[str, str] = {}
    with _w8a8_inputs(model, list(targets.linears) + list(targets.experts),
                      act_quant_inputs) as fq_hook:
        for g in range(inputs.groups.count):
            members = inputs.groups.members(g)
            first = model.get_submodule(members[0])
            n_in = first.weight.shape[1]
            hq = torch.zeros(n_in, n_in, dtype=torch.float64)
            cross = torch.zeros(n_in, n_in, dtype=torch.float64)
            count = 0
            for h, kw, xf in zip(hidden, kwargs, inputs.inputs[g], strict=True):
                fq_hook.cache.clear()
                xq = _group_input(layer, first, h, kw).double()
                hq += xq.T @ xq
                cross += (xf.double() - xq).T @ xq
                count += xq.shape[0]
            inputs.inputs[g] = []
            hq /= max(count, 1)
            cross /= max(count, 1)
            factor = calibration.gptq_factor((2.0 * hq).float(), percdamp, act_order=True)
            corr = calibration.float_target_correction(hq, cross, percdamp,
                                                       name=targets.linears[members[0]])
            for mname in members:
                mod, ckey = model.get_submodule(mname), targets.linears[mname]
                w = calibration.float_target_weight(mod.weight.detach().float(), None, None,
                                                    correction=corr, name=ckey)
                q, s = calibration.gptq_quantize(w, None, None, factor=factor, name=ckey)
                _keep_codes(mod, ckey, q, s, codes)
            del hq, cross, factor, corr
        if targets.experts:
            esums = {n: _ExpertSums(model.get_submodule(n)) for n in targets.experts}
            with _pre_hooks(model, [(n, e.hook) for n, e in esums.items()]):
                _run_layer(layer, hidden, kwargs, lambda _n: fq_hook.cache.clear())
            _quantize_experts(model, targets, esums, min_expert_tokens, percdamp, codes, plain)
        out = _stage_and_propagate(work, i, codes, plain, layer, hidden, kwargs, fq_hook)
    _to_meta(layer)
    return out, floats_out


@dataclass
class CalibratedResult:
    """A calibrated quantize: the conversion's result and the calibration's metadata."""

    conversion: ConversionResult
    metadata: dict


def text_sha256(text: str) -> str:
    """Hex SHA-256 of ``text``'s UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def quantize_calibrated(src: str | os.PathLike, dst: str | os.PathLike, tokens: CalibrationTokens,
                        *, method: str = "gptq", layout: str = FP8, ignore: Sequence[str] = (),
                        tp: Sequence[int] = (1,), overwrite: bool = False,
                        progress: bool = True,
                        allow_nonfinite: bool = False,
                        min_expert_tokens: int = DEFAULT_MIN_EXPERT_TOKENS,
                        dtype: torch.dtype = torch.float32,
                        trust_remote_code: bool = False, act_quant_inputs: bool = False,
                        target: str = "layer", kv_hessian: str = "attention",
                        before_shard: Callable[[str], None] | None = None,
                        finish: Callable[[Path], None] | None = None,
                        extra_outputs: Sequence[str] = (),
                        on_layer: Callable[[int, int], None] | None = None) -> CalibratedResult:
    """``quantize_checkpoint`` with codes chosen by ``method`` on ``tokens`` (module doc).

    ``tokens.ids`` ``[n, L]`` (``calibration_token_windows``); ``method``: ``"gptq"``;
    ``min_expert_tokens``: routed experts with fewer calibration tokens keep plain rounding;
    ``dtype``: the dtype the layers run and are calibrated in (float32); ``act_quant_inputs``:
    Hessians from the W8A8 (1x128 fake-quantized) inputs of each layer; ``target``: what each
    layer's FP8 output is made to reproduce, ``"layer"``, ``"float-weights"`` or
    ``"float-scales"`` (module doc); ``kv_hessian``: ``"attention"`` (one attention-weighted
    Hessian per key/value head for ``k_proj`` / ``v_proj``, where the attention has them) or
    ``"input"`` (their input's Hessian, as every other Linear). The other parameters
    are ``quantize_checkpoint``'s. ``config.json`` gets ``"finefp8_calibration"``: the method,
    the text's name and SHA-256, the token count and window, and the weights left plain.
    """
    if method not in METHODS:
        raise ConversionError(f"unknown --calibrate {method!r}; expected one of {METHODS}")
    if target not in TARGETS:
        raise ConversionError(f"unknown calibration target {target!r}; expected one of {TARGETS}")
    if kv_hessian not in KV_HESSIANS:
        raise ConversionError(f"unknown --kv-hessian {kv_hessian!r}; expected one of "
                              f"{KV_HESSIANS}")
    if min_expert_tokens < 1:
        raise ConversionError(f"--min-expert-tokens must be >= 1, got {min_expert_tokens}: an "
                              f"expert routed no calibration token has no Hessian to calibrate on")
    if tokens.ids.dim() != 2 or tokens.ids.numel() == 0:
        raise ConversionError(f"calibration ids must be [windows, length], got "
                              f"{tuple(tokens.ids.shape)}")
    ids_sha = hashlib.sha256(tokens.ids.numpy().tobytes()).hexdigest()
    options = {"method": method, "text_sha256": tokens.sha256, "ids_sha256": ids_sha,
               "min_expert_tokens": int(min_expert_tokens), "dtype": str(dtype),
               "percdamp": 0.01, "act_order": True, "act_quant_inputs": bool(act_quant_inputs)}
    if target == "float-weights":
        kv_hessian = "input"  # GPTAQ's correction is per input group (module doc)
    if target != "layer":  # the fingerprint of a "layer" run stays what it was
        options["target"] = target
    options["kv_hessian"] = kv_hessian
    metadata = {"method": method, "text": tokens.name, "text_sha256": tokens.sha256,
                "tokens": int(tokens.ids.numel()), "windows": int(tokens.ids.shape[0]),
                "window": int(tokens.ids.shape[1]), "min_expert_tokens": int(min_expert_tokens),
                "hessian_inputs": "w8a8" if act_quant_inputs else "float", "target": target,
                "kv_hessian": kv_hessian}

    def stage(work: Path, keys: frozenset[str]) -> dict:
        return stage_gptq_codes(src, work, keys, tokens, dtype=dtype,
                                min_expert_tokens=min_expert_tokens,
                                trust_remote_code=trust_remote_code,
                                act_quant_inputs=act_quant_inputs, target=target,
                                kv_hessian=kv_hessian,
                                on_layer=on_layer)

    cal = Calibration(options, metadata, stage)
    res = quantize_checkpoint(src, dst, layout=layout, scale_fmt="fp32", ignore=ignore,
                              workers=1, overwrite=overwrite, progress=progress,
                              allow_nonfinite=allow_nonfinite, tp=tp, before_shard=before_shard,
                              finish=finish, extra_outputs=extra_outputs, calibration=cal)
    return CalibratedResult(res, dict(metadata, **cal.result))
