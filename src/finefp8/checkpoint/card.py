"""``README.md`` model cards for the FP8 checkpoints finefp8 writes, in the Hub's model-card format.

A card is YAML front matter (the metadata the Hugging Face Hub reads: ``base_model``,
``base_model_relation: quantized``, ``library_name``, ``tags``, and a ``quantization_config``
summary) followed by Markdown::

    ---
    base_model: org/name            # when known: a Hub source, or --base-model
    base_model_relation: quantized
    library_name: transformers
    tags: [fp8, finefp8, ...]
    quantization_config: {quant_method: fp8, fmt: e4m3, weight_block_size: [128, 128], ...}
    ---
    <!-- finefp8:card -->
    # <name> (FP8, 128x128 blocks)
    source, revision, method, what stayed in high precision and why, version, command
    ## Evaluation
    <!-- finefp8:evaluation:begin --> KL / top-1 / perplexity table <!-- finefp8:evaluation:end -->
    ## Model card of the source model
    the source's README.md, unchanged (its front matter as a YAML block)

``write_card`` renders it from OUT's own ``config.json`` and tensor headers (so it describes what
is on disk, not what was asked for) and writes it atomically (``.partial``, fsync, rename).
``add_evaluation`` replaces the evaluation section of an existing finefp8 card.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..version import __version__
from .layout import COMPRESSED_TENSORS, FP8, detect_format, skip_reason
from .reader import CheckpointError, CheckpointReader, block_size_of
from .writer import atomic_write_bytes

__all__ = [
    "CARD_NAME",
    "CARD_MARKER",
    "CardSource",
    "split_front_matter",
    "render_card",
    "write_card",
    "is_finefp8_card",
    "card_source",
    "checkpoint_variant",
    "evaluation_section",
    "add_evaluation",
    "source_card_text",
    "restore_source_card",
]

CARD_NAME = "README.md"
CARD_MARKER = "<!-- finefp8:card -->"
_EVAL_BEGIN = "<!-- finefp8:evaluation:begin -->"
_EVAL_END = "<!-- finefp8:evaluation:end -->"
_SOURCE_HEADING = "## Model card of the source model"
_SOURCE_NOTE = "The source's own README.md follows, unchanged (its metadata header first)."
_SOURCE_JSON = re.compile(r"<!-- finefp8:source (\{.*?\}) -->")

#: Why each kind of tensor stays in high precision (``layout.skip_reason``'s reasons). The
#: DeepSeek-V3 technical report (arXiv:2412.19437, section 3.3.1) keeps "the embedding module,
#: the output head, MoE gating modules, normalization operators, and attention operators" in
#: their original precision; finefp8's quantize keeps the first four (attention operators are
#: the softmax/score computation, which holds no weight).
_WHY = {
    "embedding": "a table lookup, not a matrix product: no FP8 GEMM would run on it "
                 "(DeepSeek-V3 keeps the embedding in its original precision)",
    "output head": "its outputs are the logits, whose errors go straight into the softmax "
                   "(DeepSeek-V3 keeps the output head in its original precision)",
    "MoE router": "the expert choice is a top-k of its outputs, which a small error can flip "
                  "(DeepSeek-V3 keeps MoE gating in its original precision)",
    "norm": "normalization weights (DeepSeek-V3 keeps normalization operators in their "
            "original precision)",
    "ignored": "kept by the --ignore patterns of the command line",
    "serving": "kept by the serving check (quantize --tp): at a tensor-parallel degree asked "
               "for, vLLM/SGLang would refuse this layer in FP8 or compute it wrong (see "
               "'finefp8 inspect')",
}


@dataclass(frozen=True)
class CardSource:
    """What a checkpoint was made from.

    Attributes:
        name: the model argument as given (Hub ID or local path).
        repo_id: the Hub ID when the source came from the Hub (or its cache), else ``None``.
        revision: the revision asked for (``None``: main).
        commit: the commit of the snapshot read, when known.
        base_model: the Hub ID for ``base_model`` (defaults to ``repo_id``).
    """

    name: str
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    base_model: str | None = None

    @classmethod
    def from_path(cls, path: str | os.PathLike, base_model: str | None = None) -> CardSource:
        """A local source; a folder inside a Hugging Face cache (``models--org--name/
        snapshots/<commit>``) is recognised as that Hub model at that commit."""
        p = Path(path).resolve()
        parts = p.parts
        for i in range(len(parts) - 2):
            if (parts[i].startswith("models--") and parts[i + 1] == "snapshots"
                    and re.fullmatch(r"[0-9a-f]{40}", parts[i + 2])):
                repo = parts[i][len("models--"):].replace("--", "/", 1)
                return cls(str(path), repo, None, parts[i + 2], base_model or repo)
        return cls(str(path), None, None, None, base_model)

    def to_dict(self) -> dict:
        return {"name": self.name, "repo_id": self.repo_id, "revision": self.revision,
                "commit": self.commit}


# ----------------------------------------------------------------------------- parsing


def split_front_matter(text: str) -> tuple[dict, str, str]:
    """``(metadata, front matter text, body)`` of a Markdown card: the YAML between a first
    line ``---`` and the next ``---`` line; ``({}, "", text)`` without one. Front matter that is
    not a YAML mapping is kept as text with empty metadata (nothing is lost)."""
    import yaml

    m = re.match(r"\A---[ \t]*\r?\n(.*?)(?:\r?\n)?^---[ \t]*(?:\r?\n|\Z)", text, re.S | re.M)
    if not m:
        return {}, "", text
    raw = m.group(1)
    try:
        meta = yaml.safe_load(raw) or {}
    except yaml.YAMLError:
        meta = {}
    return (meta if isinstance(meta, dict) else {}), raw, text[m.end():]


def is_finefp8_card(folder: str | os.PathLike) -> bool:
    """Whether ``folder/README.md`` is a card finefp8 wrote."""
    try:
        return CARD_MARKER in (Path(folder) / CARD_NAME).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def card_source(folder: str | os.PathLike) -> dict | None:
    """The source a finefp8 card records (``CardSource.to_dict()``), or ``None``."""
    try:
        text = (Path(folder) / CARD_NAME).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    m = _SOURCE_JSON.search(text)
    return json.loads(m.group(1)) if m else None


# ----------------------------------------------------------------------------- what is on disk


def _kept_tensors(reader: CheckpointReader, ignore: Sequence[str]) -> dict[str, list[str]]:
    """``{reason: [module, ...]}`` of the 2-D ``.weight`` tensors left in high precision."""
    kept: dict[str, list[str]] = defaultdict(list)
    fp8 = set(reader.quantized_weights())
    for key in reader.keys():
        info = reader.info(key)
        if key in fp8 or not key.endswith(".weight") or len(info.shape) != 2:
            continue
        reason = skip_reason(key, info.shape, info.dtype, ignore) or "serving"
        if reason.startswith("ignored"):
            reason = "ignored"
        kept[reason if reason in _WHY else "other"].append(key[: -len(".weight")])
    return dict(kept)


def _method(config: dict) -> dict:
    """The facts of the method from ``config.json``'s ``quantization_config``."""
    qc = config.get("quantization_config") or {}
    layout = detect_format(config)
    block = list(block_size_of(config))
    scale_fmt = qc.get("scale_fmt") or "fp32"
    if layout == COMPRESSED_TENSORS:
        scale_name, scale_dtype = "weight_scale", "float32"
        ignore = list(qc.get("ignore") or [])
    else:
        scale_name, scale_dtype = "weight_scale_inv", "float32"
        ignore = list(qc.get("modules_to_not_convert") or [])
    act = "dynamic, per token and 128 channels (1x128 groups)"
    return {"layout": layout or FP8, "block": block, "scale_fmt": scale_fmt,
            "scale_name": scale_name, "scale_dtype": scale_dtype, "not_converted": ignore,
            "activations": act, "quant_method": qc.get("quant_method", layout)}


