"""Unlimiformer: retrieval cross-attention equals the plain model where it must, and reads long inputs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import transformers

from memlm.summarize.unlimiformer import Unlimiformer, UnlimiformerConfig, encoder_windows

from conftest import document


@pytest.mark.parametrize("name", ["tiny_bart", "tiny_t5"])
def test_retrieving_every_state_equals_the_plain_model(name, request):
    """top_k >= the encoder states and an input that fits one window: logits and greedy output are the plain model's."""
    model = request.getfixturevalue(name)
    ids, decoder_ids = document(40, seed=1), document(6, seed=2)
    plain = model(input_ids=ids, decoder_input_ids=decoder_ids).logits
    unlimiformer = Unlimiformer(model, UnlimiformerConfig(top_k=64, window=64))
    torch.testing.assert_close(unlimiformer.logits(ids, decoder_ids), plain, atol=1e-5, rtol=1e-5)
    prefix = torch.tensor([[model.generation_config.decoder_start_token_id]])
    for _ in range(8):  # greedy decoding by full recomputation with the plain model
        prefix = torch.cat([prefix, model(input_ids=ids, decoder_input_ids=prefix).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(unlimiformer.generate(ids, max_new_tokens=8, eos_token_id=[]), prefix[:, 1:])
    assert model.config._attn_implementation == "sdpa"  # switched only inside the calls


def test_layers_below_layer_begin_attend_to_the_first_window(tiny_bart):
    ids, decoder_ids = document(40, seed=1), document(6, seed=2)
    plain = tiny_bart(input_ids=ids, decoder_input_ids=decoder_ids).logits
    # layer 0 attends to the (whole) first window, layer 1 retrieves only 4 states: close to, not equal to plain
    partial = Unlimiformer(tiny_bart, UnlimiformerConfig(top_k=4, layer_begin=1, window=64)).logits(ids, decoder_ids)
    assert not torch.allclose(partial, plain, atol=1e-4)
    full = Unlimiformer(tiny_bart, UnlimiformerConfig(top_k=40, layer_begin=1, window=64)).logits(ids, decoder_ids)
    torch.testing.assert_close(full, plain, atol=1e-5, rtol=1e-5)


def test_windows_tile_the_input_and_keep_their_middles():
    for length, window in ((10, 16), (100, 16), (64, 16), (17, 16), (1000, 256)):
        spans = encoder_windows(length, window)
        kept = [i for _, _, lo, hi in spans for i in range(lo, hi)]
        assert kept == list(range(length))
        for start, end, lo, hi in spans:
            assert 0 <= start <= lo < hi <= end <= length and end - start <= window
            if start > 0:
                assert lo - start == window // 4  # a quarter window of left context
            if end < length:
                assert end - hi == window // 4  # and of right context


MEASURE_PEAK = """
import sys, torch, transformers
from memlm.summarize.unlimiformer import Unlimiformer, UnlimiformerConfig

def peak_rss_kb():  # this process's own high-water mark (ru_maxrss would start at the parent's)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))

torch.manual_seed(0)
config = transformers.BartConfig(vocab_size=320, d_model=64, encoder_layers=2, decoder_layers=2,
    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
    max_position_embeddings=256)
unlimiformer = Unlimiformer(transformers.BartForConditionalGeneration(config).eval(), UnlimiformerConfig(top_k=16))
ids = torch.randint(0, 320, (1, int(sys.argv[1])), generator=torch.Generator().manual_seed(3))
before = peak_rss_kb()
new = unlimiformer.generate(ids, max_new_tokens=4, eos_token_id=[])
assert new.shape == (1, 4)
print((peak_rss_kb() - before) / 1024)
"""


def peak_mb(tokens: int) -> float:
    """How far (MB) generating over ``tokens`` input tokens raises the peak resident memory of a fresh process
    (imports, the model and its first allocations come before the baseline)."""
    # Large blocks mmapped and unmapped one by one: freed memory (imports, model building) is not reused by
    # the run, so the peak counts what the run holds at once.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, "-c", MEASURE_PEAK, str(tokens)], capture_output=True, text=True,
                            check=True, env=env)
    return float(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_20k_token_input_runs_with_bounded_memory():
    """20,480 tokens through tiny BART (256 positions): memory grows by the states, not by layers x keys/values.
    Measured in fresh processes: the peak resident memory a run of 20,480 input tokens adds, against 1,024."""
    grown_mb = peak_mb(20480) - peak_mb(1024)
    # keys + values of all states in the index: 2 x 20,480 x 64 floats = 10 MB; a full cross-attention cache
    # for 2 layers would add 2 x 2 x 20,480 x 64 floats, and full attention scores 20,480 per head and query.
    assert 5 < grown_mb < 200, grown_mb  # above 5: the measurement sees the index it must see


def test_bad_inputs_are_refused(tiny_bart, tiny_llama):
    with pytest.raises(ValueError, match="needs an encoder-decoder model"):
        Unlimiformer(tiny_llama)
    led = transformers.LEDForConditionalGeneration(transformers.LEDConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, attention_window=[8]))
    with pytest.raises(ValueError, match="does not route its attention through transformers' AttentionInterface"):
        Unlimiformer(led)  # it would silently attend to the first window only
    with pytest.raises(ValueError, match="layer_begin \\(2\\) must be below"):
        Unlimiformer(tiny_bart, UnlimiformerConfig(layer_begin=2))
    with pytest.raises(ValueError, match="exceeds the encoder's 256 positions"):
        Unlimiformer(tiny_bart, UnlimiformerConfig(window=512))
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        UnlimiformerConfig(top_k=0)
    unlimiformer = Unlimiformer(tiny_bart)
    with pytest.raises(ValueError, match="token ids must lie in"):
        unlimiformer.generate(torch.tensor([[1, 2, 999]]))
    with pytest.raises(ValueError, match="text input needs a tokenizer"):
        unlimiformer.generate("a long book")
