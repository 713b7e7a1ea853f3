"""MoE end to end on tiny random DeepSeek-V3, Qwen3-MoE and Mixtral models (no downloads).

quantize (``quantize_checkpoint`` on a ``save_pretrained`` folder) -> ``finefp8.load`` ->
logits compared with plain transformers on a float checkpoint whose weights this test
dequantizes itself; W8A8 experts against a float64 reference written here; ``quantize_model``
vs ``load``; generation; ``save_fp8`` round trip; the checkpoint errors.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from finefp8.checkpoint import CheckpointError  # noqa: E402
from finefp8.checkpoint.convert import quantize_checkpoint  # noqa: E402
from finefp8.nn import FP8Config, FP8Linear, fp8_modules, load, quantize_model, save_fp8  # noqa: E402
from finefp8.nn.experts import FP8Experts, experts_layout_problem  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from moe_models import FAMILIES, deepseek_v3  # noqa: E402


def _ids(n: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 320, (1, n), generator=torch.Generator().manual_seed(seed))


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def _dequantized_float_checkpoint(src: Path, dst: Path) -> Path:
    """Write ``src`` (an FP8 checkpoint, either layout) as float32 with ``W = Q * s`` computed
    here in float64 (blocks of 128), and no quantization_config: plain transformers reads it."""
    dst.mkdir()
    tensors = {}
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        for key in keys:
            if key.endswith((".weight_scale_inv", ".weight_scale")):
                continue
            t = f.get_tensor(key)
            if t.dtype == torch.float8_e4m3fn:
                skey = next(k for k in (key + "_scale_inv", key + "_scale") if k in keys)
                s = f.get_tensor(skey).double()
                n, k = t.shape
                full = s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
                t = (t.double() * full).float()
            tensors[key] = t.contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    cfg["dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("family", list(FAMILIES))
def test_quantize_model_swaps_experts_and_keeps_router(family):
    model = quantize_model(FAMILIES[family](), mode="weight_only")
    fp8 = fp8_modules(model)
    experts = {n: m for n, m in fp8.items() if isinstance(m, FP8Experts)}
    assert len(experts) == model.config.num_hidden_layers - getattr(
        model.config, "first_k_dense_replace", 0)
    for name, m in experts.items():
        assert m.gate_up_proj.dtype == torch.float8_e4m3fn and m.down_proj.dtype == torch.float8_e4m3fn
        gate = model.get_submodule(name.rpartition(".")[0] + ".gate")
        assert gate.weight.dtype == torch.float32  # the router stays in high precision
        if family == "deepseek_v3":
            assert gate.e_score_correction_bias.dtype == torch.float32


def test_ignore_keeps_experts_and_unknown_layout_is_refused():
    model = quantize_model(deepseek_v3(), ignore=["*.mlp.experts"])
    assert not any(isinstance(m, FP8Experts) for m in fp8_modules(model).values())

    class TransposedExperts(torch.nn.Module):  # gpt-oss style: [E, H, 2I], biases
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(2, 8, 12))
            self.gate_up_proj_bias = torch.nn.Parameter(torch.randn(2, 12))
            self.down_proj = torch.nn.Parameter(torch.randn(2, 6, 8))

        def forward(self, hidden_states, router_indices=None, routing_weights=None):
            return hidden_states

    holder = torch.nn.Module()
    holder.experts = TransposedExperts()
    assert experts_layout_problem(holder.experts) is not None
    with pytest.raises(ValueError, match="'experts'.*unsupported layout"):
        quantize_model(holder)
    quantize_model(holder, ignore=["experts"])  # kept on request
    conv = torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3), torch.nn.Linear(256, 256))
    quantize_model(conv)  # a 3-D convolution weight is not an experts module
    assert isinstance(conv[1], FP8Linear)


# ----------------------------------------------------------------------------- the math


def _q_groups(x: torch.Tensor) -> torch.Tensor:
    """Independent float64 model of 1x128 activation quantization: s = amax/448, E4M3 codes."""
    out = torch.empty_like(x)
    for g in range(0, x.shape[1], 128):
        blk = x[:, g:g + 128]
        s = blk.abs().amax(1, keepdim=True).clamp_min(1e-12) / 448.0
        out[:, g:g + 128] = (blk / s).float().to(torch.float8_e4m3fn).double() * s
    return out


def _w(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    return q.double() * s.double().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]


def _reference_w8a8(m: FP8Experts, x, idx, weights):
    """The experts' W8A8 math in float64, token by token, slot by slot."""
    x64 = x.double()
    out = torch.zeros_like(x64)
    i = m.intermediate_dim
    gi = math.ceil(i / 128)
    for t in range(x.shape[0]):
        for slot in range(idx.shape[1]):
            e = int(idx[t, slot])
            gu, gus = m.gate_up_proj[e], m.gate_up_proj_scale_inv[e]
            wg, wu = _w(gu[:i], gus[:gi]), _w(gu[i:], gus[gi:])
            wd = _w(m.down_proj[e], m.down_proj_scale_inv[e])
            xq = _q_groups(x64[t:t + 1])
            h = torch.nn.functional.silu(xq @ wg.T) * (xq @ wu.T)
            out[t] += (_q_groups(h) @ wd.T)[0] * float(weights[t, slot])
    return out


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_w8a8_experts_match_float64_reference(family):
    model = FAMILIES[family]()
    name = "model.layers.1.mlp.experts"
    fp8 = FP8Experts.from_experts(model.get_submodule(name), FP8Config(), name=name)
    torch.manual_seed(3)
    t, e = 7, fp8.num_experts
    x = torch.randn(t, fp8.hidden_dim)
    idx = torch.stack([torch.randperm(e)[:2] for _ in range(t)])
    weights = torch.rand(t, 2)
    got = fp8(x, idx, weights).double()
    ref = _reference_w8a8(fp8, x, idx, weights)
    assert (got - ref).norm() / ref.norm() < 2e-3
    assert (got - ref).abs().max() < 1e-2 * ref.abs().max()


