"""How the trainer's ranks share a step: torch's own engines for data parallelism, ring attention for sequences.

Under ``torchrun`` the ranks form a [data parallel x sequence parallel] grid: ranks s*S .. s*S + S - 1 are one
*sequence group* (S = ``TrainConfig.sequence_parallel``); they read the same documents and each runs the model on
its zigzag shard of them with Ring Attention (``use_attention(model, "ring", group=sequence_group(S))``); the
W / S sequence groups read different documents. Gradients are reduced over all W ranks by torch's
``DistributedDataParallel`` or, for models that do not fit one device, FSDP2 (``fully_shard``): both need one forward
per backward, so the unit they wrap is a whole optimizer window, ``StreamWindow`` (a memory session's segments are
several model forwards) or ``ShardedDocuments`` (one forward over this rank's shard of whole documents).
Every rank's loss is its sum of token losses over the step's global count of scored tokens, times W (both engines
average gradients over ranks), so W ranks equal one rank with W times the batch.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from memlm.runtime.implementations import ring_shard_inputs

from .data import IGNORE_INDEX

ENGINES = ("ddp", "fsdp")


def sequence_group(size: int) -> dist.ProcessGroup | None:
    """This rank's group of ``size`` consecutive ranks (every rank must call it: groups are made collectively);
    None when torch.distributed is not initialized or ``size`` is 1."""
    if size == 1 or not dist.is_initialized():
        return None
    world = dist.get_world_size()
    if world % size:
        raise ValueError(f"sequence_parallel={size} must divide the world size {world} (ranks form a grid of "
                         f"{world} / sequence_parallel data-parallel rows)")
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= dist.get_rank() < first + size:
            mine = group
    return mine


class StreamWindow(torch.nn.Module):
    """One optimizer window of a memory session as one forward: returns the sum of its token losses (with a graph)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, session, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return session.feed(ids, labels=labels).loss_sum


class ShardedDocuments(torch.nn.Module):
    """Whole documents as one forward of this rank's ring shard: (sum of its token losses, number of them correct,
    number scored). ids, labels [b, n] of the whole documents (labels unshifted: token i predicts label i + 1)."""

    def __init__(self, model: torch.nn.Module, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.model, self.group = model, group

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        inputs = ring_shard_inputs(ids, labels, group=self.group)
        targets = inputs["shift_labels"]
        logits = self.model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False).logits
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum")
        scored = targets != IGNORE_INDEX
        return loss_sum, int((logits.argmax(-1) == targets)[scored].sum()), int(scored.sum())


def wrap(unit: StreamWindow | ShardedDocuments, engine: str, device: torch.device) -> torch.nn.Module:
    """``unit`` under ``engine`` (``"ddp"`` or ``"fsdp"``) when torch.distributed runs on several ranks, else itself.

    DDP wraps the unit (one forward per window). FSDP2 shards every decoder layer (a ModuleList entry holding a
    module with a ``layer_idx``) and the model itself as the root, so the model also runs unwrapped (a session's
    evaluation), with its parameters replaced by DTensors in place: build the optimizer after this.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return unit
    if engine == "ddp":
        return DistributedDataParallel(unit, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layers in (m for m in unit.model.modules() if isinstance(m, torch.nn.ModuleList)):
        for layer in layers:
            if any(isinstance(getattr(sub, "layer_idx", None), int) for sub in layer.modules()):
                fully_shard(layer, mesh=mesh)  # a decoder layer; the rest (memlm's gates among it) is the root's
    fully_shard(unit.model, mesh=mesh)
    return unit


def gradient_sync(unit: torch.nn.Module, enabled: bool):
    """A context in which the backward of ``wrap``'s result does (or, for all but a step's last micro-batch, does
    not) reduce gradients across ranks."""
    if enabled:
        return contextlib.nullcontext()
    if isinstance(unit, DistributedDataParallel):
        return unit.no_sync()
    if hasattr(unit.model, "set_requires_gradient_sync"):  # FSDP2
        return fsdp_no_sync(unit.model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