def _metadata(method: dict, source: CardSource, source_meta: dict, n_fp8: int) -> dict:
    meta: dict = {}
    if source.base_model:
        meta["base_model"] = source.base_model
        meta["base_model_relation"] = "quantized"
    meta["library_name"] = "transformers"
    for k in ("license", "license_name", "license_link", "language", "pipeline_tag"):
        if k in source_meta:
            meta[k] = source_meta[k]
    meta.setdefault("pipeline_tag", "text-generation")
    tags = ["fp8", "finefp8", "quantized", "fp8-e4m3",
            "block-{}x{}".format(*method["block"])]
    tags.append("compressed-tensors" if method["layout"] == COMPRESSED_TENSORS else "fp8-hf")
    if method["scale_fmt"] == "ue8m0":
        tags.append("ue8m0")
    src_tags = source_meta.get("tags") or []
    meta["tags"] = tags + [t for t in (src_tags if isinstance(src_tags, list) else [src_tags])
                           if t not in tags]
    meta["quantization_config"] = {
        "quant_method": method["quant_method"],
        "format": "float8_e4m3fn",
        "weight_block_size": method["block"],
        "scale_fmt": method["scale_fmt"],
        "activation_scheme": "dynamic",
        "quantized_layers": n_fp8,
        "modules_not_converted": len(method["not_converted"]),
        "tool": f"finefp8 {__version__}",
    }
    return meta


