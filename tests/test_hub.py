"""Hub IDs wherever a model goes in (``finefp8.hub``), on a Hugging Face cache built by hand.

The cache has huggingface_hub's layout (``models--org--name/{blobs, refs, snapshots}``, the
snapshot files being relative symbolic links into ``blobs/``), in a temporary ``HF_HOME``. No
test touches the network: offline tests set ``HF_HUB_OFFLINE=1``; the download tests replace
``snapshot_download`` / ``hf_hub_download`` by fakes that serve a "remote" folder and record
what was asked for.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finefp8 import hub
from finefp8.cli import main

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

REPO = "tiny-org/tiny-llama"
FP8_REPO = "tiny-org/tiny-llama-fp8"
COMMIT_MAIN = "a" * 40
COMMIT_V1 = "b" * 40
WORDS = "the quick brown fox jumps over lazy dog and runs far away into a dark forest".split()
#: Files a cache or a remote may hold that finefp8 must never read or fetch.
FORBIDDEN = ("pytorch_model.bin", "model.gguf", "flax_model.msgpack", "tf_model.h5",
             "consolidated.pth", "model.onnx")


# ----------------------------------------------------------------------------- fixtures


def _tiny_model_folder(folder: Path, seed: int) -> Path:
    """A 2-layer Llama (hidden 192, intermediate 320) in 2 safetensors shards + a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32, hidden_size=192, intermediate_size=320,
                         num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                         max_position_embeddings=128, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="300KB")
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\ntags:\n- tiny\n"
                                      "---\n# Tiny Llama\n\nThe source card's own text.\n")
    assert (folder / hub.WEIGHT_INDEX).is_file(), "the fixture must be sharded"
    return folder


def add_to_cache(cache: Path, repo_id: str, folder: Path, commit: str,
                 refs: tuple[str, ...] = ("main",), extra: dict[str, bytes] | None = None
                 ) -> Path:
    """Put ``folder``'s files (and ``extra``) in ``cache`` as huggingface_hub stores them:
    content-addressed blobs, ``refs/<name>`` holding the commit, ``snapshots/<commit>/<file>``
    relative links to the blobs. Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    files = {p.relative_to(folder).as_posix(): p.read_bytes()
             for p in folder.rglob("*") if p.is_file()}
    files.update(extra or {})
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two versions of the tiny model (main and v1: other weights) and FP8 checkpoints of each."""
    from finefp8.checkpoint.convert import quantize_checkpoint

    root = tmp_path_factory.mktemp("hub_sources")
    main_dir = _tiny_model_folder(root / "main", seed=0)
    v1_dir = _tiny_model_folder(root / "v1", seed=1)
    fp8_main, fp8_v1 = root / "fp8-main", root / "fp8-v1"
    quantize_checkpoint(main_dir, fp8_main, progress=False, tp=())
    quantize_checkpoint(v1_dir, fp8_v1, progress=False, tp=())
    for d in (fp8_main, fp8_v1):
        for p in d.glob(".finefp8*"):
            p.unlink()
    return {"main": main_dir, "v1": v1_dir, "fp8-main": fp8_main, "fp8-v1": fp8_v1}


