"""Training recipes: a YAML file that names a model, its memory, a task and a TrainConfig.

    model:                 # a local Hugging Face model directory (with its tokenizer) ...
      path: ./my-model
    model:                 # ... or a fresh random Llama built from these LlamaConfig fields
      llama: {vocab_size: 320, hidden_size: 64, num_hidden_layers: 2, ...}
      tokenizer: ./tok      # optional; text tasks need one
    extend: {method: yarn, factor: 8}                 # optional: RoPE extension first (memlm.extend_context)
    attention: {name: s2, group_size_ratio: 0.25}     # optional: train with LongLoRA's S2-Attn (use_attention)
    # train: {sequence_parallel: 2} shards every document over 2 ranks with ring attention (memory: one forward per
    # document, i.e. segment_length >= document_tokens, xl_length 0, memory_layers []); data_parallel: fsdp for FSDP2
    memory: {segment_length: 16, xl_length: 16, memory_layers: [0], fusion: joint}   # MemoryConfig
    task: {name: associative_recall, pairs: 8, ...}   # or {name: passkey} or {name: text, path: book.txt}
    train: {steps: 1000, batch_size: 16, ...}         # TrainConfig
    evaluate: {documents: 128}                        # held-out evaluation after training (optional)

``memlm train --config examples/train_recall.yaml --output DIR`` runs it (under ``torchrun`` on every rank): DIR gets
the checkpoints, the trained model (``DIR/model``), memlm's weights (``DIR/memlm``) and
``DIR/metrics.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
import yaml

from memlm.config import MemoryConfig
from memlm.models import pretrained_folder
from memlm.positions.scaling import extend_from_spec
from memlm.runtime.implementations import use_attention
from memlm.runtime.model import attach

from .data import AssociativeRecall, Passkey, TextDocuments
from .lora import merge_lora
from .parallel import sequence_group
from .trainer import LORA, TrainConfig, Trainer

SECTIONS = ("model", "extend", "attention", "memory", "task", "train", "evaluate")
TASKS = ("associative_recall", "passkey", "text")


def load_recipe(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected a YAML training recipe")
    recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: expected a mapping with sections {SECTIONS}, got {type(recipe).__name__}")
    unknown = set(recipe) - set(SECTIONS)
    if unknown or "model" not in recipe or "task" not in recipe:
        raise ValueError(f"{path}: expected sections {SECTIONS} (model and task required), got {sorted(recipe)}")
    return recipe


def build_model(spec: dict, device: torch.device):
    """(model, tokenizer or None) from the recipe's model section."""
    if not isinstance(spec, dict) or sum(name in spec for name in ("path", "llama", "pretrained")) != 1:
        raise ValueError(f"model must give exactly one of 'path' (a local model directory), 'pretrained' (a model of "
                         f"memlm.models, e.g. smollm2-135m) or 'llama' (config fields of a fresh random Llama), got "
                         f"{spec!r}")
    if "pretrained" in spec:  # the converted folder in the cache (converted on first use)
        spec = dict(spec)
        spec["path"] = str(pretrained_folder(spec.pop("pretrained")))
    tokenizer_path = spec.get("tokenizer", spec.get("path"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path) if tokenizer_path else None
    if "path" in spec:
        model = transformers.AutoModelForCausalLM.from_pretrained(spec["path"], attn_implementation="sdpa")
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**spec["llama"]))
    return model.to(device), tokenizer


def build_task(spec: dict, model, tokenizer):
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in TASKS:
        raise ValueError(f"task name must be one of {TASKS}, got {name!r}")
    if name != "associative_recall" and tokenizer is None:
        raise ValueError(f"task {name!r} is text: the model section needs a tokenizer")
    try:
        if name == "associative_recall":
            return AssociativeRecall(vocab_size=spec.pop("vocab_size", model.config.vocab_size), **spec)
        return Passkey(tokenizer, **spec) if name == "passkey" else TextDocuments(tokenizer=tokenizer, **spec)
    except TypeError as error:  # an unknown or missing field
        raise ValueError(f"task {name!r}: {error}") from error


def run(recipe_path: str | Path, output: str | Path, steps: int | None = None, resume: bool = False) -> dict:
    """Train as the recipe says; returns the held-out metrics (rank 0 writes everything to ``output``)."""
    recipe, output = load_recipe(recipe_path), Path(output)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    train_values = {**recipe.get("train", {}), "checkpoint_dir": str(output / "checkpoint")}
    if steps is not None:
        train_values["steps"] = steps
    config = TrainConfig.from_dict(train_values)
    torch.manual_seed(config.seed)  # the random model's initial weights
    model, tokenizer = build_model(recipe["model"], device)
    if recipe.get("extend"):  # the papers' recipe: extend the positions, then fine-tune at the new length
        extend_from_spec(model, recipe["extend"])
    attention = dict(recipe.get("attention") or {})
    if config.sequence_parallel > 1:  # each document sharded over a group of ranks: ring attention over the group
        if attention.setdefault("name", "ring") != "ring":
            raise ValueError(f"train.sequence_parallel runs ring attention; the recipe's attention is "
                             f"{attention['name']!r}")
        attention["group"] = sequence_group(config.sequence_parallel)
    if attention:  # e.g. {name: s2, group_size_ratio: 0.25}: LongLoRA trains with S2-Attn, evaluates with full
        use_attention(model, attention.get("name"), **{k: v for k, v in attention.items() if k != "name"})
    mem_model = attach(model, MemoryConfig.from_dict(recipe.get("memory", {})), tokenizer=tokenizer)
    trainer = Trainer(mem_model, build_task(recipe["task"], model, tokenizer), config)
    if resume:
        trainer.resume(output / "checkpoint")
    trainer.train()
    metrics = {"steps": trainer.step, "final_loss": trainer.history[-1] if trainer.history else None,
               **trainer.evaluate(**recipe.get("evaluate", {}))}
    if config.trainable in LORA:
        merge_lora(mem_model.model)  # the saved model is a plain one: adapters folded into the weights
    if trainer.rank == 0:
        mem_model.save_pretrained(output / "memlm")
        if tokenizer is not None:
            tokenizer.save_pretrained(output / "model")
        model = mem_model.detach()
        if attention:
            use_attention(model, None)  # the saved model runs its own attention
        model.save_pretrained(output / "model")
        (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if distributed:
        dist.destroy_process_group()
    return metrics
