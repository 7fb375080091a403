"""CrossBatch (Focused Transformer): what each row's memory holds, and that it is differentiable."""

from __future__ import annotations

import pytest
import torch

from memlm import CrossBatch, MemoryConfig, attach
from memlm.memory.crossbatch import CrossBatchMemory
from memlm.positions.policy import PositionPolicy

from conftest import document


def tagged(batch: int, start: int, n: int) -> torch.Tensor:
    """Keys [batch, 2 kv heads, n, 4] whose features say (row, document position, head, 1)."""
    rows = torch.arange(batch).view(batch, 1, 1).expand(batch, 2, n)
    positions = torch.arange(start, start + n).view(1, 1, n).expand(batch, 2, n)
    heads = torch.arange(2).view(1, 2, 1).expand(batch, 2, n)
    return torch.stack([rows, positions, heads, torch.ones_like(rows)], dim=-1).float()


def test_memory_holds_own_recent_contexts_then_negatives_from_other_rows():
    memory = CrossBatchMemory(CrossBatch(positives=2, negatives=2), batch_size=3, segment_length=4,
                              positions=PositionPolicy("rebase", "first", rotary=None))
    q = torch.zeros(3, 2, 1, 4)
    assert memory.read(0, q, 0, 1.0) == (None, None, None)
    memory.add(0, tagged(3, 0, 4), tagged(3, 0, 4))
    keys, values, mask = memory.read(0, q, 0, 1.0)
    assert keys.shape == (3, 2, 3 * 4, 4) and mask is None  # half the capacity filled so far: only that is read
    for start in (4, 8):
        memory.add(0, tagged(3, start, 4), tagged(3, start, 4))
    keys, values, mask = memory.read(0, q, 0, 1.0)
    assert keys.shape == (3, 2, 3 * 8, 4) and mask is None
    for row in range(3):
        blocks = keys[row].view(2, 3, 8, 4)  # [heads, own + 2 negatives, capacity, features]
        # positives: this row's own last 8 tokens, in order, all before the current context (positions >= 12)
        assert (blocks[:, 0, :, 0] == row).all()
        assert blocks[0, 0, :, 1].tolist() == list(range(4, 12))
        # negatives: the next rows cyclically, never this row
        assert [int(blocks[0, j, 0, 0]) for j in (1, 2)] == [(row + 1) % 3, (row + 2) % 3]
        assert (blocks[:, :, :, 2] == torch.arange(2).view(2, 1, 1)).all()  # each kv head reads its own head
    torch.testing.assert_close(values, keys)


def test_bad_crossbatch_settings_are_refused(tiny_llama):
    with pytest.raises(ValueError, match="positives must be >= 1"):
        CrossBatch(positives=0)
    with pytest.raises(ValueError, match="negatives must be an integer"):
        CrossBatch(negatives=-1)
    mem_model = attach(tiny_llama, MemoryConfig(segment_length=8, xl_length=0, memory_layers=(1,), fusion="joint"))
    with pytest.raises(ValueError, match="at most batch_size - 1"):
        mem_model.session(batch_size=2, crossbatch=CrossBatch(1, 2))
    mem_model.detach()
    mem_model = attach(tiny_llama, MemoryConfig(segment_length=8, memory_layers=(1,), memory_positions="original"))
    with pytest.raises(ValueError, match="memory_positions='first'"):
        mem_model.session(batch_size=2, crossbatch=CrossBatch(1, 1))


def crossbatch_logits(mem_model, ids, crossbatch):
    with mem_model.session(batch_size=ids.shape[0], crossbatch=crossbatch) as session:
        return session.feed(ids, return_logits=True).logits


def test_queries_see_other_documents_only_through_their_memory(tiny_llama):
    """Row 0's logits depend on row 1's older contexts (a negative in memory) but not on row 1's current
    segment, which is row 1's local context; without negatives they depend on nothing of row 1."""
    mem_model = attach(tiny_llama, MemoryConfig(segment_length=8, xl_length=8, memory_layers=(1,), fusion="joint"))
    ids = document(64, seed=1).view(2, 32)
    changed_now, changed_before = ids.clone(), ids.clone()
    changed_now[1, 24:] = document(8, seed=2)  # row 1's last segment
    changed_before[1, :8] = document(8, seed=3)  # row 1's first segment, in memory by the last segment
    with torch.no_grad():
        base = crossbatch_logits(mem_model, ids, CrossBatch(1, 1))
        torch.testing.assert_close(crossbatch_logits(mem_model, changed_now, CrossBatch(1, 1))[0], base[0])
        assert not torch.allclose(crossbatch_logits(mem_model, changed_before, CrossBatch(1, 1))[0, 24:], base[0, 24:])
        alone = crossbatch_logits(mem_model, ids, CrossBatch(1, 0))
        torch.testing.assert_close(crossbatch_logits(mem_model, changed_before, CrossBatch(1, 0))[0], alone[0])


def test_crossbatch_memory_carries_gradient_to_earlier_segments(tiny_llama):
    """A loss on the last segment reaches the first segment's tokens through CrossBatch memory only."""
    config = MemoryConfig(segment_length=8, xl_length=8, memory_layers=(1,), fusion="joint")
    mem_model = attach(tiny_llama, config)
    ids = document(64, seed=4).view(2, 32)
    embeddings = tiny_llama.get_input_embeddings()
    grads = {}
    for name, crossbatch in (("crossbatch", CrossBatch(1, 1)), ("knn", None)):
        embeddings.weight.grad = None
        labels = torch.full_like(ids, -100)
        labels[:, 25:] = ids[:, 25:]  # the loss of the last segment only
        with mem_model.session(batch_size=2, crossbatch=crossbatch) as session:
            session.feed(ids, labels=labels).loss.backward()
        first_segment_only = sorted(set(ids[:, :8].flatten().tolist()) - set(ids[:, 8:].flatten().tolist()))
        assert first_segment_only
        grads[name] = embeddings.weight.grad[first_segment_only].abs().sum()
    assert grads["crossbatch"] > 0 and grads["knn"] == 0