def test_w8a8_grouped_gemm_path_matches_per_expert_path():
    model = deepseek_v3()
    fp8 = FP8Experts.from_experts(model.model.layers[1].mlp.experts, FP8Config())
    torch.manual_seed(4)
    x = torch.randn(9, fp8.hidden_dim)
    idx = torch.stack([torch.randperm(fp8.num_experts)[:2] for _ in range(9)])
    w = torch.rand(9, 2)
    fp8.grouped = False
    per_expert = fp8(x, idx, w)
    fp8.grouped = True
    torch.testing.assert_close(fp8(x, idx, w), per_expert, rtol=1e-5, atol=1e-6)


def test_only_selected_experts_are_computed(monkeypatch):
    model = deepseek_v3()
    fp8 = FP8Experts.from_experts(model.model.layers[1].mlp.experts,
                                  FP8Config(mode="weight_only"))
    seen = []
    original = FP8Experts.expert_forward

    def spy(self, e, x):
        seen.append((e, x.shape[0]))
        return original(self, e, x)

    monkeypatch.setattr(FP8Experts, "expert_forward", spy)
    x = torch.randn(3, fp8.hidden_dim)
    idx = torch.tensor([[5, 2], [2, 7], [5, 8]])  # 8 == E: a slot routed to no expert
    out = fp8(x, idx, torch.rand(3, 2))
    assert sorted(seen) == [(2, 2), (5, 2), (7, 1)]
    assert out.shape == x.shape


@pytest.mark.parametrize("mode", ["weight_only", "w8a8", "act_only"])
def test_experts_same_routing_as_bf16_module(mode):
    """The MoE block around FP8Experts routes as the float model: the router's choice is
    computed by the original router on the same input, and the output stays close."""
    model = deepseek_v3()
    block = model.model.layers[1].mlp
    torch.manual_seed(5)
    x = torch.randn(1, 6, 256) * 0.5
    with torch.no_grad():
        ref = block(x)
        _, w_ref, idx_ref = block.gate(x)
    quantize_model(model, config=FP8Config(mode=mode))
    with torch.no_grad():
        _, w_q, idx_q = block.gate(x)
        got = block(x)
    assert torch.equal(idx_ref, idx_q) and torch.equal(w_ref, w_q)
    assert (got - ref).norm() / ref.norm() < 0.1