@pytest.fixture()
def hf_home(tmp_path, monkeypatch, sources):
    """A fresh ``HF_HOME`` whose cache holds both repositories at main and v1, with weights in
    other formats next to them; offline by default."""
    home = tmp_path / "hf_home"
    for var in ("HF_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = home / "hub"
    junk = {name: b"must never be read " + name.encode() for name in FORBIDDEN}
    add_to_cache(cache, REPO, sources["main"], COMMIT_MAIN, ("main",), junk)
    add_to_cache(cache, REPO, sources["v1"], COMMIT_V1, ("v1",), junk)
    add_to_cache(cache, FP8_REPO, sources["fp8-main"], COMMIT_MAIN, ("main",), junk)
    add_to_cache(cache, FP8_REPO, sources["fp8-v1"], COMMIT_V1, ("v1",), junk)
    monkeypatch.chdir(tmp_path)
    return cache


@pytest.fixture()
def opened(monkeypatch):
    """Every path Python opens while the test runs (an audit hook: builtins.open, io.open and
    os.open all raise the ``open`` event), so a test can assert what was never read."""
    paths: list[str] = []
    state = {"on": True}

    def hook(event, args):
        if state["on"] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            paths.append(os.fsdecode(args[0]))

    _HOOKS.append(hook)
    yield paths
    state["on"] = False
    _HOOKS.remove(hook)


_HOOKS: list = []


def _dispatch(event, args):
    for h in list(_HOOKS):
        h(event, args)


sys.addaudithook(_dispatch)


def _forbidden_opens(paths: list[str]) -> list[str]:
    return [p for p in paths if Path(p).name in FORBIDDEN
            or any(Path(p).resolve().name == hashlib.sha256(b"must never be read "
                                                            + n.encode()).hexdigest()
                   for n in FORBIDDEN)]


def _first_weight(folder: Path) -> torch.Tensor:
    from finefp8.checkpoint import CheckpointReader

    with CheckpointReader(folder) as r:
        return r.get("model.layers.0.mlp.down_proj.weight").float()


# ----------------------------------------------------------------------------- resolution rules


def test_hub_id_form():
    assert hub.is_hub_id("org/name") and hub.is_hub_id("HuggingFaceTB/SmolLM2-135M")
    for bad in ("name", "/abs/path", "./org/name", "a/b/c", "org/name/", "org--x/name",
                "org/..", "../name", "org/name.safetensors/x"):
        assert not hub.is_hub_id(bad), bad


def test_cache_main_and_revision_offline(hf_home):
    r = hub.resolve_model(REPO, purpose="eval")
    assert r.origin == "cache" and r.commit == COMMIT_MAIN
    assert r.path == hf_home / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT_MAIN
    r1 = hub.resolve_model(REPO, "v1", purpose="eval")
    assert r1.commit == COMMIT_V1 and r1.path.name == COMMIT_V1
    r2 = hub.resolve_model(REPO, COMMIT_V1, purpose="quantize")  # a commit hash as revision
    assert r2.path == r1.path
    assert "tiny-org/tiny-llama@v1" in r1.describe() and COMMIT_V1[:12] in r1.describe()


def test_existing_path_wins_over_hub_id(hf_home, tmp_path, sources):
    local = tmp_path / REPO  # the cwd is tmp_path, so "tiny-org/tiny-llama" names this folder
    shutil.copytree(sources["v1"], local)
    r = hub.resolve_model(REPO)
    assert r.origin == "local" and r.path == Path(REPO) and not r.is_hub
    with pytest.raises(ValueError, match="applies to Hub IDs.*local path"):
        hub.resolve_model(REPO, "v1")


def test_missing_id_offline_is_a_clear_error(hf_home):
    with pytest.raises(hub.ModelNotFoundError) as e:
        hub.resolve_model("nobody/nothing", "dev")
    msg = str(e.value)
    for needle in ("'nobody/nothing'", "revision 'dev'", "is not in the Hugging Face cache",
                   str(hf_home), "HF_HUB_OFFLINE=1"):
        assert needle in msg, (needle, msg)
    with pytest.raises(hub.ModelNotFoundError, match=r"revision 'nope'.*HF_HUB_OFFLINE"):
        hub.resolve_model(REPO, "nope")
    with pytest.raises(hub.ModelNotFoundError, match="no such file or directory, and not a "):
        hub.resolve_model("no-such-folder")


def test_incomplete_snapshot_offline_says_partly(hf_home):
    shard = next((hf_home / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT_MAIN)
                 .glob("model-00001-*.safetensors"))
    shard.unlink()
    with pytest.raises(hub.ModelNotFoundError, match="only partly in.*HF_HUB_OFFLINE"):
        hub.resolve_model(REPO, purpose="inspect")


def test_cli_missing_id_offline(hf_home, capsys):
    for argv in (["quantize", "nobody/nothing", "out"], ["dequantize", "nobody/nothing", "out"],
                 ["inspect", "nobody/nothing"], ["generate", "nobody/nothing", "--prompt", "x"],
                 ["eval", "nobody/nothing", "--no-report", "--quiet"]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert f"finefp8 {argv[0]}: " in err and "'nobody/nothing'" in err and \
            "HF_HUB_OFFLINE" in err, err
    assert not Path("out").exists()


# ----------------------------------------------------------------------------- every command


@pytest.mark.parametrize("revision", [None, "v1"])
def test_quantize_and_dequantize_hub_id(hf_home, tmp_path, sources, opened, revision):
    rev = ["--revision", revision] if revision else []
    out = tmp_path / "q"
    assert main(["quantize", REPO, str(out), "--quiet", *rev]) == 0
    want = sources["v1" if revision else "main"]
    from finefp8.checkpoint import CheckpointReader, dequantized_weight

    def check_close_to_revision(deq: torch.Tensor) -> None:
        w = _first_weight(want)
        assert (deq - w).abs().max() <= w.abs().max() / 16  # E4M3: 3 mantissa bits
        other = _first_weight(sources["main" if revision else "v1"])
        assert (deq - w).abs().mean() < (deq - other).abs().mean() / 4

    with CheckpointReader(out) as r:
        check_close_to_revision(dequantized_weight(r, "model.layers.0.mlp.down_proj.weight",
                                                   torch.float32))
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    card = (out / "README.md").read_text()
    assert f"base_model: {REPO}" in card
    assert (COMMIT_V1 if revision else COMMIT_MAIN) in card
    assert "The source card's own text." in card
    back = tmp_path / "bf16"
    assert main(["dequantize", FP8_REPO, str(back), "--quiet", *rev]) == 0
    with CheckpointReader(back) as r:
        assert r.st_dtype("model.layers.0.mlp.down_proj.weight") == "BF16"
    check_close_to_revision(_first_weight(back))
    assert not _forbidden_opens(opened)


@pytest.mark.parametrize("revision", [None, "v1"])
def test_inspect_generate_load_hub_id(hf_home, capsys, opened, revision):
    import finefp8

    rev = ["--revision", revision] if revision else []
    # 0, or 3 when vLLM would refuse a TP degree for these odd sizes: the report is what counts
    assert main(["inspect", FP8_REPO, "--json", "--tp", "1", *rev]) in (0, 3)
    report = json.loads(capsys.readouterr().out)
    assert report["sound"] and report["counts"]["fp8_weights"] == 14
    assert main(["generate", FP8_REPO, "--prompt", "the quick brown", "--max-new-tokens", "3",
                 *rev]) == 0
    assert "tokens/s" in capsys.readouterr().err
    model = finefp8.load(FP8_REPO, revision=revision)
    from finefp8.nn import fp8_modules

    assert len(fp8_modules(model)) == 14
    ref = _first_weight(hf_home / "models--tiny-org--tiny-llama-fp8" / "snapshots"
                        / (COMMIT_V1 if revision else COMMIT_MAIN))
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert torch.equal(layer.weight.float(), ref)
    assert not _forbidden_opens(opened)


@pytest.mark.parametrize("revision", [None, "v1"])
def test_eval_hub_id(hf_home, tmp_path, capsys, opened, revision):
    text = tmp_path / "t.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (400,),
                                                             generator=g).tolist()))
    rev = ["--revision", revision] if revision else []
    assert main(["eval", REPO, "--text", str(text), "--tokens", "64", "--window", "32",
                 "--variants", "w8a8", "--layer-tokens", "8", "--no-report", "--quiet", "--json",
                 *rev]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"]["name"].startswith(REPO + ("@v1" if revision else ""))
    assert (COMMIT_V1 if revision else COMMIT_MAIN)[:12] in summary["model"]["name"]
    assert not _forbidden_opens(opened)


# ----------------------------------------------------------------------------- downloads


def _fake_remote(tmp_path: Path, folder: Path) -> Path:
    """The "remote" repository: ``folder`` plus other weight formats and a second safetensors
    copy that is not in the index."""
    remote = tmp_path / "remote"
    shutil.copytree(folder, remote)
    for name in FORBIDDEN:
        (remote / name).write_bytes(b"never fetch " + name.encode())
    (remote / "consolidated.safetensors").write_bytes(b"never fetch")
    (remote / "original").mkdir()
    (remote / "original" / "model.safetensors").write_bytes(b"never fetch")
    return remote


def _install_fakes(monkeypatch, remote: Path, commit: str = COMMIT_MAIN):
    """Replace huggingface_hub's downloads by fakes that copy matching files of ``remote`` into
    the cache with the real layout, recording the calls."""
    import huggingface_hub

    calls: list[dict] = []

    def put(cache_dir: str, repo_id: str, name: str, revision: str | None) -> Path:
        cache = Path(cache_dir)
        data = (remote / name).read_bytes()
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, link.parent))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return link

    def snapshot_download(repo_id, *, revision=None, cache_dir=None, allow_patterns=None, **kw):
        calls.append({"fn": "snapshot_download", "repo_id": repo_id, "revision": revision,
                      "allow_patterns": list(allow_patterns)})
        files = [p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()]
        for name in files:
            if any(fnmatch.fnmatch(name, pat) for pat in allow_patterns):
                put(cache_dir, repo_id, name, revision)
        return str(Path(cache_dir) / ("models--" + repo_id.replace("/", "--")) / "snapshots"
                   / commit)

    def hf_hub_download(repo_id, filename, *, revision=None, cache_dir=None, **kw):
        calls.append({"fn": "hf_hub_download", "repo_id": repo_id, "filename": filename,
                      "revision": revision, "thread": threading.current_thread().name})
        return str(put(cache_dir, repo_id, filename, revision))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return calls


