"""``finefp8 quantize --calibrate gptq`` (finefp8.nn.calibrate): layer-by-layer GPTQ codes in the
plain checkpoint layouts, checked against plain quantize, transformers, finefp8.load and an
independent whole-model calibration built from ``finefp8.eval.variants.collect_hessians``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from finefp8 import calibration, ops
from finefp8.checkpoint.convert import quantize_checkpoint
from finefp8.checkpoint.staged import WORK_DIR

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama  # noqa: E402

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from finefp8.nn import calibrate as cal  # noqa: E402
from finefp8.nn.calibrate import CalibrationTokens, quantize_calibrated  # noqa: E402

#: dims multiples of 128 so that transformers' own CPU FP8 loader accepts the output
DIMS = dict(hidden_size=256, intermediate_size=512, num_attention_heads=2,
            num_key_value_heads=1, num_hidden_layers=2)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _ids(n: int, length: int, seed: int, vocab: int = 300) -> torch.Tensor:
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory):
    """A float32 tiny Llama, its plain FP8 checkpoint and its GPTQ-calibrated one."""
    root = tmp_path_factory.mktemp("cal")
    model = tiny_llama(tie=False, **DIMS)
    model.save_pretrained(root / "in")
    tokens = CalibrationTokens(_ids(8, 128, seed=5), "random ids", "ab" * 32)
    quantize_checkpoint(root / "in", root / "plain", progress=False)
    res = quantize_calibrated(root / "in", root / "gptq", tokens, progress=False)
    return model, root, tokens, res


def test_calibrated_checkpoint_has_plain_layout_and_differs_in_codes(llama_runs):
    _, root, _, res = llama_runs
    plain, gptq = _tensors(root / "plain"), _tensors(root / "gptq")
    assert {k: (v.dtype, v.shape) for k, v in plain.items()} == \
        {k: (v.dtype, v.shape) for k, v in gptq.items()}
    weights = [k for k, v in plain.items() if v.dtype == torch.float8_e4m3fn]
    assert len(weights) == 7 * DIMS["num_hidden_layers"]
    for k in weights:
        # same amax/448 scales (recomputed here from the float weights), different codes
        assert torch.equal(plain[k.replace("weight", "weight_scale_inv")],
                           gptq[k.replace("weight", "weight_scale_inv")])
        diff = (plain[k].view(torch.uint8) != gptq[k].view(torch.uint8)).float().mean()
        assert diff > 0.01, k
    for k, v in plain.items():  # everything not quantized is copied as it is
        if v.dtype != torch.float8_e4m3fn and "scale" not in k:
            assert torch.equal(v, gptq[k])
    assert not (root / "gptq" / WORK_DIR).exists()  # scratch removed once complete
    meta = json.loads((root / "gptq" / "config.json").read_text())["finefp8_calibration"]
    assert meta["method"] == "gptq" and meta["text"] == "random ids"
    assert meta["text_sha256"] == "ab" * 32 and meta["tokens"] == 1024
    assert meta["calibrated"] == len(weights) and meta["plain"] == []
    assert res.metadata["calibrated"] == len(weights)


def test_calibrated_checkpoint_loads_and_has_lower_error(llama_runs):
    """Held-out ids (another seed), output MSE against the float model: GPTQ below plain,
    in finefp8.load (w8a8) and in transformers' own FP8 loader (weights dequantized)."""
    import finefp8

    model, root, _, _ = llama_runs
    held_out = _ids(3, 48, seed=99)
    with torch.no_grad():
        ref = model(held_out).logits
        errs = {}
        for name in ("plain", "gptq"):
            ours = finefp8.load(root / name)
            errs[name] = float((ours(held_out).logits - ref).pow(2).mean())
            theirs = transformers.AutoModelForCausalLM.from_pretrained(root / name)
            w = theirs.model.layers[1].mlp.down_proj.weight
            t = _tensors(root / name)
            key = "model.layers.1.mlp.down_proj.weight"
            deq = ops.dequantize_blockwise(t[key], t[key + "_scale_inv"], (128, 128), w.dtype)
            assert torch.equal(w, deq)
            errs[name + "_hf"] = float((theirs(held_out).logits.float() - ref).pow(2).mean())
    assert errs["gptq"] < 0.9 * errs["plain"], errs
    assert errs["gptq_hf"] < errs["plain_hf"], errs