# ----------------------------------------------------------------------------- rendering


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def checkpoint_variant(config: dict) -> str:
    """The ``finefp8 eval`` variant that holds the same weights as a checkpoint with this
    ``config.json``: ``"ue8m0"`` for power-of-two scales, else ``"w8a8"`` (amax/448 scales,
    128x128 weight blocks, dynamic 1x128 activation groups)."""
    qc = (config or {}).get("quantization_config") or {}
    return "ue8m0" if qc.get("scale_fmt") == "ue8m0" else "w8a8"


def evaluation_section(summary: dict, this_variant: str | None = None,
                       this_label: str = "this checkpoint", note: str | None = None) -> str:
    """Markdown of a ``finefp8 eval`` summary (its JSON): what was compared, on which text,
    and a table of KL / top-1 agreement / perplexity per variant; ``this_variant``'s row is
    marked ``this_label``; ``note`` is a paragraph after the table."""
    model = summary.get("model") or {}
    text = summary.get("text") or {}
    lines = [
        f"Measured by `finefp8 eval` (finefp8 {summary.get('finefp8_version', '?')}): reference "
        f"`{model.get('name', '?')}` ({model.get('source', '?')}, {model.get('dtype', '?')}); "
        f"{summary.get('scored_tokens', summary.get('tokens', '?'))} scored tokens of "
        f"{text.get('name', '?')} in windows of {summary.get('window', '?')} tokens. KL is the "
        f"mean KL divergence of each variant's next-token distribution from the reference's "
        f"(nats); top-1 is the share of positions where both pick the same token.",
        "",
    ]
    if model.get("source") == "fp8-checkpoint":
        lines += ["The reference here is this checkpoint's own weights, dequantized: the rows show "
                  "what the FP8 variants add on top of them (activation quantization, "
                  "requantization), not the cost of the checkpoint against its source. For that, "
                  "run `finefp8 eval` on the source model with `--update-card` and this "
                  "checkpoint's folder.", ""]
    unc = summary.get("uncertainty") or {}
    if unc.get("block_tokens"):
        lines += [f"± is one standard error over blocks of {unc['block_tokens']} consecutive "
                  f"scored tokens ({unc.get('blocks', '?')} blocks); [ ] is a "
                  f"{unc.get('level', 0.95):.0%} bootstrap interval of the perplexity change over "
                  f"the same blocks, paired with the reference token by token (finefp8's "
                  f"docs/eval.md).",
                  ""]
    lines += ["| variant | KL (nats) | top-1 agree | ppl | ppl change |",
              "|---|---:|---:|---:|---:|"]
    for v in summary.get("variants", []):
        label = f"`{v['key']}`"
        if v["key"] == this_variant:
            label = f"**`{v['key']}` ({this_label})**"
        change = v.get("ppl_rel_change")
        ci = v.get("ppl_rel_change_ci")
        change_s = "-" if v["key"] == "reference" else f"{_fmt(change, '+.2%')}"
        if ci and v["key"] != "reference" and None not in ci:
            change_s += f" [{ci[0]:+.2%}, {ci[1]:+.2%}]"
        kl_s, top1_s = _fmt(v.get("kl"), ".5f"), _fmt(v.get("top1"), ".2%")
        if v["key"] != "reference" and v.get("kl_sem") is not None:
            kl_s += f" ± {v['kl_sem']:.5f}"
        if v["key"] != "reference" and v.get("top1_sem") is not None:
            top1_s += f" ± {v['top1_sem']:.2%}"
        lines.append(f"| {label} | {kl_s} | {top1_s} | {_fmt(v.get('ppl'), '.3f')} | "
                     f"{change_s} |")
    descr = [f"- `{v['key']}`: {v.get('description', '')}" for v in summary.get("variants", [])
             if v.get("description")]
    if descr:
        lines += ["", *descr]
    if note:
        lines += ["", note]
    return "\n".join(lines)


