"""Generation inside a session, through transformers' own pieces.

``Session.generate`` decodes token by token over its caches and memory, and chooses each token as
``model.generate`` does: the ``GenerationConfig`` (completed from the model's as ``generate``
completes it, then updated with the call's keyword arguments) becomes transformers'
``LogitsProcessorList`` and ``StoppingCriteriaList`` through the model's own builders
(``_prepare_generation_config``, ``_get_logits_processor``, ``_get_stopping_criteria``: the same
processors in the same order, so one config means one thing in both; private names of transformers,
used here only, and pinned by tests against ``model.generate``). Scores are float32, sampling is
``multinomial(softmax(scores))``, finished rows continue with the pad token. The processors see the
whole stream's ids (a repetition penalty covers the document, as it covers the prompt in
``model.generate``).
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

#: max_new_tokens when neither it nor max_length is given (max_length counts the whole stream)
DEFAULT_NEW_TOKENS = 64


def generation_config(model, config: GenerationConfig | None, kwargs: dict) -> GenerationConfig:
    """A copy of ``config`` (default: the model's) updated with ``kwargs``; fields checked, unknown ones refused."""
    if config is not None and not isinstance(config, GenerationConfig):
        raise TypeError(f"generation_config must be a transformers.GenerationConfig, got {type(config).__name__}")
    # the model's generation config and transformers' defaults fill what ``config`` leaves unset, as in generate
    config, _ = model._prepare_generation_config(copy.deepcopy(config))
    unknown = config.update(**kwargs)
    if unknown:
        raise ValueError(f"unknown generation fields {sorted(unknown)}: pass GenerationConfig fields "
                         "(max_new_tokens, do_sample, temperature, top_k, top_p, min_p, typical_p, "
                         "repetition_penalty, no_repeat_ngram_size, bad_words_ids, eos_token_id, stop_strings, "
                         "max_time, ...)")
    if config.max_new_tokens is None and "max_length" not in kwargs:
        config.max_new_tokens = DEFAULT_NEW_TOKENS
    check(config)
    return config


def check(config: GenerationConfig) -> None:
    """Raise a ValueError naming the field for values transformers would take silently or fail on later."""
    def number(name, low, high=None, low_open=False, integer=False):
        value = getattr(config, name)
        if value is None:
            return
        kind = numbers.Integral if integer else numbers.Real
        bad = not isinstance(value, kind) or isinstance(value, bool) or value < low or (low_open and value == low)
        if bad or (high is not None and value > high):
            span = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}{']' if high else ')'}"
            raise ValueError(f"{name} must be {'an integer' if integer else 'a number'} in {span}, got {value!r}")

    number("max_new_tokens", 0, integer=True)
    number("temperature", 0, low_open=True)
    number("top_k", 0, integer=True)
    number("top_p", 0, 1, low_open=True)
    number("min_p", 0, 1)
    number("typical_p", 0, 1, low_open=True)
    number("repetition_penalty", 0, low_open=True)
    number("no_repeat_ngram_size", 0, integer=True)
    number("max_time", 0, low_open=True)
    stops = config.stop_strings
    if stops is not None:
        stops = [stops] if isinstance(stops, str) else stops
        if not isinstance(stops, (list, tuple)) or not stops or not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop_strings must be a non-empty string or a list of them, got {config.stop_strings!r}")
        config.stop_strings = list(stops)
    for name in ("eos_token_id", "pad_token_id"):
        value = getattr(config, name)
        ids = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
        if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"{name} must be a token id >= 0 or a list of them, got {value!r}")
    bad = config.bad_words_ids
    if bad is not None and not (isinstance(bad, list) and bad and all(
            isinstance(words, list) and words and all(isinstance(i, int) and i >= 0 for i in words) for words in bad)):
        raise ValueError(f"bad_words_ids must be a non-empty list of non-empty lists of token ids, got {bad!r}")


