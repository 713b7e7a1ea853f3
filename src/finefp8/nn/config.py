"""``FP8Config``: how an ``FP8Linear`` quantizes its weight and its input.

The config says *what* to compute; ``FP8Linear`` holds the tensors; ``finefp8.ops`` runs the
math. The default is DeepSeek-V3's scheme (docs/numerics.md)::

    FP8Config()                    # W8A8: 128x128 weight blocks, 1x128 activation groups, fp32 scales
    FP8Config(mode="weight_only")  # FP8 weights, dequantized for an ordinary GEMM
    FP8Config(scale_fmt="ue8m0")   # power-of-two scales for weights and activations (DeepSeek-V3.1)
    FP8Config.per_tensor()         # one scale per weight matrix and one per activation tensor

Modes:

* ``"w8a8"``: ``y = fp8_gemm(quantize_act(x), W_q) + b``, the weight held as E4M3 codes plus
  block scales, the input quantized at every forward.
* ``"weight_only"``: ``y = x @ (W_q * s).T + b`` in the input's dtype (``ops.weight_only_linear``).
* ``"act_only"``: for error attribution only: the weight stays in high precision and only the
  input is quantized and dequantized, ``y = dequant(quantize_act(x)) @ W.T + b``.

Activation granularity (the scale's extent; the codes are always E4M3):

* ``"group"``: one scale per token per ``act_group_size`` (128) consecutive channels (DeepSeek-V3);
* ``"token"``: one scale per token (the whole last dimension);
* ``"tensor"``: one dynamic scale for the whole activation tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..quantization import BLOCK_SIZE, GROUP_SIZE, SCALE_FMTS

__all__ = ["FP8Config", "MODES", "ACT_GRANULARITIES"]

MODES = ("w8a8", "weight_only", "act_only")
ACT_GRANULARITIES = ("group", "token", "tensor")


@dataclass(frozen=True)
class FP8Config:
    """Quantization settings of an FP8 linear layer.

    Attributes:
        mode: ``"w8a8"`` (default), ``"weight_only"`` or ``"act_only"`` (see the module docstring).
        scale_fmt: ``"fp32"`` (``s = amax / 448``) or ``"ue8m0"`` (``s`` rounded up to a power of
            two), for the weight blocks and the activation groups alike.
        weight_block: ``(rows, cols)`` of a weight block, or ``None`` for one scale per matrix.
        act_granularity: ``"group"``, ``"token"`` or ``"tensor"``.
        act_group_size: channels per activation group; also the K interval of the block-scaled GEMM.
        promote_every: K elements accumulated before the scaled partial sum is added in fp32
            (``finefp8.ops.fp8_gemm``); 128 as DeepSeek-V3.
        accum_bits: ``None`` accumulates each interval exactly in fp32; an integer emulates a
            tensor-core accumulator with that many bits (14 for the H800; slow, for studies).
    """

    mode: str = "w8a8"
    scale_fmt: str = "fp32"
    weight_block: tuple[int, int] | None = BLOCK_SIZE
    act_granularity: str = "group"
    act_group_size: int = GROUP_SIZE
    promote_every: int | None = GROUP_SIZE
    accum_bits: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"FP8Config.mode must be one of {MODES}, got {self.mode!r}")
        if self.scale_fmt not in SCALE_FMTS:
            raise ValueError(f"FP8Config.scale_fmt must be one of {SCALE_FMTS}, got {self.scale_fmt!r}")
        if self.act_granularity not in ACT_GRANULARITIES:
            raise ValueError(f"FP8Config.act_granularity must be one of {ACT_GRANULARITIES}, "
                             f"got {self.act_granularity!r}")
        if self.weight_block is not None:
            wb = tuple(self.weight_block)
            if len(wb) != 2 or any(not isinstance(b, int) or b < 1 for b in wb):
                raise ValueError("FP8Config.weight_block must be two positive integers or None "
                                 f"(one scale per matrix), got {self.weight_block!r}")
            object.__setattr__(self, "weight_block", (int(wb[0]), int(wb[1])))
        if not isinstance(self.act_group_size, int) or self.act_group_size < 1:
            raise ValueError(f"FP8Config.act_group_size must be a positive integer, "
                             f"got {self.act_group_size!r}")
        pe = self.promote_every
        if pe is not None and (not isinstance(pe, int) or pe < 1 or self.act_group_size % pe):
            raise ValueError(f"FP8Config.promote_every must be None or a positive divisor of "
                             f"act_group_size={self.act_group_size}, got {pe!r}")

    @classmethod
    def per_tensor(cls, **kwargs) -> FP8Config:
        """W8A8 with one scale per weight matrix and one per activation tensor."""
        return cls(**{"weight_block": None, "act_granularity": "tensor", **kwargs})

    def replace(self, **changes) -> FP8Config:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return replace(self, **changes)

    def block_size(self, out_features: int, in_features: int) -> tuple[int, int]:
        """The weight block of an ``[out, in]`` matrix: ``weight_block``, or the whole matrix."""
        return (out_features, in_features) if self.weight_block is None else self.weight_block

    def scale_grid(self, out_features: int, in_features: int) -> tuple[int, int]:
        """Shape of the weight scale grid: ``(ceil(out/bm), ceil(in/bn))``."""
        bm, bn = self.block_size(out_features, in_features)
        return math.ceil(out_features / bm), math.ceil(in_features / bn)

    def describe(self) -> str:
        """A short human-readable name, e.g. ``"w8a8 block128x128 act group128 fp32"``."""
        w = "tensor" if self.weight_block is None else "block{}x{}".format(*self.weight_block)
        if self.mode == "weight_only":
            return f"weight_only {w} {self.scale_fmt}"
        act = (f"group{self.act_group_size}" if self.act_granularity == "group"
               else self.act_granularity)
        if self.mode == "act_only":
            return f"act_only act {act} {self.scale_fmt}"
        return f"w8a8 {w} act {act} {self.scale_fmt}"