def _whole_model_codes(model, ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Independent reference: the whole float model in memory; for each layer in turn, the
    Hessians of its Linear inputs from ``collect_hessians`` over full-model forwards, GPTQ
    (act-order) codes, then the layer's weights replaced by ``q * s`` before the next one."""
    from finefp8.eval.variants import collect_hessians

    model = __import__("copy").deepcopy(model)
    out = {}
    windows = list(ids)
    for i, layer in enumerate(model.model.layers):
        names = [f"model.layers.{i}.{n}" for n, m in layer.named_modules()
                 if isinstance(m, torch.nn.Linear)]
        hs = collect_hessians(model, names, windows)
        for n in names:
            mod = model.get_submodule(n)
            fac = calibration.gptq_factor(hs[n], act_order=True)
            q, s = calibration.gptq_quantize(mod.weight.detach().float(), None, None,
                                             factor=fac)
            out[n + ".weight"] = (q, s)
            with torch.no_grad():
                mod.weight.copy_(ops.dequantize_blockwise(q, s, (128, 128), torch.float32))
    return out


def test_layer_by_layer_equals_whole_model_calibration(llama_runs, tmp_path):
    """With every Linear on its input's Hessian (``kv_hessian="input"``)."""
    model, root, tokens, _ = llama_runs
    expected = _whole_model_codes(model, tokens.ids)
    quantize_calibrated(root / "in", tmp_path / "input", tokens, progress=False,
                        kv_hessian="input")
    got = _tensors(tmp_path / "input")
    assert len(expected) == 14
    for k, (q, s) in expected.items():
        assert torch.equal(got[k.replace("weight", "weight_scale_inv")], s), k
        assert torch.equal(got[k].view(torch.uint8), q.view(torch.uint8)), k


def test_compressed_tensors_layout(llama_runs, tmp_path):
    _, root, tokens, _ = llama_runs
    quantize_checkpoint(root / "in", tmp_path / "plain", layout="compressed-tensors",
                        progress=False)
    quantize_calibrated(root / "in", tmp_path / "gptq", tokens, layout="compressed-tensors",
                        progress=False)
    plain, gptq, fp8 = _tensors(tmp_path / "plain"), _tensors(tmp_path / "gptq"), \
        _tensors(root / "gptq")
    assert {k: v.shape for k, v in plain.items()} == {k: v.shape for k, v in gptq.items()}
    for k, v in gptq.items():
        if v.dtype == torch.float8_e4m3fn:  # same codes as the fp8 layout, other scale name
            assert torch.equal(v.view(torch.uint8), fp8[k].view(torch.uint8))
            assert torch.equal(gptq[k + "_scale"], fp8[k + "_scale_inv"])
    cfg = json.loads((tmp_path / "gptq" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert cfg["finefp8_calibration"]["method"] == "gptq"


def _stop_after_layer0(seen: list[int]):
    """An ``on_layer`` callback recording each layer and raising KeyboardInterrupt (as Ctrl-C)
    after layer 0."""
    def on_layer(i: int, _n: int) -> None:
        seen.append(i)
        if i == 0:
            raise KeyboardInterrupt
    return on_layer


def test_interrupted_calibration_resumes_per_layer(llama_runs, tmp_path):
    """A run stopped after layer 0 (KeyboardInterrupt, as Ctrl-C) leaves its scratch; the same
    call resumes at layer 1 and writes the same bytes as the uninterrupted run."""
    _, root, tokens, _ = llama_runs
    seen: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        quantize_calibrated(root / "in", tmp_path / "out", tokens, progress=False,
                            on_layer=_stop_after_layer0(seen))
    assert (tmp_path / "out" / WORK_DIR).is_dir()
    assert not (tmp_path / "out" / "config.json").exists()
    quantize_calibrated(root / "in", tmp_path / "out", tokens, progress=False,
                        on_layer=lambda i, n: seen.append(i))
    assert seen == [0, 1]  # layer 0 was not redone
    a, b = _tensors(root / "gptq"), _tensors(tmp_path / "out")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.float8_e4m3fn else a[k],
                           b[k].view(torch.uint8) if b[k].dtype == torch.float8_e4m3fn else b[k])
               for k in a)
    # a rerun of a complete conversion does nothing; other calibration tokens are refused
    again = quantize_calibrated(root / "in", tmp_path / "out", tokens, progress=False)
    assert again.conversion.already_complete
    other = CalibrationTokens(_ids(8, 128, seed=6), "other ids", "cd" * 32)
    with pytest.raises(Exception, match="other options"):
        quantize_calibrated(root / "in", tmp_path / "out", other, progress=False)


def test_one_decoder_layer_materialized_at_a_time(llama_runs, tmp_path, monkeypatch):
    """While a layer is calibrated, every other decoder layer's parameters are on the meta
    device (deterministic form of the memory bound; the RSS form is the next test)."""
    _, root, tokens, _ = llama_runs
    counts = []
    real = cal._load_layer

    def spy(model, reader, name, model_key, dtype):
        real(model, reader, name, model_key, dtype)
        counts.append(sum(any(not p.is_meta for p in layer.parameters())
                          for layer in model.model.layers))
        counts.append(int(not model.get_input_embeddings().weight.is_meta))

    monkeypatch.setattr(cal, "_load_layer", spy)
    quantize_calibrated(root / "in", tmp_path / "out", tokens, progress=False)
    assert counts == [1, 0, 1, 0]


def test_peak_rss_does_not_grow_with_layer_count():
    """Peak RSS of calibrating 2 vs 10 layers of 12.6 MB each (psutil, child processes): the
    8 extra layers (101 MB of float32 weights) add less than half of that."""
    out = subprocess.run([sys.executable, "benchmarks/calibrate_memory.py", "--layers", "2",
                          "10", "--tokens", "128", "--window", "128"],
                         capture_output=True, text=True, check=True, timeout=600,
                         cwd=Path(__file__).parents[2])
    rows = [line.split() for line in out.stdout.splitlines()[1:] if line.strip()]
    (n2, ck2, layer_mb, peak2, _), (n10, ck10, _, peak10, _) = rows
    growth = float(peak10) - float(peak2)
    whole = float(ck10) - float(ck2)
    assert whole > 95
    assert growth < 0.5 * whole, out.stdout


# ----------------------------------------------------------------------------- MoE


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from moe_models import qwen3_moe

    root = tmp_path_factory.mktemp("moe")
    model = qwen3_moe()
    model.save_pretrained(root / "in")
    # tp=(): every expert in FP8 (at TP 1 the serving rule keeps 96-wide experts in float)
    quantize_checkpoint(root / "in", root / "plain", progress=False, tp=())
    return model, root


def _expert_keys(t: dict) -> list[str]:
    return [k for k, v in t.items() if ".experts." in k and v.dtype == torch.float8_e4m3fn]


def test_moe_experts_calibrated_on_their_routed_tokens(moe_dir, tmp_path):
    import finefp8

    model, root = moe_dir
    tokens = CalibrationTokens(_ids(8, 128, seed=3, vocab=320), "random ids", "ef" * 32)
    res = quantize_calibrated(root / "in", tmp_path / "gptq", tokens, progress=False, tp=())
    plain, gptq = _tensors(root / "plain"), _tensors(tmp_path / "gptq")
    experts = _expert_keys(plain)
    assert len(experts) == 2 * 6 * 3
    listed = set(res.metadata["plain"])
    for k in experts:
        same = torch.equal(plain[k].view(torch.uint8), gptq[k].view(torch.uint8))
        assert same == (k in listed), k  # plain codes exactly when listed as plain
    assert len(listed) < len(experts)  # 1024 tokens x top-2 over 6 experts: most calibrated
    held_out = _ids(4, 128, seed=77, vocab=320)
    with torch.no_grad():
        ref = model(held_out).logits
        err = {(n, mode): float((finefp8.load(d, mode=mode)(held_out).logits - ref).pow(2).mean())
               for n, d in (("plain", root / "plain"), ("gptq", tmp_path / "gptq"))
               for mode in ("w8a8", "weight_only")}
    for mode in ("w8a8", "weight_only"):
        assert err["gptq", mode] < err["plain", mode], err


def test_moe_experts_below_threshold_fall_back_and_are_listed(moe_dir, tmp_path):
    _, root = moe_dir
    tokens = CalibrationTokens(_ids(2, 64, seed=3, vocab=320), "random ids", "ef" * 32)
    res = quantize_calibrated(root / "in", tmp_path / "gptq", tokens, progress=False,
                              min_expert_tokens=10 ** 6, tp=())
    plain, gptq = _tensors(root / "plain"), _tensors(tmp_path / "gptq")
    experts = _expert_keys(plain)
    assert sorted(res.metadata["plain"]) == sorted(experts)
    meta = json.loads((tmp_path / "gptq" / "config.json").read_text())["finefp8_calibration"]
    assert sorted(meta["plain"]) == sorted(experts)
    assert "routed" in meta["plain_reasons"][experts[0]]
    for k in experts:
        assert torch.equal(plain[k].view(torch.uint8), gptq[k].view(torch.uint8))
    attn = [k for k in _tensors(root / "plain") if "self_attn.q_proj.weight" in k]
    assert not torch.equal(plain[attn[0]].view(torch.uint8), gptq[attn[0]].view(torch.uint8))


# ----------------------------------------------------------------------------- CLI


def test_cli_quantize_calibrate_records_text_and_hash(tmp_path, helpers, capsys):
    import hashlib

    from finefp8.cli import main

    model = tiny_llama(tie=False, **DIMS)
    model.save_pretrained(tmp_path / "in")
    helpers.write_tokenizer(tmp_path / "in")
    text = " ".join(f"word{i % 97} and the quick brown fox {i}" for i in range(400))
    (tmp_path / "calib.txt").write_text(text, encoding="utf-8")
    rc = main(["quantize", str(tmp_path / "in"), str(tmp_path / "out"), "--calibrate", "gptq",
               "--text", str(tmp_path / "calib.txt"), "--calib-tokens", "300",
               "--calib-target", "float-weights", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "out" / "config.json").read_text())["finefp8_calibration"]
    assert meta["target"] == "float-weights"
    assert meta["text"] == str(tmp_path / "calib.txt")
    assert meta["text_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert meta["tokens"] == 300 and meta["method"] == "gptq"
    assert (tmp_path / "out" / "README.md").is_file()  # the model card, as plain quantize
    # too short a text: a clear error, exit status 1, nothing left behind
    rc = main(["quantize", str(tmp_path / "in"), str(tmp_path / "out2"), "--calibrate", "gptq",
               "--text", str(tmp_path / "calib.txt"), "--calib-tokens", "100000", "--quiet"])
    assert rc == 1
    assert "fewer than --calib-tokens 100000" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()
    # the default token count takes what a short text has (a given count is a requirement)
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(tmp_path / "in")(text, add_special_tokens=False)
            ["input_ids"])
    assert n < 65536
    rc = main(["quantize", str(tmp_path / "in"), str(tmp_path / "out4"), "--calibrate", "gptq",
               "--text", str(tmp_path / "calib.txt"), "--kv-hessian", "input"])
    assert rc == 0
    assert f"has {n} usable tokens" in capsys.readouterr().err
    meta = json.loads((tmp_path / "out4" / "config.json").read_text())["finefp8_calibration"]
    assert meta["tokens"] == n // min(1024, n) * min(1024, n) and meta["kv_hessian"] == "input"
    # other bad options: each named, exit status 1, no output folder
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 8)
    for extra, said in ((["--text", str(tmp_path / "nope.txt")], "no such file"),
                        (["--text", str(tmp_path / "empty.txt")], "is empty"),
                        (["--text", str(tmp_path / "binary.txt")], "not UTF-8"),
                        (["--calib-tokens", "1"], "--calib-tokens (1)"),
                        (["--min-expert-tokens", "0"], "--min-expert-tokens must be >= 1")):
        rc = main(["quantize", str(tmp_path / "in"), str(tmp_path / "out3"), "--calibrate",
                   "gptq", "--quiet", *extra])
        assert rc == 1, extra
        assert said in capsys.readouterr().err, extra
        assert not (tmp_path / "out3").exists(), extra