def render_card(out_dir: str | os.PathLike, source: CardSource, *, command: str | None = None,
                ignore: Sequence[str] = (), source_card: str | None = None,
                evaluation: str | None = None) -> str:
    """The text of OUT's ``README.md`` (see the module docstring).

    Args:
        out_dir: the checkpoint folder (its ``config.json`` and tensor headers are read).
        source: what it was made from.
        command: the command line that made it.
        ignore: the ``--ignore`` patterns (to say why a tensor was kept).
        source_card: the source's ``README.md`` text, kept below ours.
        evaluation: Markdown of an evaluation (``evaluation_section``), or ``None``.
    """
    import yaml

    out = Path(out_dir)
    with CheckpointReader(out) as reader:
        config = reader.config
        if detect_format(config) is None:
            raise CheckpointError(f"{out}: config.json has no FP8 quantization_config; a model "
                                  f"card describes an FP8 checkpoint")
        fp8 = reader.quantized_weights()
        kept = _kept_tensors(reader, ignore)
        n_other = sum(1 for k in reader.keys() if len(reader.shape(k)) < 2)
        fp8_bytes = sum(reader.nbytes(k) for k in fp8)
        total = sum(reader.nbytes(k) for k in reader.keys())
    method = _method(config)
    source_meta, source_raw, source_body = split_front_matter(source_card or "")
    if source_meta.get("base_model") and source_meta.get("base_model_relation") == "quantized" \
            and not source.base_model:
        source = CardSource(source.name, source.repo_id, source.revision, source.commit,
                            source_meta["base_model"])
    meta = _metadata(method, source, source_meta, len(fp8))
    title = (source.repo_id or source.base_model or Path(source.name).resolve().name
             ).split("/")[-1]
    where = f"[`{source.repo_id}`](https://huggingface.co/{source.repo_id})" if source.repo_id \
        else f"the local folder `{source.name}`"
    rev = ""
    if source.repo_id:
        rev = f", revision `{source.revision or 'main'}`"
        if source.commit:
            rev += f" (commit `{source.commit}`)"
    bm, bk = method["block"]
    scale_txt = ("rounded up to a power of two (UE8M0: an 8-bit exponent, as DeepSeek-V3.1 "
                 "stores them), still written as float32"
                 if method["scale_fmt"] == "ue8m0" else "float32")
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=100).rstrip(),
        "---",
        CARD_MARKER,
        f"<!-- finefp8:source {json.dumps(source.to_dict(), sort_keys=True)} -->",
        "",
        f"# {title} (FP8, {bm}x{bk} blocks)",
        "",
        f"An FP8 checkpoint of {where}{rev}, made by "
        f"finefp8 {__version__}.",
        "",
        "## Method",
        "",
        f"- **Weights**: every Linear weight not listed below ({len(fp8)} tensors) is stored as "
        f"FP8 E4M3 codes `Q` with one scale per {bm}x{bk} block, `W ~= Q * s`, "
        f"`s = amax(|W| in the block) / 448` (448 is E4M3's largest finite value), {scale_txt}. "
        f"This is DeepSeek-V3's fine-grained weight quantization (technical report "
        f"arXiv:2412.19437, section 3.3).",
        f"- **Layout**: `{method['layout']}`: the scale of `<module>.weight` is "
        f"`<module>.{method['scale_name']}` [ceil(N/{bm}), ceil(K/{bk})] "
        + ("(the DeepSeek-V3 / transformers `FineGrainedFP8` layout, read by vLLM and SGLang)."
           if method["layout"] != COMPRESSED_TENSORS else
           "(compressed-tensors `FP8_BLOCK`, read by vLLM and llm-compressor)."),
        f"- **Activations**: quantized at run time, {method['activations']}, scale "
        f"`amax / 448` per group (`activation_scheme: dynamic`); nothing was calibrated.",
        f"- **Size**: {fp8_bytes / 1e6:.1f} MB of FP8 weights; {total / 1e6:.1f} MB of tensors "
        f"in all.",
        "",
        "### Kept in high precision",
        "",
    ]
    if not kept:
        lines.append("- No 2-D weight besides the quantized ones.")
    for reason, mods in sorted(kept.items()):
        shown = ", ".join(f"`{m}`" for m in mods[:4]) + (f" and {len(mods) - 4} more"
                                                          if len(mods) > 4 else "")
        lines.append(f"- {reason} ({len(mods)}): {shown}: "
                     f"{_WHY.get(reason, 'not a 2-D float Linear weight')}.")
    lines.append(f"- {n_other} tensors of fewer than two dimensions (norm weights, biases) are "
                 f"copied as they are.")
    if "lm_head" in method["not_converted"] and "output head" not in kept:
        lines.append("- `lm_head` is listed as not converted: with tied embeddings it has no "
                     "tensor of its own, and it is never FP8.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import finefp8",
        f"model = finefp8.load({out.name!r})   # this folder, or its Hub ID once uploaded",
        "```",
        "",
        ("transformers (`FineGrainedFP8`), vLLM and SGLang read the `fp8` layout directly; "
         if method["layout"] != COMPRESSED_TENSORS else
         "vLLM reads compressed-tensors `FP8_BLOCK` directly (transformers with the "
         "compressed-tensors package); ")
        + "`finefp8 inspect` checks it and the tensor-parallel degrees it supports.",
        "",
        "## Provenance",
        "",
        f"- finefp8 version: {__version__}",
    ]
    if command:
        lines.append(f"- command: `{command}`")
    lines += ["", "## Evaluation", "", _EVAL_BEGIN,
              evaluation or f"No evaluation yet: `finefp8 eval {source.name} --update-card "
                            f"{out.name}` adds the KL / top-1 / perplexity table here.",
              _EVAL_END, ""]
    text = "\n".join(lines)
    if source_card and source_card.strip():
        # kept byte for byte: source_card_text gives it back exactly
        text += f"\n{_SOURCE_HEADING}\n\n{_SOURCE_NOTE}\n\n"
        if source_raw:
            text += f"```yaml\n{source_raw}\n```\n"
        text += source_body
    return text


