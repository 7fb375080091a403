"""Training memory models: one trainer for Memorizing Transformers, Focused Transformer and RMT.

Every step streams a batch of documents (one per row, ``memlm.train.data``) through a session segment by
segment, exactly as inference does, sums the language-model loss over every segment, and takes one
optimizer step (AdamW, warmup + cosine or constant schedule, gradient clipping and accumulation). With
``step_segments``, a long document is trained in windows, one optimizer step each, its session (XL
caches, memory) carried from window to window with the graph cut between them, as Memorizing
Transformers trains; a window whose labels are all -100 only streams into memory.
What the memory layers see depends on the memory config and on ``TrainConfig.crossbatch``:

* Memorizing Transformers (``fusion="gate"``): memory is the session's kNN index, filled from the
  document's earlier segments; nothing flows back into it (as the paper).
* Focused Transformer (``crossbatch_positives > 0``, ``fusion="joint"``): memory is the differentiable
  CrossBatch memory of the row's own and other rows' recent contexts (``crossbatch.py``).
* RMT (``rmt_tokens > 0``): the memory tokens carry their graph across segments, truncated every
  ``rmt_bptt_depth`` segments; ``curriculum`` lets the number of segments per document grow.

What is trained: ``"memory"`` (memlm's gates and RMT embeddings), ``"lora"`` (those plus LoRA adapters injected by
peft), ``"lora_embed_norm"`` (LongLoRA: LoRA on q, k, v, o plus the input embeddings and every norm, its code's
``trainable_params="embed,norm"``, ``lora.py``) or ``"all"``. Distributed (``torchrun``, ``parallel.py``): every
rank streams its own rows (its memories stay its own) and torch's ``DistributedDataParallel`` (or FSDP2,
``data_parallel="fsdp"``) reduces the gradients of one forward per optimizer window, the loss normalised by the
global count of scored tokens, so 2 ranks x b rows equal 1 rank x 2b rows. ``sequence_parallel=S`` shards each
document across S ranks with Ring Attention (one forward per document: no memory, no XL cache; data parallel over
the W / S groups).
Checkpoints (rank 0, at document boundaries): trainable weights in safetensors, optimizer/scheduler/RNG
state, step and loss history, in a ``step-N/`` directory published by the atomic rename of a manifest;
``resume`` continues exactly, because batches depend only on (seed, step).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from memlm.config import check_integer, known_fields
from memlm.kernels.ring_attention import ring_group
from memlm.memory.crossbatch import CrossBatch
from memlm.runtime.implementations import NAMES, attention_settings
from memlm.runtime.model import MODULE_NAME, MemoryModel

from .data import IGNORE_INDEX, make_batch
from .lora import ATTENTION_PROJECTIONS, embed_norm_parameters, inject_lora
from .parallel import ENGINES, ShardedDocuments, StreamWindow, gradient_sync, wrap

TRAINABLE = ("memory", "lora", "lora_embed_norm", "all")
LORA = ("lora", "lora_embed_norm")
SCHEDULES = ("cosine", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
WEIGHTS_FILE, STATE_FILE, MANIFEST_FILE = "trainable.safetensors", "trainer_state.pt", "checkpoint.json"


@dataclass
class TrainConfig:
    """A training run; every field is validated in ``__post_init__``."""

    steps: int = 1000
    batch_size: int = 8  # documents per rank and micro-step
    document_tokens: int = 2048  # tokens per document (a multiple of the memory config's segment_length)
    trainable: str = "memory"  # "memory" | "lora" | "all"
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    grad_clip: float | None = 1.0
    grad_accumulation: int = 1
    precision: str = "fp32"  # "bf16" / "fp16": autocast on CUDA
    seed: int = 0
    crossbatch_positives: int = 0  # > 0: Focused-Transformer CrossBatch memory
    crossbatch_negatives: int = 0
    curriculum: tuple[tuple[int, int], ...] = ()  # ((from step, segments per document), ...), for RMT
    step_segments: int = 0  # > 0: one optimizer step per window of this many segments; memory carries over
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] | None = None  # default: q, v for "lora"; q, k, v, o for "lora_embed_norm"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # steps; 0 = only at the end (when checkpoint_dir is set)
    progress: bool = True
    data_parallel: str = "ddp"  # "ddp" (DistributedDataParallel) | "fsdp" (FSDP2, parameters sharded)
    sequence_parallel: int = 1  # ranks per document (Ring Attention over its shards); must divide the world size

    def __post_init__(self) -> None:
        self.curriculum = tuple(tuple(int(x) for x in pair) for pair in self.curriculum)
        if self.trainable == "lora+":
            raise ValueError("trainable='lora+' is now 'lora_embed_norm' (LongLoRA's LoRA with trainable embeddings "
                             "and norms, its code's name; LoRA+ is Hayou et al.'s learning-rate ratio)")
        if self.lora_targets is None:
            self.lora_targets = ATTENTION_PROJECTIONS if self.trainable == "lora_embed_norm" else ("q_proj", "v_proj")
        self.lora_targets = tuple(self.lora_targets)
        for name in ("steps", "batch_size", "document_tokens", "grad_accumulation", "lora_rank", "lora_alpha",
                     "sequence_parallel"):
            check_integer(name, getattr(self, name), 1)
        for name in ("warmup_steps", "seed", "crossbatch_positives", "crossbatch_negatives", "checkpoint_every",
                     "step_segments"):
            check_integer(name, getattr(self, name), 0)
        for name, allowed in (("trainable", TRAINABLE), ("schedule", SCHEDULES), ("precision", PRECISIONS),
                              ("data_parallel", ENGINES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be a number > 0 or None, got {self.grad_clip!r}")
        if self.step_segments and self.curriculum:
            raise ValueError("choose step_segments (documents in windows) or curriculum (documents that grow), "
                             "not both")
        if self.sequence_parallel > 1 and (self.step_segments or self.curriculum or self.crossbatch_positives):
            raise ValueError("sequence_parallel trains whole documents in one sharded forward: no step_segments, "
                             "curriculum or CrossBatch")
        if self.crossbatch_negatives and not self.crossbatch_positives:
            raise ValueError("crossbatch_negatives needs crossbatch_positives >= 1")
        steps = [s for s, _ in self.curriculum]
        if steps and (steps[0] != 0 or steps != sorted(set(steps)) or any(n < 1 for _, n in self.curriculum)):
            raise ValueError("curriculum must be ((0, segments), (step, segments), ...) with increasing steps and "
                             f"segments >= 1, got {self.curriculum}")

    @property
    def crossbatch(self) -> CrossBatch | None:
        if not self.crossbatch_positives:
            return None
        return CrossBatch(self.crossbatch_positives, self.crossbatch_negatives)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        return cls(**known_fields(cls, values))


@dataclass
class StepResult:
    """One optimizer step: the step number after it, its loss (mean over scored tokens of all ranks), the
    document tokens this rank streamed, its wall time and the learning rate it used."""

    step: int
    loss: float
    tokens: int  # tokens streamed by this rank
    seconds: float
    lr: float


class Trainer:
    """Trains ``mem_model`` on documents of ``task`` (``memlm.train.data``) as ``config`` says."""

    def __init__(self, mem_model: MemoryModel, task, config: TrainConfig) -> None:
        if not isinstance(mem_model, MemoryModel):
            raise TypeError(f"Trainer expects a MemoryModel (memlm.attach(...)), got {type(mem_model).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"Trainer expects a TrainConfig, got {type(config).__name__}")
        segment = mem_model.config.segment_length
        for _, segments in config.curriculum:
            if segments * segment > config.document_tokens:
                raise ValueError(f"curriculum asks for {segments} segments of {segment} tokens, more than "
                                 f"document_tokens={config.document_tokens}")
        if config.document_tokens % segment:
            raise ValueError(f"document_tokens ({config.document_tokens}) must be a multiple of segment_length "
                             f"({segment}): every training segment is full")
        window = config.step_segments * segment
        if window and config.document_tokens % window:
            raise ValueError(f"document_tokens ({config.document_tokens}) must be a multiple of step_segments x "
                             f"segment_length ({window}): every step trains one whole window")
        if window and config.checkpoint_every % (config.document_tokens // window):
            raise ValueError(f"checkpoint_every ({config.checkpoint_every}) must be a multiple of the steps per "
                             f"document ({config.document_tokens // window}): checkpoints fall on document boundaries")
        if config.crossbatch is not None:
            config.crossbatch.check_batch(config.batch_size)
        device = mem_model.device
        if config.precision != "fp32" and device.type != "cuda":
            raise ValueError(f"precision={config.precision!r} (autocast) needs a CUDA model; on {device} use 'fp32'")
        self.mem_model, self.task, self.config = mem_model, task, config
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if self.world_size % config.sequence_parallel:
            raise ValueError(f"sequence_parallel={config.sequence_parallel} must divide the world size "
                             f"{self.world_size}")
        # ranks form a [data parallel x sequence parallel] grid; a sequence group reads the same documents
        self.data_rank = self.rank // config.sequence_parallel
        self.data_world = self.world_size // config.sequence_parallel
        self.ring = self._check_ring(mem_model, config)
        _seed_everything(config.seed)
        self._select_parameters()
        unit = StreamWindow(mem_model.model) if self.ring is None else ShardedDocuments(mem_model.model, self.ring)
        self.forward = wrap(unit, config.data_parallel, device)  # DDP / FSDP2 when distributed
        # after wrapping: FSDP2 replaces the parameters by sharded DTensors
        self.parameters = {name: p for name, p in mem_model.model.named_parameters() if p.requires_grad and p.numel()}
        self.optimizer = torch.optim.AdamW(self.parameters.values(), lr=config.lr, weight_decay=config.weight_decay)
        schedule = get_cosine_schedule_with_warmup if config.schedule == "cosine" else get_constant_schedule_with_warmup
        kwargs = {"num_training_steps": config.steps} if config.schedule == "cosine" else {}
        self.scheduler = schedule(self.optimizer, num_warmup_steps=config.warmup_steps, **kwargs)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16")
        self.step = 0
        self.history: list[float] = []  # mean loss per step; nan for a step without scored tokens
        self.windows = config.document_tokens // window if window else 1  # optimizer steps per document
        self._open: tuple[int, list] | None = None  # (document, [(session, batch)]) while a document is streamed

    # ----------------------------------------------------------------------------------- parameters

    def _check_ring(self, mem_model: MemoryModel, config: TrainConfig):
        """The process group of the model's ring attention (None without it), checked against sequence_parallel."""
        settings = attention_settings(mem_model.model) if mem_model.previous_attention == NAMES["ring"] else None
        if settings is None:
            if config.sequence_parallel > 1:
                raise ValueError("sequence_parallel needs a model that runs ring attention over each sequence group: "
                                 "use_attention(model, 'ring', group=memlm.train.parallel.sequence_group(S)) before "
                                 "attach (a recipe with train.sequence_parallel does it)")
            return None
        group = ring_group(settings.group)
        first = self.data_rank * config.sequence_parallel
        if dist.get_process_group_ranks(group) != list(range(first, first + config.sequence_parallel)):
            raise ValueError(f"the model's ring attention spans ranks {dist.get_process_group_ranks(group)}; with "
                             f"sequence_parallel={config.sequence_parallel} rank {self.rank} needs ranks "
                             f"{first}..{first + config.sequence_parallel - 1} (memlm.train.parallel.sequence_group)")
        memory = mem_model.config
        if mem_model.memory_layers or memory.xl_length or memory.rmt_tokens or memory.sink_tokens or (
                memory.segment_length < config.document_tokens):
            raise ValueError("ring attention trains whole documents in one sharded forward: the memory config needs "
                             "memory_layers=[], xl_length=0, no RMT or sink tokens and segment_length >= "
                             f"document_tokens ({config.document_tokens})")
        return group

    def _select_parameters(self) -> None:
        """Freeze everything but what ``config.trainable`` names."""
        model, config = self.mem_model.model, self.config
        plus = set()
        if config.trainable in LORA:
            inject_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets)
            plus = embed_norm_parameters(model) if config.trainable == "lora_embed_norm" else set()
        for name, parameter in model.named_parameters():
            wanted = (config.trainable == "all" or name.startswith(MODULE_NAME + ".") or name in plus
                      or (config.trainable in LORA and "lora_" in name))
            parameter.requires_grad_(wanted and parameter.numel() > 0)  # (no gates without memory layers)
        if not any(p.requires_grad and p.numel() for p in model.parameters()):
            raise ValueError(f"trainable={config.trainable!r} leaves nothing to train: this memory config has no "
                             "memory layers or RMT tokens; choose 'lora' or 'all'")

    # ---------------------------------------------------------------------------------------- steps

    def document_tokens(self, step: int) -> int:
        """Tokens per document at ``step`` (the curriculum's segments, or the whole document)."""
        segments = [n for start, n in self.config.curriculum if start <= step]
        return segments[-1] * self.mem_model.config.segment_length if segments else self.config.document_tokens

    def train_step(self) -> StepResult:
        """One optimizer step over ``grad_accumulation`` batches of documents (or one window of them).

        A step whose documents score no token in its window (e.g. the haystack before a question) only
        streams them into memory: no update, and the history records nan.
        """
        config, start, device = self.config, time.perf_counter(), self.mem_model.device
        document, window = divmod(self.step, self.windows)
        streams = self._streams(document, window)
        width = streams[0][1].ids.shape[1] // self.windows
        first, last = window * width, (window + 1) * width
        # Normalise by the scored tokens of the whole global step, so ranks and micro-batches add up exactly; a
        # micro-batch no rank scores in only streams into memory. (Reduced tensors live on the model's device:
        # NCCL reduces CUDA tensors only; a sequence group's ranks hold the same documents, counted once.)
        counts = torch.tensor([float((batch.labels[:, first + 1 : last + 1] != IGNORE_INDEX).sum())
                               for _, batch in streams], dtype=torch.float64, device=device)
        if self.world_size > 1:
            dist.all_reduce(counts)
            counts /= config.sequence_parallel
        total, counts = counts.sum().item(), counts.tolist()
        last_scored = max((m for m, c in enumerate(counts) if c), default=-1)
        loss_total = 0.0
        self.mem_model.model.train()
        for micro, (session, batch) in enumerate(streams):
            ids, labels = batch.ids[:, first:last].to(device), batch.labels[:, first : last + 1].to(device)
            if not counts[micro]:
                if session is not None:
                    with torch.no_grad():
                        session.feed(ids)
                continue
            # labels one column longer: the window's last token predicts the next window's first
            with gradient_sync(self.forward, micro == last_scored):
                with self._autocast():
                    loss_sum = self.forward(ids, labels)[0] if session is None else self.forward(session, ids, labels)
                self.scaler.scale(loss_sum * (self.world_size / total)).backward()
            loss_total += loss_sum.item()
            if session is not None:
                session.detach_graph()
        lr = self.scheduler.get_last_lr()[0]
        if total:
            self._update()
        loss = torch.tensor(loss_total, device=device)
        if self.world_size > 1:
            dist.all_reduce(loss)
        self.history.append(loss.item() / total if total else math.nan)
        self.step += 1
        if window == self.windows - 1:
            self._close_streams()
        tokens = width * len(streams) * config.batch_size // config.sequence_parallel  # this rank's share
        return StepResult(self.step, self.history[-1], tokens, time.perf_counter() - start, lr)

    def _update(self) -> None:
        """Clip, step the optimizer and the schedule (DDP / FSDP2 reduced the gradients in the backward)."""
        self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters.values(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _streams(self, document: int, window: int) -> list:
        """[(session, batch)] per micro-batch of ``document``, open across its windows."""
        if self._open is not None and self._open[0] == document:
            return self._open[1]
        if window:  # checkpoints fall on document boundaries, so this cannot happen through train/resume
            raise RuntimeError(f"step {self.step} is inside document {document}, whose sessions are gone")
        self._close_streams()
        config = self.config
        batches = [
            make_batch(self.task, seed=config.seed, step=document * config.grad_accumulation + micro,
                       batch_size=config.batch_size, tokens=self.document_tokens(self.step), rank=self.data_rank,
                       world_size=self.data_world)
            for micro in range(config.grad_accumulation)
        ]
        streams = [(None if self.ring is not None else  # sharded documents need no session
                    self.mem_model.session(batch_size=config.batch_size, crossbatch=config.crossbatch), batch)
                   for batch in batches]
        self._open = (document, streams)
        return streams

    def _close_streams(self) -> None:
        if self._open is not None:
            for session, _ in self._open[1]:
                if session is not None:
                    session.close()
            self._open = None

    def _autocast(self):
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if self.config.precision == "bf16" else torch.float16)

    def train(self, steps: int | None = None) -> list[float]:
        """Run until ``config.steps`` (or ``steps`` more); returns the loss history. Checkpoints as configured."""
        config = self.config
        end = config.steps if steps is None else min(config.steps, self.step + steps)
        bar = tqdm(total=end, initial=self.step, unit="step", desc="memlm train",
                   disable=not config.progress or self.rank != 0, mininterval=1.0)
        while self.step < end:
            result = self.train_step()
            bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{result.tokens * self.world_size / result.seconds:,.0f}",
                            lr=f"{result.lr:.2e}", refresh=False)
            bar.update(1)
            if config.checkpoint_dir and config.checkpoint_every and self.step % config.checkpoint_every == 0:
                self.save_checkpoint(config.checkpoint_dir)
        bar.close()
        if config.checkpoint_dir and self.step % self.windows == 0:
            self.save_checkpoint(config.checkpoint_dir)
        elif config.checkpoint_dir:
            warnings.warn(f"no checkpoint at step {self.step}: it is inside a document (checkpoints fall on "
                          f"document boundaries, every {self.windows} steps)", stacklevel=2)
        return self.history

    # ----------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, task=None, documents: int = 64, seed: int | None = None, tokens: int | None = None) -> dict:
        """Accuracy (argmax == label at scored positions) and mean loss on held-out documents, streamed
        through inference sessions (kNN index memory, no CrossBatch). Held out: a seed training never uses."""
        task = self.task if task is None else task
        seed = self.config.seed + 1_000_003 if seed is None else seed
        tokens = self.config.document_tokens if tokens is None else tokens
        self.mem_model.model.eval()
        correct = scored = 0
        losses = []
        for step in range(math.ceil(documents / self.config.batch_size)):
            batch = make_batch(task, seed=seed, step=step, batch_size=self.config.batch_size, tokens=tokens)
            ids, labels = batch.ids.to(self.mem_model.device), batch.labels.to(self.mem_model.device)
            if self.ring is not None:  # the sharded forward, its sums over the sequence group
                sums = torch.tensor(self.forward(ids, labels), dtype=torch.float64, device=ids.device)
                dist.all_reduce(sums, group=self.ring)
                correct, scored = correct + int(sums[1]), scored + int(sums[2])
                losses.append((sums[0] / sums[2]).item())
                continue
            with self.mem_model.session(batch_size=ids.shape[0]) as session:
                result = session.feed(ids, labels=labels, return_logits=True)
            predictions, targets = result.logits[:, :-1].argmax(-1), labels[:, 1:]
            mask = targets != IGNORE_INDEX
            correct += int((predictions == targets)[mask].sum())
            scored += int(mask.sum())
            losses.append(result.loss.item())
        return {"accuracy": correct / max(scored, 1), "loss": float(np.mean(losses)), "scored_tokens": scored}

    # ---------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, directory: str | Path) -> None:
        """Rank 0 writes trainable weights (safetensors) and the trainer state; every rank waits for it.

        Layout: ``directory/step-N/`` holds one whole checkpoint; ``directory/checkpoint.json`` (the manifest)
        names the published one. A checkpoint is written whole into its own directory, then published by one
        atomic rename of the manifest, and only then are older ``step-*`` directories deleted: a crash at any
        moment leaves the manifest naming a whole checkpoint (the new one or the previous one).

        Only at document boundaries: inside a document (``step_segments``) its caches and memory were
        computed with earlier weights, which a resumed run could not rebuild.
        """
        if self.step % self.windows:
            raise ValueError(f"step {self.step} is inside a document; checkpoints fall on document boundaries "
                             f"(every {self.windows} steps with step_segments={self.config.step_segments})")
        # whole tensors on every rank (FSDP2's shards are gathered: a collective, so all ranks take part)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        weights = get_model_state_dict(self.mem_model.model, options=options)
        optimizer = get_optimizer_state_dict(self.mem_model.model, self.optimizer, options=options)
        target = Path(directory) / f"step-{self.step}"
        if self.rank == 0 and checkpoint_path(directory) != target:  # else this very state is published already
            self._publish(target, weights, optimizer)
        if self.world_size > 1:
            dist.barrier()

    def _publish(self, target: Path, weights: dict, optimizer: dict) -> None:
        """Write the checkpoint into ``target`` (``directory/step-N``), publish it, delete the older ones."""
        directory = target.parent
        if target.exists():  # a save of this step that a crash cut short
            shutil.rmtree(target)
        target.mkdir(parents=True)
        save_file({n: weights[n].contiguous() for n in self.parameters}, str(target / WEIGHTS_FILE))
        state = {
            "step": self.step, "history": self.history, "config": self.config.to_dict(),
            "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": _rng_state(),
        }
        torch.save(state, target / STATE_FILE)
        (target / "train_config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        _fsync(*target.iterdir(), target)
        manifest = directory / (MANIFEST_FILE + ".tmp")
        manifest.write_text(json.dumps({"step": self.step, "checkpoint": target.name}) + "\n")
        _fsync(manifest)
        os.replace(manifest, directory / MANIFEST_FILE)  # the publication: one atomic rename
        _fsync(directory)
        for old in directory.glob("step-*"):
            if old.name != target.name and old.is_dir():
                shutil.rmtree(old)

    def resume(self, directory: str | Path) -> None:
        """Load the checkpoint ``save_checkpoint`` published in ``directory`` (same model, memory and train config)."""
        path = checkpoint_path(directory)
        if path is None:
            raise FileNotFoundError(f"{Path(directory) / MANIFEST_FILE} not found: expected a directory made by "
                                    "save_checkpoint")
        weights = load_file(str(path / WEIGHTS_FILE))
        if set(weights) != set(self.parameters):
            raise ValueError(f"{path} holds weights for other parameters than this trainer trains "
                             f"({sorted(set(weights) ^ set(self.parameters))[:5]} ...)")
        state = torch.load(path / STATE_FILE, weights_only=True)  # tensors and plain values only: no code runs
        options = StateDictOptions(full_state_dict=True, strict=False)  # every rank reads the whole tensors
        set_model_state_dict(self.mem_model.model, weights, options=options)
        set_optimizer_state_dict(self.mem_model.model, self.optimizer, state["optimizer"], options=options)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.history = state["step"], list(state["history"])
        _set_rng_state(state["rng"])


def checkpoint_path(directory: str | Path) -> Path | None:
    """The published checkpoint of ``directory`` (``step-N/``, named by its manifest), or None when there is none.

    A directory of the earlier flat layout (the two files side by side, no manifest) is read as it is.
    """
    directory = Path(directory)
    manifest = directory / MANIFEST_FILE
    if manifest.is_file():
        path = directory / json.loads(manifest.read_text())["checkpoint"]
        if not all((path / file).is_file() for file in (WEIGHTS_FILE, STATE_FILE)):
            raise FileNotFoundError(f"{manifest} names {path}, which is not a whole checkpoint")
        return path
    if all((directory / file).is_file() for file in (WEIGHTS_FILE, STATE_FILE)):
        return directory
    return None


def _fsync(*paths: Path) -> None:
    """fsync files and directories (a directory: its entries), so a rename publishes data that is on disk."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    """Every generator's state as tensors and plain values (what ``torch.load(weights_only=True)`` reads)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