def test_hessian_from_w8a8_inputs(llama_runs, tmp_path):
    """``act_quant_inputs``: layer 0's q/k/v codes are GPTQ with the Hessian of the 1x128
    fake-quantized normalized embeddings (computed here from the float model's own modules),
    not those of the float inputs."""
    from finefp8.quantization import dequantize_groupwise, quantize_groupwise

    model, root, tokens, _ = llama_runs
    res = quantize_calibrated(root / "in", tmp_path / "aq", tokens, progress=False,
                              act_quant_inputs=True, kv_hessian="input")
    assert res.metadata["hessian_inputs"] == "w8a8"
    total = torch.zeros(256, 256, dtype=torch.float64)
    with torch.no_grad():
        for w in tokens.ids:
            x = model.model.layers[0].input_layernorm(model.model.embed_tokens(w[None]))
            q, s = quantize_groupwise(x, 128)
            x2 = dequantize_groupwise(q, s, 128, torch.float32).reshape(-1, 256)
            total += (x2.T @ x2).double()
    h = (2.0 * total / tokens.ids.numel()).float()
    fac = calibration.gptq_factor(h, act_order=True)
    got, float_run = _tensors(tmp_path / "aq"), _tensors(root / "gptq")
    for part in ("q_proj", "k_proj", "v_proj"):
        key = f"model.layers.0.self_attn.{part}.weight"
        w = model.get_submodule(key[:-len(".weight")]).weight.detach().float()
        q, _ = calibration.gptq_quantize(w, None, None, factor=fac)
        assert torch.equal(got[key].view(torch.uint8), q.view(torch.uint8)), key
        assert not torch.equal(got[key].view(torch.uint8), float_run[key].view(torch.uint8))