def write_card(out_dir: str | os.PathLike, source: CardSource, *, command: str | None = None,
               ignore: Sequence[str] = (), source_card_path: str | os.PathLike | None = None,
               evaluation: str | None = None) -> Path:
    """Render OUT's card (``render_card``) and write ``OUT/README.md`` atomically.

    ``source_card_path`` is the source's ``README.md`` (absent file: no source card). An
    existing ``OUT/README.md`` that is not a finefp8 card (the source's, copied) is kept as the
    source card when ``source_card_path`` is not given. Returns the card's path.
    """
    out = Path(out_dir)
    path = out / CARD_NAME
    text = None
    candidates = [Path(source_card_path)] if source_card_path else []
    if not source_card_path and path.is_file() and not is_finefp8_card(out):
        candidates.append(path)
    for c in candidates:
        if c.is_file():
            try:
                text = c.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                text = c.read_bytes().decode("utf-8", "replace")
            break
    card = render_card(out, source, command=command, ignore=ignore, source_card=text,
                       evaluation=evaluation)
    atomic_write_bytes(path, card.encode("utf-8"))
    return path


def add_evaluation(out_dir: str | os.PathLike, section: str) -> Path:
    """Replace the evaluation section of ``OUT/README.md`` (a finefp8 card) with ``section``,
    atomically. ``ValueError`` naming the folder when it has no finefp8 card."""
    out = Path(out_dir)
    path = out / CARD_NAME
    if not is_finefp8_card(out):
        raise ValueError(f"{out}: no finefp8 model card ({CARD_NAME} written by 'finefp8 "
                         f"quantize'); --update-card needs one")
    text = path.read_text(encoding="utf-8")
    a, b = text.find(_EVAL_BEGIN), text.find(_EVAL_END)
    if a < 0 or b < a:
        raise ValueError(f"{path}: the evaluation markers of the finefp8 card are missing; "
                         f"rewrite the card with 'finefp8 quantize' or restore them")
    new = text[: a + len(_EVAL_BEGIN)] + "\n" + section.strip() + "\n" + text[b:]
    atomic_write_bytes(path, new.encode("utf-8"))
    return path


def source_card_text(card: str) -> str | None:
    """The source's README.md as it was, from a finefp8 card (``None`` when it kept none)."""
    start = f"\n{_SOURCE_HEADING}\n\n{_SOURCE_NOTE}\n\n"
    i = card.find(start)
    if i < 0:
        return None
    rest = card[i + len(start):]
    m = re.match(r"```yaml\n(.*?)\n```\n", rest, re.S)
    if m:
        return f"---\n{m.group(1)}\n---\n{rest[m.end():]}"
    return rest


def restore_source_card(out_dir: str | os.PathLike, source_name: str) -> Path:
    """For ``dequantize``: OUT's ``README.md``, copied from a finefp8 FP8 checkpoint, becomes
    the card of the model that checkpoint was made from (kept in its source section), or a
    short note naming ``source_name`` when it kept none: a card must not call a BF16 folder
    FP8. Written atomically; returns its path."""
    path = Path(out_dir) / CARD_NAME
    text = path.read_text(encoding="utf-8")
    restored = source_card_text(text) if CARD_MARKER in text else text
    if restored is None:
        restored = (f"# Dequantized from {source_name}\n\nWritten by `finefp8 dequantize` "
                    f"(finefp8 {__version__}) from the FP8 checkpoint `{source_name}`.\n")
    atomic_write_bytes(path, restored.encode("utf-8"))
    return path
