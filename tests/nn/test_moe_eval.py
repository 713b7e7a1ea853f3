"""``finefp8 eval`` on a tiny random DeepSeek-V3 (MLA + MoE + shared expert), offline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from finefp8.cli import main  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from moe_models import deepseek_v3  # noqa: E402

WORDS = ("the quick brown fox jumps over lazy dog and then runs far away into a dark green "
         "forest where many small birds sing every morning while bright sun rises").split()


@pytest.fixture(scope="module")
def tiny_deepseek_dir(tmp_path_factory):
    """A saved tiny DeepSeek-V3 with a word-level tokenizer, and a text file of those words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny_deepseek")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                         bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    deepseek_v3().save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    text = folder / "text.txt"
    text.write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (1500,),
                                                              generator=g).tolist()))
    return folder


def test_eval_quantizes_experts_in_every_variant(tiny_deepseek_dir, tmp_path, capsys):
    save = tmp_path / "saved"
    rc = main(["eval", str(tiny_deepseek_dir), "--text", str(tiny_deepseek_dir / "text.txt"),
               "--tokens", "64", "--window", "32",
               "--layer-tokens", "32", "--variants", "weight_only", "act_only",
               "--save-variant", "w8a8", str(save), "--no-report", "--json", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    model = summary["model"]
    assert model["experts_modules"] == 1
    # every parameter but embeddings, head, norms, router is FP8: experts dominate
    cfg = transformers.AutoConfig.from_pretrained(tiny_deepseek_dir)
    experts = cfg.n_routed_experts * 3 * cfg.moe_intermediate_size * cfg.hidden_size
    assert model["expert_parameters"] == experts
    assert experts < model["fp8_parameters"] < model["parameters"]
    assert model["fp8_parameter_share"] == pytest.approx(model["fp8_parameters"]
                                                         / model["parameters"])
    by_key = {v["key"]: v for v in summary["variants"]}
    ref = by_key["reference"]
    for key in ("w8a8", "weight_only"):
        v = by_key[key]
        # experts in FP8: about 1 byte a weight instead of 4 (fp32 reference)
        assert v["resident_weight_bytes"] < 0.3 * ref["resident_weight_bytes"], key
        rows = {r["name"]: r for r in v["layers"]}
        for group in ("gate_up_proj", "down_proj"):
            row = rows[f"model.layers.1.mlp.experts.{group}"]
            assert row["experts"] == cfg.n_routed_experts
            assert 0 <= row["worst_expert"] < cfg.n_routed_experts
            assert row["worst_expert_out_snr_db"] <= row["out_snr_db"] + 1e-6
            assert row["weight_snr_db"] > 20 and row["out_snr_db"] > 15
        assert not any(".experts.0." in n for n in rows)  # aggregated, not one row per expert
    assert by_key["act_only"]["resident_weight_bytes"] == ref["resident_weight_bytes"]
    # the saved W8A8 variant is the per-expert fp8 layout, and loads back with FP8 experts
    import finefp8
    from finefp8.nn.experts import FP8Experts

    loaded = finefp8.load(save)
    assert isinstance(loaded.model.layers[1].mlp.experts, FP8Experts)
    assert (save / "model.safetensors").is_file()


def test_gptq_calibrates_each_expert_on_its_routed_tokens():
    """Per-expert Hessians from the tokens the router sends to each expert; an expert that got
    none keeps amax/448 rounding and is listed as uncalibrated."""
    from finefp8 import ops
    from finefp8.eval.moe import collect_expert_hessians
    from finefp8.eval.variants import VARIANTS, build_variant, collect_hessians, convertible_linears
    from finefp8.nn.experts import FP8Experts

    model = deepseek_v3()
    name = "model.layers.1.mlp.experts"
    ids = torch.randint(3, 320, (3,), generator=torch.Generator().manual_seed(2))
    seen = {}
    hook = model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args: seen.update(x=args[0].detach().double(), idx=args[1].clone()))
    hessians = collect_hessians(model, convertible_linears(model), [ids])
    hook.remove()
    hessians.update(collect_expert_hessians(model, [name], [ids]))
    routed = sorted({int(e) for e in seen["idx"].flatten()})
    assert 0 < len(routed) < 8  # 3 tokens x top-2: some experts get no token
    for e in range(8):
        rows = (seen["idx"] == e).any(-1)
        if not rows.any():
            assert f"{name}.{e}.gate_proj" not in hessians
            continue
        x = seen["x"][rows]
        want = 2 * x.T @ x / x.shape[0]
        torch.testing.assert_close(hessians[f"{name}.{e}.gate_proj"].double(), want,
                                   rtol=1e-5, atol=1e-6)
        assert hessians[f"{name}.{e}.up_proj"] is hessians[f"{name}.{e}.gate_proj"]
        assert hessians[f"{name}.{e}.down_proj"].shape == (128, 128)
    cache: dict = {}
    variant = build_variant(model, VARIANTS["w8a8_gptq"], hessians, cache)
    fp8 = variant.get_submodule(name)
    assert isinstance(fp8, FP8Experts)
    missing = [e for e in range(8) if e not in routed]
    assert cache["uncalibrated"] == {f"{name}.{e}.{p}" for e in missing
                                     for p in ("gate_proj", "up_proj", "down_proj")}
    ref = model.get_submodule(name)
    for e in range(8):
        plain, _ = ops.quantize_blockwise(ref.down_proj[e].detach())
        same = torch.equal(fp8.down_proj[e].view(torch.uint8), plain.view(torch.uint8))
        assert same == (e in missing), e  # GPTQ changes codes only where it calibrated


def test_deepseek_v3_shapes_are_over_95_percent_fp8():
    """DeepSeek-V3's own config (61 layers, 256 routed experts of 7168x2048, vocab 129280),
    built on the meta device: FP8 variants hold > 95% of its parameters in FP8."""
    from finefp8.eval.moe import parameter_counts

    cfg = transformers.DeepseekV3Config()  # transformers' defaults are DeepSeek-V3's sizes
    assert (cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts) == (7168, 2048, 256)
    with torch.device("meta"):
        model = transformers.DeepseekV3ForCausalLM(cfg)
    counts = parameter_counts(model)
    assert 6.6e11 < counts["total"] < 6.9e11  # 671B + the multi-token-prediction-free head
    assert counts["fp8"] / counts["total"] > 0.95
    assert counts["experts"] == 58 * 256 * 3 * 7168 * 2048


def test_finefp8_quantize_then_generate_on_a_moe_checkpoint(tiny_deepseek_dir, tmp_path, capsys):
    """The issue's failing path: ``finefp8 quantize`` then ``finefp8 generate`` on DeepSeek-V3."""
    out = tmp_path / "fp8"
    assert main(["quantize", str(tiny_deepseek_dir), str(out)]) == 0
    capsys.readouterr()
    rc = main(["generate", str(out), "--prompt", "the quick brown fox", "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.startswith("the quick brown fox")
