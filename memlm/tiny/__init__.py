"""memlm-tiny: the small memory model memlm ships, so that its main job runs with nothing downloaded.

A Llama of 0.4M parameters with a byte-level BPE tokenizer (numbers split into groups of at most
three digits, each group one token, as GPT-4's tokenizer does), a Transformer-XL cache and one kNN
memory layer, trained from scratch by ``examples/train_tiny.py`` (a short language-model warm-up on
plain text, then memlm's passkey task, last with the Focused Transformer's CrossBatch memory). Its
files live inside the package (``memlm/tiny/``): the model (``config.json``, ``model.safetensors``),
the tokenizer, memlm's config and gates (``save_pretrained``) and the training run's
``metrics.json``. ``load_default()`` reads them.

Its memory layer is what finds a pass key tens of thousands of tokens back: the local context
(XL cache + segment) is ``MEMORY["xl_length"] + MEMORY["segment_length"]`` = 128 tokens, the rest
of the document lives in the memory layer's kNN index.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import transformers

from memlm.config import MemoryConfig
from memlm.positions.scaling import extend_from_spec
from memlm.runtime.model import MemoryModel

#: The shipped model's directory inside the installed package.
DEFAULT_DIR = Path(__file__).parent
VOCAB_SIZE = 2048
#: Digits of the pass keys memlm-tiny was trained to find: one token (see the README for longer keys).
PASSKEY_DIGITS = 3
#: LlamaConfig fields of memlm-tiny (vocab_size comes from the tokenizer).
LLAMA = {
    "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 4, "max_position_embeddings": 512, "tie_word_embeddings": True,
}
#: Its MemoryConfig: a local context of 128 tokens, memory at the first layer, one softmax over local
#: and retrieved keys (the Focused Transformer's), a million memory entries per sequence.
MEMORY = {
    "segment_length": 64, "xl_length": 64, "memory_layers": [0], "fusion": "joint", "top_k": 32,
    "memory_capacity": 1 << 20,
}


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``; numbers are cut into groups of up to three digits
    before BPE (the texts should hold every such group often enough to become one token)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\d{1,3}"), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")


def new_model(tokenizer, seed: int = 0) -> transformers.LlamaForCausalLM:
    """memlm-tiny's architecture with fresh random weights."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **LLAMA)
    return transformers.LlamaForCausalLM(config)


def memory_config(**overrides) -> MemoryConfig:
    """memlm-tiny's MemoryConfig, with any field changed (e.g. ``memory_layers=()`` for XL only)."""
    return MemoryConfig.from_dict({**MEMORY, **overrides})


def load_default(directory: str | Path | None = None, device: str | torch.device = "cpu", extend: dict | None = None,
                 **memory_overrides) -> tuple[MemoryModel, transformers.PreTrainedTokenizerFast]:
    """The embedded default model: ``(mem_model, tokenizer)``, read from the package (no download).

    ``memory_overrides`` change its MemoryConfig, e.g. ``memory_layers=()`` (XL cache only) or
    ``index="faiss"``; ``directory`` loads another model: a Hugging Face model directory with its tokenizer
    and memlm's files (``MemoryModel.save_pretrained``), as ``examples/train_tiny.py`` writes, or the output
    directory of ``memlm train`` (``model/`` and ``memlm/`` in it). ``extend``: a RoPE extension applied before
    memlm attaches (``{"method": "yarn", "factor": 8}``: ``memlm.extend_context``).
    """
    directory = DEFAULT_DIR if directory is None else Path(directory)
    memlm_dir = directory
    if (directory / "model").is_dir() and (directory / "memlm").is_dir():  # what `memlm train` writes
        directory, memlm_dir = directory / "model", directory / "memlm"
    if not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(f"{directory} holds no memlm-tiny model (model.safetensors); reinstall memlm or "
                                "rebuild it with examples/train_tiny.py")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa").to(device).eval()
    if extend:
        extend_from_spec(model, extend)
    mem_model = MemoryModel.from_pretrained(model, memlm_dir, tokenizer=tokenizer)
    if not memory_overrides:
        return mem_model, tokenizer
    trained, gates = mem_model.config, mem_model.memory_module.gates.detach().clone()
    config = MemoryConfig.from_dict({**trained.to_dict(), **memory_overrides})
    mem_model = MemoryModel(mem_model.detach(), config, tokenizer=tokenizer)
    if config.memory_layers == trained.memory_layers:  # the same memory layers keep their trained gates
        with torch.no_grad():
            mem_model.memory_module.gates.copy_(gates)
    return mem_model, tokenizer