_KILLED_CHILD = r"""
import os, signal, sys, torch
from finefp8.nn.calibrate import CalibrationTokens, quantize_calibrated
torch.set_num_threads(int(sys.argv[3]))  # the parent's: BLAS may split sums by thread count
ids = torch.randint(3, 300, (8, 128), generator=torch.Generator().manual_seed(5))
def die(i, n):
    if i == 0:
        os.kill(os.getpid(), signal.SIGKILL)
quantize_calibrated(sys.argv[1], sys.argv[2], CalibrationTokens(ids, "random ids", "ab" * 32),
                    progress=False, on_layer=die)
"""


def test_sigkilled_calibration_resumes(llama_runs, tmp_path):
    """SIGKILL after layer 0 (a child process): the lock dies with it, the rerun resumes at
    layer 1 and the checkpoint is byte-identical to an uninterrupted run's."""
    _, root, tokens, _ = llama_runs
    assert torch.equal(tokens.ids, _ids(8, 128, seed=5))
    r = subprocess.run([sys.executable, "-c", _KILLED_CHILD, str(root / "in"),
                        str(tmp_path / "out"), str(torch.get_num_threads())],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == -9, r.stderr
    assert (tmp_path / "out" / WORK_DIR).is_dir()
    seen = []
    quantize_calibrated(root / "in", tmp_path / "out", tokens, progress=False,
                        on_layer=lambda i, n: seen.append(i))
    assert seen == [1]
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "out" / f).read_bytes() == (root / "gptq" / f).read_bytes()