def test_download_requests_only_needed_files(hf_home, tmp_path, monkeypatch, sources):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    shutil.rmtree(hf_home)
    calls = _install_fakes(monkeypatch, _fake_remote(tmp_path, sources["main"]))
    r = hub.resolve_model(REPO, purpose="quantize", progress=False)
    assert r.origin == "download" and r.commit == COMMIT_MAIN
    shards = sorted(json.loads((sources["main"] / hub.WEIGHT_INDEX).read_text())["weight_map"]
                    .values())
    shards = sorted(set(shards))
    asked = [c["allow_patterns"] for c in calls]
    assert asked[0] == sorted(set(hub.FILE_SETS["quantize"]) | {hub.WEIGHT_INDEX})
    assert asked[-1] == sorted(set(hub.FILE_SETS["quantize"]) | {hub.WEIGHT_INDEX} | set(shards))
    for pats in asked:
        for pat in pats:
            assert not any(fnmatch.fnmatch(pat, bad) for bad in hub.NEVER_FETCHED), pat
            assert "*" not in pat  # exact names, not globs
    assert calls[1]["revision"] == COMMIT_MAIN  # later calls pin the commit of the first
    got = sorted(p.name for p in r.path.iterdir())
    assert "consolidated.safetensors" not in got and "original" not in got
    assert not set(FORBIDDEN) & set(got)
    assert set(shards) <= set(got) and "README.md" in got and "tokenizer.json" in got
    # the cache is now complete: the next resolution makes no call at all
    n = len(calls)
    assert hub.resolve_model(REPO, purpose="quantize").origin == "cache" and len(calls) == n
    # inspect asks for no tokenizer / card files
    shutil.rmtree(hf_home)
    calls.clear()
    hub.resolve_model(REPO, purpose="inspect", progress=False)
    assert calls[0]["allow_patterns"] == ["config.json", hub.WEIGHT_INDEX]


