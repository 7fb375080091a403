"""A memlm memory model as an lm-evaluation-harness model: ``lm_eval --model memlm --model_args pretrained=DIR``.

Needs the ``eval`` extra (``pip install 'memlm[eval]'``: the ``lm-eval`` package). Importing this module
registers ``MemlmLM`` under the name ``memlm`` in lm-eval's model registry.

* ``loglikelihood``: the context streamed through a session (its memory holds what the local context does
  not), then the continuation's log-probability and whether greedy decoding gives it. Context and
  continuation split as the harness's HF model splits them (the whole text's tokens; trailing spaces move to
  the continuation).
* ``loglikelihood_rolling``: the whole document streamed through *one* session, every token predicted once,
  so memory carries across what would be the harness's disjoint windows.
* ``generate_until``: the context streamed, then greedy generation until a stop string or ``max_gen_toks``;
  the answer is cut before the first stop string, as the harness expects.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from memlm.runtime.text import special_prefix


@register_model("memlm")
class MemlmLM(LM):
    """Args: ``pretrained``: ``"default"`` (memlm-tiny), ``"smollm2"`` (SmolLM2-135M-Instruct, ``memlm.models``) or
    a memlm model directory; or ``mem_model`` (a ``MemoryModel`` with its tokenizer attached); ``dtype``:
    ``"float32"`` or ``"bfloat16"``; ``max_gen_toks``: the default generation budget; other keyword arguments
    override the MemoryConfig (``memory_layers=()``, ``top_k=16``, ...)."""

    def __init__(self, pretrained: str = "default", mem_model=None, max_gen_toks: int = 256, dtype: str = "float32",
                 **overrides) -> None:
        super().__init__()
        if mem_model is None:
            from memlm.models import load_model

            overrides = {name: _parse(value) for name, value in overrides.items()}
            mem_model, _ = load_model(pretrained, dtype=dtype, **overrides)
        elif overrides:
            raise ValueError(f"MemoryConfig overrides {sorted(overrides)} need pretrained=..., not a mem_model")
        if mem_model.tokenizer is None:
            raise ValueError("MemlmLM needs a memory model with a tokenizer: attach(model, config, tokenizer=...)")
        self.mem_model, self.tokenizer, self.max_gen_toks = mem_model, mem_model.tokenizer, int(max_gen_toks)
        self.special = special_prefix(self.tokenizer)  # what a document starts with
        eos = self.tokenizer.eos_token_id
        self.prefix = self.special or ([eos] if eos is not None else [])  # what an empty context conditions on

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        context, continuation = context[: len(context) - spaces], context[len(context) - spaces :] + continuation
        if not context:
            return list(self.prefix), self._encode(continuation)
        whole, head = self._encode(context + continuation), self._encode(context)
        return self.special + head, whole[len(head) :]

    def _scores(self, ids: list[int]) -> torch.Tensor:
        """Log-probabilities [n - 1, vocab] of each next token of ids [n], streamed through one session."""
        device = self.mem_model.device
        with torch.no_grad(), self.mem_model.session() as session:
            logits = session.feed(torch.tensor([ids[:-1]], device=device), return_logits=True).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = []
        for request in tqdm(requests, disable=len(requests) < 16, desc="memlm loglikelihood"):
            context, continuation = request.args
            head, tail = self._pair(context, continuation)
            ids = head + tail
            scores = self._scores(ids)[len(head) - 1 :]
            target = torch.tensor(tail, device=scores.device)
            logprob = float(scores.gather(1, target[:, None]).sum())
            greedy = bool((scores.argmax(dim=-1) == target).all())
            results.append((logprob, greedy))
            self.cache_hook.add_partial("loglikelihood", request.args, (logprob, greedy))
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        results = []
        for request in tqdm(requests, disable=len(requests) < 16, desc="memlm loglikelihood_rolling"):
            (text,) = request.args
            ids = list(self.prefix) + self._encode(text)
            scores = self._scores(ids)
            target = torch.tensor(ids[1:], device=scores.device)
            logprob = float(scores.gather(1, target[:, None]).sum())
            results.append(logprob)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, logprob)
        return results

    def generate_until(self, requests) -> list[str]:
        results = []
        for request in tqdm(requests, disable=len(requests) < 16, desc="memlm generate_until"):
            context, options = request.args
            options = dict(options or {})
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new_tokens = int(options.pop("max_gen_toks", self.max_gen_toks))
            options.pop("do_sample", None)
            with torch.no_grad(), self.mem_model.session() as session:
                text = session.generate(context, max_new_tokens=new_tokens, do_sample=False,
                                        stop_strings=until or None, **options)
            for stop in until:
                text = text.split(stop)[0]
            results.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return results


def _parse(value):
    """lm-eval hands model_args as strings: '()' / '(1,2)' / numbers / booleans."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("(") and text.endswith(")"):
        return tuple(int(v) for v in text[1:-1].split(",") if v.strip())
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)