def test_moe_serving_keep_set_is_the_plain_one(moe_dir, tmp_path):
    """Default ``tp=(1,)``: the 96-wide experts vLLM cannot serve in FP8 stay float in both the
    plain and the calibrated output, byte for byte; what is FP8 is calibrated."""
    _, root = moe_dir
    tokens = CalibrationTokens(_ids(2, 128, seed=3, vocab=320), "random ids", "ef" * 32)
    quantize_checkpoint(root / "in", tmp_path / "plain", progress=False)
    quantize_calibrated(root / "in", tmp_path / "gptq", tokens, progress=False)
    plain, gptq = _tensors(tmp_path / "plain"), _tensors(tmp_path / "gptq")
    assert {k: (v.dtype, v.shape) for k, v in plain.items()} == \
        {k: (v.dtype, v.shape) for k, v in gptq.items()}
    kept = [k for k in plain if ".experts." in k]
    assert kept and all(plain[k].dtype == torch.float32 and torch.equal(plain[k], gptq[k])
                        for k in kept)
    fp8 = [k for k, v in plain.items() if v.dtype == torch.float8_e4m3fn]
    assert fp8 and all(not torch.equal(plain[k].view(torch.uint8), gptq[k].view(torch.uint8))
                       for k in fp8)


# ----------------------------------------------------------------------------- float target


GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _group_inputs(model, module: str, ids: torch.Tensor, pre_hooks=()) -> list[torch.Tensor]:
    """Per window, the input ``[T, N]`` of ``module`` in a whole-model forward."""
    got = []
    mod = model.get_submodule(module)
    handles = [h(mod) for h in pre_hooks]
    handles.append(mod.register_forward_pre_hook(
        lambda _m, a: got.append(a[0].detach().reshape(-1, a[0].shape[-1]).float())))
    with torch.no_grad():
        for w in ids:
            model(w[None])
    for h in handles:
        h.remove()
    return got


def _whole_model_float_target_codes(model, ids: torch.Tensor, act_quant: bool) -> dict:
    """Independent whole-model form of ``target="float-weights"``: the float model and a copy
    quantized side by side; for each layer and each hand-listed group of Linear layers (q/k/v,
    o, gate/up, down) the group's inputs in both models (whole-model forwards; the copy's
    Linear inputs 1x128 fake-quantized when ``act_quant``), ``W*`` and GPTQ of it."""
    import copy

    from finefp8.quantization import dequantize_groupwise, quantize_groupwise

    def fq(x):
        q, s = quantize_groupwise(x, 128)
        return dequantize_groupwise(q, s, 128, x.dtype)

    qmodel = copy.deepcopy(model)
    hooks = []
    if act_quant:
        for n, m in qmodel.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in n:
                hooks.append(m.register_forward_pre_hook(lambda _m, a: (fq(a[0]), *a[1:])))
    out = {}
    for i in range(len(model.model.layers)):
        for group in GROUPS:
            names = [f"model.layers.{i}.{g}" for g in group]
            xf = _group_inputs(model, names[0], ids)
            xq = _group_inputs(qmodel, names[0], ids)
            n = xf[0].shape[1]
            h, c, count = torch.zeros(n, n, dtype=torch.float64), \
                torch.zeros(n, n, dtype=torch.float64), 0
            for a, b in zip(xf, xq, strict=True):
                h += b.double().T @ b.double()
                c += (a.double() - b.double()).T @ b.double()
                count += b.shape[0]
            h, c = h / count, c / count
            fac = calibration.gptq_factor((2.0 * h).float(), act_order=True)
            for name in names:
                mod = qmodel.get_submodule(name)
                w = calibration.float_target_weight(mod.weight.detach().float(), h, c)
                q, s = calibration.gptq_quantize(w, None, None, factor=fac)
                out[name + ".weight"] = (q, s)
                with torch.no_grad():
                    mod.weight.copy_(ops.dequantize_blockwise(q, s, (128, 128), torch.float32))
    for h in hooks:
        h.remove()
    return out


@pytest.fixture(scope="module")
def float_target_run(llama_runs, tmp_path_factory):
    _, root, tokens, _ = llama_runs
    out = tmp_path_factory.mktemp("ft") / "ft"
    res = quantize_calibrated(root / "in", out, tokens, progress=False, target="float-weights",
                              act_quant_inputs=True)
    return out, res


def test_float_target_equals_whole_model_form(llama_runs, float_target_run):
    model, _, tokens, _ = llama_runs
    out, res = float_target_run
    assert res.metadata["target"] == "float-weights" and res.metadata["hessian_inputs"] == "w8a8"
    expected = _whole_model_float_target_codes(model, tokens.ids, act_quant=True)
    got = _tensors(out)
    assert len(expected) == 14
    for k, (q, s) in expected.items():
        assert torch.equal(got[k.replace("weight", "weight_scale_inv")], s), k
        assert torch.equal(got[k].view(torch.uint8), q.view(torch.uint8)), k