@dataclass
class Decoding:
    """What one decoding step needs: transformers' processors and stopping criteria, and the pad token that
    finished rows continue with when an EOS criterion is among them (None: rows never finish early)."""

    processors: LogitsProcessorList
    criteria: StoppingCriteriaList
    pad: torch.Tensor | None


def decoding_pieces(model, tokenizer, config: GenerationConfig, stream_length: int, attention_mask: torch.Tensor | None,
                    device: torch.device) -> Decoding:
    """transformers' processors and stopping criteria for ``config`` (prepared in place, as ``generate`` does),
    for a stream of ``stream_length`` ids whose real ones ``attention_mask`` [batch, stream_length] marks."""
    if isinstance(config.eos_token_id, (list, tuple)) and not config.eos_token_id:
        config.eos_token_id = None  # eos_token_id=[]: never stop early
    # padding is the session's business (rows.py): no warnings about a missing attention mask
    model._prepare_special_tokens(config, kwargs_has_attention_mask=True, device=device)
    if config.max_new_tokens is not None:
        config.max_length = stream_length + config.max_new_tokens
    model_kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    processors = model._get_logits_processor(generation_config=config, input_ids_seq_length=stream_length,
                                             logits_processor=LogitsProcessorList(), device=device,
                                             model_kwargs=model_kwargs)
    if config.stop_strings is not None and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer: attach(model, config, tokenizer=...)")
    # max_new_tokens is the session's loop bound; transformers' MaxLengthCriteria would also warn once a stream
    # passes max_position_embeddings, which a stream is meant to do
    max_length, config.max_length = config.max_length, None
    criteria = model._get_stopping_criteria(generation_config=config, stopping_criteria=StoppingCriteriaList(),
                                            tokenizer=tokenizer)
    config.max_length = max_length
    has_eos = any(hasattr(criterion, "eos_token_id") for criterion in criteria)
    return Decoding(processors, criteria, config._pad_token_tensor if has_eos else None)


def next_tokens(scores: torch.Tensor, do_sample: bool) -> torch.Tensor:
    """Token ids [batch] chosen from processed scores [batch, vocab], as transformers' sampling loop does."""
    if do_sample:
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    return scores.argmax(dim=-1)


def streamer_callback(streamer) -> Callable | None:
    """``streamer.put(ids)`` (transformers' streamers) or the callable itself, given the new ids [batch]."""
    if streamer is None:
        return None
    if hasattr(streamer, "put"):
        return lambda token: streamer.put(token.cpu())
    if callable(streamer):
        return streamer
    raise TypeError(f"streamer must have put()/end() or be callable, got {type(streamer).__name__}")


class Conversation:
    """A chat streamed as one document: the messages so far and the chat template's text of them. Each turn
    feeds only the text the template adds after what the stream already holds."""

    def __init__(self, tokenizer) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("messages need a tokenizer with a chat template; pass text or ids")
        self.tokenizer = tokenizer
        self.messages: list[dict] = []
        self.rendered = ""  # the template's text of what the stream holds

    def extend(self, messages: list[dict]) -> str:
        """The text that continues the stream with ``messages`` and the generation prompt."""
        messages = self.messages + list(messages)
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not rendered.startswith(self.rendered):
            raise ValueError("the chat template renders the earlier turns differently once new messages follow, so "
                             "the conversation cannot stream; start a new session with the whole conversation")
        new, self.messages, self.rendered = rendered[len(self.rendered) :], messages, rendered
        return new

    def answered(self, answer: str, ids: torch.Tensor) -> None:
        """Record the assistant's answer (text, and its ids [n] that the stream holds, an EOS included)."""
        self.messages = [*self.messages, {"role": "assistant", "content": answer}]
        following = self.tokenizer.apply_chat_template(self.messages, tokenize=False)
        fed = self.rendered + self.tokenizer.decode(ids, skip_special_tokens=False)
        self.rendered = fed if following.startswith(fed) else self.rendered + answer
