"""'Did you mean ...?' for unknown rule-file keys: the keys a pydantic model accepts at a location."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable, Sequence
from typing import Any, Union

from pydantic import BaseModel


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """The closest choice (case-insensitive), or None when nothing is close."""
    by_lower = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    if hits:
        return by_lower[hits[0]]
    return next((c for low, c in by_lower.items() if word.lower() in low or low in word.lower()), None)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def keys_at(model: type[BaseModel], loc: Sequence[Union[int, str]]) -> list[str]:
    """The keys (aliases first) accepted by the model found at ``loc`` (list indexes skipped)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            return []
        if isinstance(part, int):
            continue
        field = next((f for n, f in current.model_fields.items() if part in (n, f.alias)), None)
        if field is None:
            return []
        models = _models_in(field.annotation)
        current = models[0] if models else None
    if current is None:
        return []
    return [f.alias or n for n, f in current.model_fields.items()]


def unknown_key_hint(model: type[BaseModel], loc: Sequence[Union[int, str]]) -> str:
    """Message for an unknown key at ``loc`` (its last element), naming the likely key."""
    key = str(loc[-1])
    known = keys_at(model, loc[:-1])
    guess = did_you_mean(key, known)
    if guess:
        return f"unknown key {key!r}; did you mean {guess!r}?"
    return f"unknown key {key!r} (allowed: {', '.join(known)})" if known else f"unknown key {key!r}"