def _logit_errors(model, ids: torch.Tensor, folders: dict[str, Path]) -> dict[str, float]:
    """Mean squared logit error of each checkpoint (``finefp8.load``, W8A8) against the float
    model on ``ids``."""
    import finefp8

    with torch.no_grad():
        ref = model(ids).logits
        return {n: float((finefp8.load(d)(ids).logits - ref).pow(2).mean())
                for n, d in folders.items()}


def test_float_weights_lowers_the_calibration_error_and_loads(llama_runs, float_target_run):
    """On the calibration ids themselves (what the least-squares correction fits) the float-
    weights checkpoint is closer to the float model than the "layer" one; it loads in
    transformers with the same dequantized weights as in finefp8. (On held-out text it is
    not better: docs/eval.md measures it worse on SmolLM2, the correction overfits.)"""
    model, root, tokens, _ = llama_runs
    out, _ = float_target_run
    err = _logit_errors(model, tokens.ids[:4], {"layer": root / "gptq", "float": out})
    assert err["float"] < err["layer"], err
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out)
    t = _tensors(out)
    key = "model.layers.1.self_attn.o_proj.weight"
    w = theirs.get_submodule(key[:-len(".weight")]).weight
    assert torch.equal(w, ops.dequantize_blockwise(t[key], t[key + "_scale_inv"], (128, 128),
                                                   w.dtype))


def test_float_scales_keeps_the_codes_and_tunes_the_scales(llama_runs, tmp_path):
    """``float-scales``: layer 0's FP8 codes are exactly the "layer" run's (layer 1's inputs,
    and so its codes, then differ), every block scale moved a little away from amax/448, and
    the result is closer to the float model on the calibration ids."""
    model, root, tokens, _ = llama_runs
    res = quantize_calibrated(root / "in", tmp_path / "fs", tokens, progress=False,
                              target="float-scales")
    assert res.metadata["target"] == "float-scales"
    layer, tuned = _tensors(root / "gptq"), _tensors(tmp_path / "fs")
    moved = 0
    for k, v in layer.items():
        if v.dtype == torch.float8_e4m3fn:
            if ".layers.0." in k:
                assert torch.equal(v.view(torch.uint8), tuned[k].view(torch.uint8)), k
            s0, s1 = layer[k + "_scale_inv"], tuned[k + "_scale_inv"]
            assert torch.isfinite(s1).all() and (s1 > 0).all()
            if ".layers.0." in k:  # a correction of the amax/448 scale, not a new one
                assert ((s1 / s0 - 1).abs() < 0.2).all(), k
            moved += int(not torch.equal(s0, s1))
    assert moved == 14
    err = {n: _layer0_error(model, d, tokens.ids) for n, d in
           (("plain", root / "plain"), ("layer", root / "gptq"), ("scales", tmp_path / "fs"))}
    assert err["scales"] < err["layer"] < err["plain"], err


def _layer0_error(model, folder: Path, ids: torch.Tensor) -> float:
    """``sum ||y_q - y_f||^2 / sum ||y_f||^2`` of decoder layer 0's output over ``ids``: ``y_f``
    the float model's, ``y_q`` with layer 0's Linear weights dequantized from ``folder``."""
    import copy

    t = _tensors(folder)
    quant = copy.deepcopy(model)
    with torch.no_grad():
        for n, m in quant.model.layers[0].named_modules():
            k = f"model.layers.0.{n}.weight"
            if isinstance(m, torch.nn.Linear) and k + "_scale_inv" in t:
                m.weight.copy_(ops.dequantize_blockwise(t[k], t[k + "_scale_inv"], (128, 128),
                                                        torch.float32))
    outs = []
    for mdl in (model, quant):
        got: list[torch.Tensor] = []
        h = mdl.model.layers[0].register_forward_hook(
            lambda _m, _a, o, got=got: got.append((o[0] if isinstance(o, tuple) else o).detach()))
        with torch.no_grad():
            for w in ids:
                mdl(w[None])
        h.remove()
        outs.append(torch.cat(got))
    return float((outs[1] - outs[0]).pow(2).sum() / outs[0].pow(2).sum())


def test_float_target_resumes_after_a_stop(llama_runs, float_target_run, tmp_path):
    """Stopped after layer 0, the rerun resumes at layer 1 with both streams of hidden states
    and writes the same bytes; a run with the other target is refused, not resumed."""
    _, root, tokens, _ = llama_runs
    out, _ = float_target_run
    seen: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        quantize_calibrated(root / "in", tmp_path / "out", tokens, progress=False,
                            target="float-weights", act_quant_inputs=True,
                            on_layer=_stop_after_layer0(seen))
    with pytest.raises(Exception, match="other options"):
        quantize_calibrated(root / "in", tmp_path / "out", tokens, progress=False,
                            act_quant_inputs=True)
    quantize_calibrated(root / "in", tmp_path / "out", tokens, progress=False,
                        target="float-weights", act_quant_inputs=True,
                        on_layer=lambda i, n: seen.append(i))
    assert seen == [0, 1]
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "out" / f).read_bytes() == (out / f).read_bytes()
    with pytest.raises(Exception, match="unknown calibration target"):
        quantize_calibrated(root / "in", tmp_path / "x", tokens, progress=False, target="model")


