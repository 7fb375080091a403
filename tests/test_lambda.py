"""LM-Infinite's Λ attention (kernels/lambda_attention.py) against a naive float64 masked softmax."""

from __future__ import annotations

import math

import pytest
import torch

from memlm.kernels import lambda_attention, lambda_attention_ref


def naive(q, k, v, global_tokens, local_window):
    """Loops over queries: softmax over the keys j <= i with j < global_tokens or i - j < local_window."""
    _, hq, n, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros_like(q, dtype=torch.float64)
    for i in range(n):
        keys = [j for j in range(i + 1) if j < global_tokens or i - j < local_window]
        kk = k[:, :, keys].double().repeat_interleave(group, dim=1)
        vv = v[:, :, keys].double().repeat_interleave(group, dim=1)
        weights = torch.softmax(q[:, :, i : i + 1].double() @ kk.transpose(-1, -2) / math.sqrt(d), dim=-1)
        out[:, :, i] = (weights @ vv)[:, :, 0]
    return out


@pytest.mark.parametrize(("q_heads", "kv_heads"), [(4, 4), (4, 2)])
@pytest.mark.parametrize(("n", "global_tokens", "local_window"), [
    (37, 4, 8),     # n not a multiple of the window
    (40, 0, 8),     # no global branch: a sliding window
    (33, 5, 64),    # window >= n: causal attention
    (50, 50, 3),    # every key global: causal attention
    (29, 3, 1),     # each query: the global tokens and itself
])
def test_lambda_attention_equals_a_naive_masked_softmax(q_heads, kv_heads, n, global_tokens, local_window):
    generator = torch.Generator().manual_seed(n + global_tokens)
    q = torch.randn(2, q_heads, n, 8, generator=generator, dtype=torch.float64)
    k = torch.randn(2, kv_heads, n, 8, generator=generator, dtype=torch.float64)
    v = torch.randn(2, kv_heads, n, 8, generator=generator, dtype=torch.float64)
    expected = naive(q, k, v, global_tokens, local_window)
    torch.testing.assert_close(lambda_attention(q, k, v, global_tokens=global_tokens, local_window=local_window),
                               expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lambda_attention_ref(q, k, v, global_tokens=global_tokens, local_window=local_window),
                               expected, rtol=1e-12, atol=1e-12)
    if local_window >= n or global_tokens >= n:
        causal = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(q_heads // kv_heads, 1), v.repeat_interleave(q_heads // kv_heads, 1),
            is_causal=True)
        torch.testing.assert_close(expected, causal, rtol=1e-12, atol=1e-12)


def test_float32_and_gradients():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 16, generator=generator, requires_grad=True) for _ in range(3))
    out = lambda_attention(q, k, v, global_tokens=4, local_window=16)
    torch.testing.assert_close(out, lambda_attention_ref(q, k, v, global_tokens=4, local_window=16),
                               rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_bad_input():
    q = torch.zeros(1, 2, 8, 4)
    with pytest.raises(ValueError, match="local_window must be an integer >= 1, got 0"):
        lambda_attention(q, q, q, global_tokens=2, local_window=0)
    with pytest.raises(ValueError, match="global_tokens must be an integer >= 0, got -1"):
        lambda_attention(q, q, q, global_tokens=-1, local_window=4)
    with pytest.raises(ValueError, match="self-attention"):
        lambda_attention(q, torch.zeros(1, 2, 9, 4), torch.zeros(1, 2, 9, 4), global_tokens=2, local_window=4)
