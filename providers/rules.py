"""Per-model parameter rules: rewrite a request for models that accept only some parameters.

A rule set is a JSON object with any of:
- ``fixed``: parameters forced to a value (o-series: ``{"temperature": 1}``); a client value that
  differs is replaced, since the provider would reject it;
- ``rename``: parameters moved to another name (``{"max_tokens": "max_completion_tokens"}``);
- ``drop``: parameters removed because the model does not accept them.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError

_KEYS = {"fixed", "rename", "drop"}


def validate_parameter_rules(rules: Any) -> None:
    if not isinstance(rules, dict) or not set(rules) <= _KEYS:
        raise ValidationError({"parameter_rules": f"Use an object with the keys {sorted(_KEYS)}."})
    if not isinstance(rules.get("fixed", {}), dict):
        raise ValidationError({"parameter_rules": "`fixed` maps parameter names to values."})
    rename = rules.get("rename", {})
    if not isinstance(rename, dict) or not all(isinstance(v, str) for v in rename.values()):
        raise ValidationError({"parameter_rules": "`rename` maps parameter names to parameter names."})
    drop = rules.get("drop", [])
    if not isinstance(drop, list) or not all(isinstance(v, str) for v in drop):
        raise ValidationError({"parameter_rules": "`drop` is a list of parameter names."})


def apply_parameter_rules(body: dict[str, Any], rules: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``body`` rewritten by ``rules``; the input is left as it was."""
    if not rules:
        return body
    out = dict(body)
    for old, new in rules.get("rename", {}).items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    for name in rules.get("drop", []):
        out.pop(name, None)
    for name, value in rules.get("fixed", {}).items():
        if name in out:
            out[name] = value
    return out


# The output limits a client may spell (chat completions' current name and the older one, which most servers take).
OUTPUT_LIMITS = ("max_tokens", "max_completion_tokens")


def output_limits_dropped(rules: Any) -> list[str]:
    """Those of ``OUTPUT_LIMITS`` that, sent by a client (or, ``max_tokens``, by llmhub under a budget), reach a
    deployment as no output limit at all under ``rules`` (a ``drop``, maybe after a ``rename``). Such a request
    is unbounded: under a budget admission reserves what the model writes at most (the catalog's
    ``max_output_tokens``), and refuses it when the catalog does not say (``model_output_unbounded``)."""
    if not isinstance(rules, dict) or not rules:
        return []
    dropped = []
    for name in OUTPUT_LIMITS:
        sent = apply_parameter_rules({name: 1}, rules)
        if not any(_positive_int(sent.get(limit)) for limit in OUTPUT_LIMITS):
            dropped.append(name)
    return dropped


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