class _OneLinear(torch.nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(w)

    def forward(self, x):
        return self.proj(x)


def test_tune_block_scales_lowers_the_error_and_keeps_amax_scales_when_it_diverges():
    """On one Linear: tuning the block scales of its plain codes lowers the output error against
    the float output (a float64 reference); an absurd learning rate that sends the scales to
    inf / NaN leaves the amax/448 scales in place, never non-finite ones."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 384, generator=g) * torch.linspace(0.1, 2.0, 384)
    x = [torch.randn(1, 64, 384, generator=g) for _ in range(2)]
    wanted = [(xi.double() @ w.double().T).float() for xi in x]
    q, s = ops.quantize_blockwise(w, (128, 128), "fp32")

    def err(scale):
        deq = ops.dequantize_blockwise(q, scale, (128, 128), torch.float64)
        return sum(float((xi.double() @ deq.T - y.double()).pow(2).sum())
                   for xi, y in zip(x, wanted, strict=True))

    for lr, better in ((2e-3, True), (1e30, False)):
        layer = _OneLinear(ops.dequantize_blockwise(q, s, (128, 128), torch.float32))
        codes = {"layer.proj.weight": (q, s.clone())}
        cal._tune_block_scales(layer, "layer", {"layer.proj": "layer.proj.weight"}, codes, x,
                               wanted, [{}, {}], steps=30, lr=lr)
        tuned = codes["layer.proj.weight"][1]
        assert torch.isfinite(tuned).all() and (tuned > 0).all()
        if better:
            assert not torch.equal(tuned, s) and err(tuned) < err(s)
        else:
            assert torch.equal(tuned, s)
        # the module now holds the dequantized codes with the kept scales
        assert torch.equal(layer.proj.weight,
                           ops.dequantize_blockwise(q, tuned, (128, 128), torch.float32))


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("target", ["float-weights", "float-scales"])
def test_float_targets_on_moe_models(family, target, tmp_path):
    """Both float targets on MoE families: the routed experts are GPTQ-calibrated (codes
    differ from plain rounding) and every FP8 weight has finite positive scales.
    ``float-weights``: the checkpoint's W8A8 logits are closer to the float model's than the
    plain checkpoint's on the calibration ids. ``float-scales``: layer 0's output is closer to
    the float layer's than with the "layer" target's amax/448 scales (what it tunes)."""
    import moe_models

    model = getattr(moe_models, family)()
    model.save_pretrained(tmp_path / "in")
    vocab = model.config.vocab_size
    tokens = CalibrationTokens(_ids(4, 128, seed=3, vocab=vocab), "random ids", "ef" * 32)
    quantize_checkpoint(tmp_path / "in", tmp_path / "plain", progress=False, tp=())
    res = quantize_calibrated(tmp_path / "in", tmp_path / "cal", tokens, progress=False, tp=(),
                              target=target, act_quant_inputs=target == "float-weights")
    assert res.metadata["target"] == target
    plain, got = _tensors(tmp_path / "plain"), _tensors(tmp_path / "cal")
    experts = [k for k in _expert_keys(plain) if k not in set(res.metadata["plain"])]
    assert experts and all(not torch.equal(plain[k].view(torch.uint8), got[k].view(torch.uint8))
                           for k in experts)
    for k, v in got.items():
        if k.endswith("_scale_inv"):
            assert torch.isfinite(v).all() and (v > 0).all(), k
    if target == "float-weights":
        err = _logit_errors(model, tokens.ids[:2], {"plain": tmp_path / "plain",
                                                    "cal": tmp_path / "cal"})
        assert err["cal"] < err["plain"], err
    else:
        quantize_calibrated(tmp_path / "in", tmp_path / "layer", tokens, progress=False, tp=())
        err = {n: _layer0_error(model, tmp_path / n, tokens.ids) for n in ("layer", "cal")}
        assert err["cal"] < err["layer"], err


# ------------------------------------------------------------- attention-weighted k/v Hessians


def test_kv_attention_modules_by_family():
    """Llama and Mixtral attention (separate q/k/v, no q/k norm) get attention-weighted k/v
    Hessians; Qwen3-MoE (q_norm / k_norm) and DeepSeek-V3 (MLA: no k_proj / v_proj) keep
    their input Hessians."""
    import moe_models

    llama = tiny_llama(tie=False, **DIMS)
    found = cal.kv_attention_modules(llama.model.layers[0], "model.layers.0",
                                     {f"model.layers.0.self_attn.{p}": "k" for p in
                                      ("q_proj", "k_proj", "v_proj")})
    assert list(found) == ["model.layers.0.self_attn"]
    assert cal.kv_attention_modules(llama.model.layers[0], "model.layers.0",
                                    {"model.layers.0.self_attn.k_proj": "k"}) == {}
    for family, expected in (("mixtral", 1), ("qwen3_moe", 0), ("deepseek_v3", 0)):
        m = getattr(moe_models, family)()
        lin = {f"model.layers.0.{n}": "k" for n, x in m.model.layers[0].named_modules()
               if isinstance(x, torch.nn.Linear)}
        assert len(cal.kv_attention_modules(m.model.layers[0], "model.layers.0", lin)) == \
            expected, family


def test_attention_kv_hessians_match_an_independent_whole_model_form(tmp_path):
    """GQA Llama (4 query heads, 2 key/value heads): layer 0's k_proj / v_proj codes are GPTQ
    with one Hessian per key/value head from ``attention_hessian_sums`` of the float model's
    own eager attention (probabilities, queries, values of the embedded, normalized ids), bit
    for bit; q_proj keeps its input Hessian (the same codes as ``kv_hessian="input"``); the
    choice is recorded. (Whether the weighting lowers the error on new text is a property of
    trained models, whose attention returns to the same tokens; random weights attend at
    random. It is measured on SmolLM2 in docs/eval.md.)"""
    model = tiny_llama(tie=False, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2, num_hidden_layers=2)
    model.save_pretrained(tmp_path / "in")
    tokens = CalibrationTokens(_ids(4, 128, seed=8), "random ids", "cd" * 32)
    runs = {}
    for kv in ("attention", "input"):
        res = quantize_calibrated(tmp_path / "in", tmp_path / kv, tokens, progress=False,
                                  kv_hessian=kv)
        assert res.metadata["kv_hessian"] == kv
        cfg = json.loads((tmp_path / kv / "config.json").read_text())["finefp8_calibration"]
        assert cfg["kv_hessian"] == kv
        assert cfg["kv_attention_modules"] == (2 if kv == "attention" else 0)
        runs[kv] = _tensors(tmp_path / kv)
    attn = model.model.layers[0].self_attn
    d, n = attn.head_dim, 256
    sk = sv = None
    count = 0
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            seen: dict[str, torch.Tensor] = {}
            h = attn.register_forward_hook(lambda _m, a, o: seen.update(p=o[1][0]))
            hi = attn.register_forward_pre_hook(
                lambda _m, a, kw: seen.update(x=kw["hidden_states"][0]), with_kwargs=True)
            for w in tokens.ids:
                model(w[None])
                x = seen["x"]
                q = attn.q_proj(x).view(-1, 4, d)
                v = attn.v_proj(x).view(-1, 2, d)
                a, b = calibration.attention_hessian_sums(x, seen["p"], q, v)
                sk, sv = (a, b) if sk is None else (sk + a, sv + b)
                count += x.shape[0]
            h.remove()
            hi.remove()
    finally:
        model.config._attn_implementation = "sdpa"
    for part, sums in (("k_proj", sk), ("v_proj", sv)):
        key = f"model.layers.0.self_attn.{part}.weight"
        rows = [(g * d, (g + 1) * d, calibration.gptq_factor((2.0 * sums[g] / count).float(),
                                                             act_order=True)) for g in range(2)]
        want, _ = calibration.gptq_quantize_rows(attn.get_parameter(f"{part}.weight").float(),
                                                 rows)
        assert torch.equal(runs["attention"][key].view(torch.uint8), want.view(torch.uint8))
        assert not torch.equal(runs["input"][key].view(torch.uint8), want.view(torch.uint8))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(runs["attention"][key].view(torch.uint8), runs["input"][key].view(torch.uint8))
    assert sk.shape == (2, n, n)


def test_attention_kv_hessians_on_mixtral(tmp_path):
    """Mixtral (MoE, Llama-style attention): the default calibration gives every layer's k/v
    the attention-weighted Hessians (counted in config.json), so their codes differ from
    ``kv_hessian="input"``'s while q_proj's stay the same, and the routed experts are still
    calibrated."""
    import moe_models

    model = moe_models.mixtral()
    model.save_pretrained(tmp_path / "in")
    tokens = CalibrationTokens(_ids(2, 128, seed=4, vocab=model.config.vocab_size),
                               "random ids", "ab" * 32)
    got = {}
    for kv in ("attention", "input"):
        res = quantize_calibrated(tmp_path / "in", tmp_path / kv, tokens, progress=False, tp=(),
                                  kv_hessian=kv)
        assert res.metadata["kv_attention_modules"] == (
            model.config.num_hidden_layers if kv == "attention" else 0)
        assert res.metadata["plain"] == []
        got[kv] = _tensors(tmp_path / kv)
    for i in range(model.config.num_hidden_layers):
        for part, same in (("q_proj", i == 0), ("k_proj", False), ("v_proj", False)):
            k = f"model.layers.{i}.self_attn.{part}.weight"
            assert got["input"][k].dtype == torch.float8_e4m3fn, k
            assert torch.equal(got["attention"][k].view(torch.uint8),
                               got["input"][k].view(torch.uint8)) == same, k