def test_per_tensor_experts_have_one_scale_per_expert_matrix():
    model = deepseek_v3()
    block = model.model.layers[1].mlp
    x = torch.randn(1, 5, 256) * 0.5
    with torch.no_grad():
        ref = block(x)
    quantize_model(model, config=FP8Config.per_tensor())
    fp8 = block.experts
    assert fp8.gate_up_proj_scale_inv.shape == (8, 2, 1)  # gate, up
    assert fp8.down_proj_scale_inv.shape == (8, 1, 1)
    gate = model.model.layers[1].mlp.experts.expert_weights(3)["gate_proj"]
    amax = deepseek_v3().model.layers[1].mlp.experts.gate_up_proj[3, :128].detach().abs().max()
    assert float(gate[1]) == pytest.approx(float(amax) / 448, rel=1e-6)
    with torch.no_grad():
        got = block(x)
    assert (got - ref).norm() / ref.norm() < 0.1


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("fmt", ["fp8", "compressed-tensors"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_quantize_load_weight_only_equals_dequantized_transformers(family, fmt, tmp_path):
    src = _save(FAMILIES[family](), tmp_path / "bf16")
    dst = tmp_path / "fp8"
    quantize_checkpoint(src, dst, layout=fmt, progress=False, tp=())
    model = load(dst, mode="weight_only", dtype=torch.float32)
    experts = [m for m in fp8_modules(model).values() if isinstance(m, FP8Experts)]
    assert experts and all(m.gate_up_proj.dtype == torch.float8_e4m3fn for m in experts)
    plain = transformers.AutoModelForCausalLM.from_pretrained(
        _dequantized_float_checkpoint(dst, tmp_path / "deq"), dtype=torch.float32).eval()
    ids = _ids()
    torch.testing.assert_close(_logits(model, ids), _logits(plain, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_quantize_model_and_load_give_the_same_outputs(family, tmp_path):
    model = FAMILIES[family]()
    src = _save(model, tmp_path / "bf16")
    quantize_checkpoint(src, tmp_path / "fp8", progress=False, tp=())
    loaded = load(tmp_path / "fp8", dtype=torch.float32)
    in_memory = quantize_model(model)
    ids = _ids()
    torch.testing.assert_close(_logits(loaded, ids), _logits(in_memory, ids), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_save_fp8_writes_per_expert_layout_and_loads_back(family, tmp_path):
    model = quantize_model(FAMILIES[family]())
    save_fp8(model, tmp_path / "out", tp=())  # every FP8 layer as it is
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        part = "block_sparse_moe.experts.3.w3" if family == "mixtral" else "mlp.experts.3.up_proj"
        key = f"model.layers.1.{part}.weight"
        assert key in keys and f"{key[:-len('weight')]}weight_scale_inv" in keys
        assert f.get_tensor(key).dtype == torch.float8_e4m3fn
    assert not any(k.endswith("gate_up_proj") for k in keys)
    again = load(tmp_path / "out", dtype=torch.float32)
    ids = _ids()
    torch.testing.assert_close(_logits(again, ids), _logits(model, ids), rtol=0, atol=0)


def test_fused_on_disk_family_loads_and_saves_fused(tmp_path):
    """GraniteMoe keeps every expert of a projection in one 3-D tensor on disk
    (``block_sparse_moe.input_linear.weight [E, 2I, H]``): quantize -> load -> save_fp8."""
    cfg = transformers.GraniteMoeConfig(
        vocab_size=320, hidden_size=192, intermediate_size=128, num_hidden_layers=1,
        num_local_experts=4, num_experts_per_tok=2, num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = transformers.GraniteMoeForCausalLM(cfg).eval()
    src = _save(model, tmp_path / "bf16")
    quantize_checkpoint(src, tmp_path / "fp8", progress=False, tp=())
    loaded = load(tmp_path / "fp8", dtype=torch.float32)
    assert isinstance(loaded.model.layers[0].block_sparse_moe.experts, FP8Experts)
    ids = _ids()
    torch.testing.assert_close(_logits(loaded, ids), _logits(quantize_model(model), ids),
                               rtol=0, atol=0)
    save_fp8(loaded, tmp_path / "out", tp=())
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    layer = "model.layers.0.block_sparse_moe"
    assert {f"{layer}.input_linear.weight", f"{layer}.experts.gate_up_proj_scale_inv",
            f"{layer}.output_linear.weight", f"{layer}.experts.down_proj_scale_inv"} <= keys
    torch.testing.assert_close(_logits(load(tmp_path / "out", dtype=torch.float32), ids),
                               _logits(loaded, ids), rtol=0, atol=0)


def test_experts_kept_in_float_load_and_save_per_expert(tmp_path):
    """Experts left in high precision (``--ignore``) are stacked back into the fused float
    parameters on load, and written per expert (and listed as not converted) by save_fp8."""
    model = deepseek_v3()
    src = _save(model, tmp_path / "bf16")
    quantize_checkpoint(src, tmp_path / "fp8", ignore=["*.mlp.experts.*"], progress=False, tp=())
    loaded = load(tmp_path / "fp8", dtype=torch.float32)
    experts = loaded.model.layers[1].mlp.experts
    assert not isinstance(experts, FP8Experts)
    torch.testing.assert_close(experts.gate_up_proj, model.model.layers[1].mlp.experts.gate_up_proj,
                               rtol=0, atol=0)
    in_memory = quantize_model(deepseek_v3(), ignore=["*.mlp.experts"])
    ids = _ids()
    torch.testing.assert_close(_logits(loaded, ids), _logits(in_memory, ids), rtol=0, atol=0)
    save_fp8(in_memory, tmp_path / "out", tp=())
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "model.layers.1.mlp.experts" in cfg["quantization_config"]["modules_to_not_convert"]
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        key = "model.layers.1.mlp.experts.7.down_proj.weight"
        assert f.get_tensor(key).dtype == torch.float32
        assert not any(k.startswith("model.layers.1.mlp.experts.7.down_proj.weight_scale")
                       for k in f.keys())
    torch.testing.assert_close(_logits(load(tmp_path / "out", dtype=torch.float32), ids),
                               _logits(in_memory, ids), rtol=0, atol=0)


def test_generate_with_a_loaded_fp8_moe(tmp_path):
    src = _save(deepseek_v3(), tmp_path / "bf16")
    quantize_checkpoint(src, tmp_path / "fp8", progress=False, tp=())
    model = load(tmp_path / "fp8")
    out = model.generate(_ids(4), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def fp8_deepseek(tmp_path) -> Path:
    src = _save(deepseek_v3(), tmp_path / "bf16")
    quantize_checkpoint(src, tmp_path / "fp8", progress=False, tp=())
    return tmp_path / "fp8"


def _rewrite(folder: Path, change) -> None:
    path = folder / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_expert_scale_is_named(fp8_deepseek):
    key = "model.layers.1.mlp.experts.5.down_proj.weight_scale_inv"
    _rewrite(fp8_deepseek, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load(fp8_deepseek)


@pytest.mark.parametrize("experts", [6, 10])
def test_expert_count_that_disagrees_with_config_is_named(fp8_deepseek, experts):
    cfg = json.loads((fp8_deepseek / "config.json").read_text())
    cfg["n_routed_experts"] = experts
    (fp8_deepseek / "config.json").write_text(json.dumps(cfg))
    want = ("experts.6.gate_proj.weight.*config.json gives 6 experts" if experts == 6
            else "lacks tensor 'model.layers.1.mlp.experts.8.gate_proj.weight'.*10 experts")
    with pytest.raises(CheckpointError, match=want):
        load(fp8_deepseek)


def test_expert_tensor_of_unexpected_shape_is_named(fp8_deepseek):
    key = "model.layers.1.mlp.experts.2.up_proj.weight"
    _rewrite(fp8_deepseek, lambda t: t.__setitem__(key, t[key][:64].contiguous()))
    with pytest.raises(CheckpointError, match=rf"{key.replace('.', '.')}' has shape \[64, 256\]"):
        load(fp8_deepseek)


def test_fused_3d_expert_tensor_of_unexpected_shape_is_named(fp8_deepseek):
    layer = "model.layers.1.mlp.experts"

    def fuse(t):
        for e in range(8):
            for p in ("gate_proj", "up_proj", "down_proj"):
                t.pop(f"{layer}.{e}.{p}.weight")
                t.pop(f"{layer}.{e}.{p}.weight_scale_inv")
        t[f"{layer}.gate_up_proj"] = torch.zeros(8, 256, 128, dtype=torch.float8_e4m3fn)
        t[f"{layer}.down_proj"] = torch.zeros(8, 256, 128, dtype=torch.float8_e4m3fn)

    _rewrite(fp8_deepseek, fuse)
    with pytest.raises(CheckpointError, match=rf"'{layer}.gate_up_proj' has shape \[8, 256, 128\]"):
        load(fp8_deepseek)


@pytest.mark.gpu
def test_w8a8_experts_on_cuda_run_grouped_and_match_the_cpu():
    """On CUDA, W8A8 experts run as grouped FP8 GEMMs (one launch per projection for all
    chosen experts) and give the per-expert CPU result."""
    model = deepseek_v3()
    cpu = FP8Experts.from_experts(model.model.layers[1].mlp.experts, FP8Config())
    torch.manual_seed(6)
    x = torch.randn(33, cpu.hidden_dim)
    idx = torch.stack([torch.randperm(cpu.num_experts)[:2] for _ in range(33)])
    w = torch.rand(33, 2)
    want = cpu(x, idx, w)
    gpu = cpu.to("cuda")  # codes and scales keep their dtypes
    assert gpu.gate_up_proj.dtype == torch.float8_e4m3fn and gpu._use_grouped(gpu.down_proj.device)
    got = gpu(x.cuda(), idx.cuda(), w.cuda()).cpu()
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