def test_download_errors_name_id_revision_and_network(hf_home, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def refuse(repo_id, **kw):
        response = SimpleNamespace(headers={}, status_code=404, request=None)
        raise RepositoryNotFoundError("404 Client Error: Repository Not Found", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(hub.ModelNotFoundError) as e:
        hub.resolve_model("nobody/nothing", "dev", progress=False)
    msg = str(e.value)
    assert "'nobody/nothing' at revision 'dev'" in msg and "tried the network" in msg
    assert "no such repository" in msg and str(hf_home) in msg


def test_shard_stream_prefetches_one_ahead(hf_home, tmp_path, monkeypatch, sources):
    """Shard i+1 is being downloaded while the consumer still works on shard i, never two."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    shutil.rmtree(hf_home)
    remote = _fake_remote(tmp_path, sources["main"])
    _install_fakes(monkeypatch, remote)
    resolved = hub.resolve_model(REPO, purpose="quantize", progress=False, stream_weights=True)
    shards = hub._weight_files(resolved.path)
    assert len(shards) >= 2 and not any((resolved.path / s).exists() for s in shards)
    events: list[tuple[str, str]] = []
    lock = threading.Lock()
    in_flight = {"n": 0, "max": 0}

    def fetch(repo_id, filename, *, revision=None, cache_dir=None):
        with lock:
            in_flight["n"] += 1
            in_flight["max"] = max(in_flight["max"], in_flight["n"])
            events.append(("fetch-start", filename))
        time.sleep(0.05)
        import huggingface_hub

        path = huggingface_hub.hf_hub_download(repo_id, filename, revision=revision,
                                               cache_dir=cache_dir)
        with lock:
            in_flight["n"] -= 1
            events.append(("fetch-end", filename))
        return path

    stream = hub.ShardStream(resolved, shards, progress=False, fetch=fetch)
    for path in stream:
        with lock:
            events.append(("work-start", path.name))
        time.sleep(0.2)
        assert path.read_bytes() == (remote / path.name).read_bytes()
        with lock:
            events.append(("work-end", path.name))
    assert stream.fetched == shards and in_flight["max"] == 1
    for i in range(len(shards) - 1):  # the next fetch starts before the current work ends
        start_next = events.index(("fetch-start", shards[i + 1]))
        assert start_next < events.index(("work-end", shards[i]))
        assert start_next > events.index(("fetch-end", shards[i]))  # bounded: one ahead


# ----------------------------------------------------------------------------- cards from eval


def _eval_args(tmp_path: Path) -> list[str]:
    text = tmp_path / "t.txt"
    g = torch.Generator().manual_seed(1)
    text.write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (300,),
                                                             generator=g).tolist()))
    return ["--text", str(text), "--tokens", "48", "--window", "24", "--layer-tokens", "8",
            "--no-report", "--quiet"]


def test_eval_update_card_of_a_hub_quantization(hf_home, tmp_path, capsys, sources):
    from finefp8.checkpoint.card import split_front_matter

    out, out_tp = tmp_path / "q", tmp_path / "q-tp1"
    assert main(["quantize", REPO, str(out), "--quiet", "--revision", "v1", "--tp", "none"]) == 0
    # --tp 1 keeps the layers vLLM would compute wrong at these odd sizes in bf16
    assert main(["quantize", REPO, str(out_tp), "--quiet", "--revision", "v1"]) == 0
    ev = _eval_args(tmp_path)
    # another source than the card's: refused before anything runs
    assert main(["eval", REPO, "--update-card", str(out), *ev]) == 1
    assert "quantized from" in capsys.readouterr().err
    assert main(["eval", REPO, "--revision", "v1", "--update-card", str(out), "--variants",
                 "weight_only", *ev]) == 0
    card = (out / "README.md").read_text()
    assert "| **`w8a8` (this checkpoint)** |" in card  # added to the run: it is the checkpoint
    assert "| `weight_only` |" in card and "No evaluation yet" not in card
    assert f"reference `{REPO}@v1" in card
    meta, _, _ = split_front_matter(card)
    assert meta["base_model"] == REPO
    # a checkpoint with fewer FP8 layers than the variant: the row is its method, not it
    assert main(["eval", REPO, "--revision", "v1", "--update-card", str(out_tp), "--variants",
                 "w8a8", *ev]) == 0
    card = (out_tp / "README.md").read_text()
    assert "| **`w8a8` (this checkpoint's method)** |" in card
    assert "The `w8a8` row quantizes 14 Linear layers; this checkpoint has" in card
    # MODEL's own card: needs a local finefp8 checkpoint folder
    assert main(["eval", str(out), "--update-card", "--variants", "w8a8", *ev]) == 0
    card = (out / "README.md").read_text()
    assert "this checkpoint's own weights, dequantized" in card and "(this checkpoint)" not in card
    assert main(["eval", FP8_REPO, "--update-card", *ev]) == 1
    assert "must be a local checkpoint folder" in capsys.readouterr().err


def test_eval_save_variant_writes_a_card(hf_home, tmp_path):
    from finefp8.checkpoint.card import split_front_matter

    saved = tmp_path / "saved"
    assert main(["eval", REPO, "--save-variant", "w8a8", str(saved), "--variants", "w8a8",
                 *_eval_args(tmp_path)]) == 0
    meta, _, body = split_front_matter((saved / "README.md").read_text())
    assert meta["base_model"] == REPO and "fp8" in meta["tags"]
    assert "| **`w8a8` (this checkpoint)** |" in body and COMMIT_MAIN in body
    assert "The source card's own text." in body


def test_quantize_streams_a_hub_model_shard_by_shard(hf_home, tmp_path, monkeypatch, sources,
                                                     capsys):
    """Downloads allowed, empty cache: the small files come first (no shard), each shard is
    fetched alone with hf_hub_download, the next one while the current one converts; the
    output is byte for byte the quantization of the same folder on disk."""
    from finefp8.checkpoint import workers

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    shutil.rmtree(hf_home)
    remote = _fake_remote(tmp_path, sources["main"])
    calls = _install_fakes(monkeypatch, remote)
    headers: list[str] = []

    def header(repo_id, filename, revision):  # the range request of hub.remote_header
        headers.append(filename)
        raw = (remote / filename).read_bytes()
        return raw[: 8 + int.from_bytes(raw[:8], "little")]

    monkeypatch.setattr(hub, "remote_header", header)
    order: list[tuple[str, str]] = []
    real_convert = workers.convert_shard

    def convert_shard(src, dst, plan, opts, report=None):
        order.append(("convert", plan.name))
        names = sorted(p.name for p in Path(src).iterdir())
        assert not set(FORBIDDEN) & set(names) and "consolidated.safetensors" not in names
        return real_convert(src, dst, plan, opts, report)

    monkeypatch.setattr(workers, "convert_shard", convert_shard)
    streamed = tmp_path / "streamed"
    assert main(["quantize", REPO, str(streamed), "--quiet", "--tp", "none"]) == 0
    shards = sorted(set(json.loads((remote / hub.WEIGHT_INDEX).read_text())["weight_map"]
                        .values()))
    assert headers == shards  # planned from the headers alone
    snap_calls = [c for c in calls if c["fn"] == "snapshot_download"]
    assert not any(s in c["allow_patterns"] for c in snap_calls for s in shards)
    fetched = [c["filename"] for c in calls if c["fn"] == "hf_hub_download"]
    assert fetched == shards
    assert any(c["thread"].startswith("finefp8-prefetch") for c in calls
               if c["fn"] == "hf_hub_download")  # the next shard came in the background
    assert [n for _, n in order] == shards
    local = tmp_path / "local"
    assert main(["quantize", str(sources["main"]), str(local), "--quiet", "--tp", "none"]) == 0
    for p in sorted(local.iterdir()):
        if p.suffix == ".safetensors" or p.name in ("config.json", hub.WEIGHT_INDEX):
            assert (streamed / p.name).read_bytes() == p.read_bytes(), p.name
    # a rerun of the same commit, now cached, finds it complete (same input fingerprint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()
    assert main(["quantize", REPO, str(streamed), "--tp", "none"]) == 0
    assert "already complete" in capsys.readouterr().err
