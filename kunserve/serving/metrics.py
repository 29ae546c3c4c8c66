"""Prometheus text exposition (format 0.0.4) of an ``EngineClient.metrics_snapshot()`` dict.

Written by hand so serving needs no Prometheus client library. The snapshot is a plain dict so
the cluster front door can add entries (drops, restores, ...) without touching this module:

- ``"instances": {instance_id: {name: number}}`` → ``kunserve_<name>{instance="<id>"}``
- ``name: number``                             → ``kunserve_<name>``
- ``name: {label_value: number}``              → ``kunserve_<name>{<label>="<label_value>"}``,
  the label name from ``LABEL_NAMES`` (default ``"key"``)

Names ending in ``_total`` are counters, everything else gauges. Non-numeric values are skipped.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "kunserve_"

LABEL_NAMES = {"requests_total": "finish_reason", "http_responses_total": "code", "pipeline_idle_fraction": "rank"}

HELP = {
    "requests_running": "Requests holding KV blocks and being stepped.",
    "requests_waiting": "Requests queued for admission (including preempted ones).",
    "kv_cache_usage": "Fraction of KV-cache blocks in use (0..1).",
    "kv_cache_free_blocks": "Free KV-cache blocks.",
    "kv_cache_total_blocks": "KV-cache blocks in the pool.",
    "preemptions_total": "Recompute preemptions since start.",
    "prefill_chunks_continued_total": "Prompt chunks an overlapped pipeline ran in another request set's step.",
    "requests_total": "Finished requests by finish reason.",
    "prompt_tokens_total": "Prompt tokens of admitted requests.",
    "generation_tokens_total": "Generated tokens.",
    "http_responses_total": "HTTP error responses by status code.",
    "pipeline_idle_fraction": "Share of its pipeline group's step time a rank sat idle (bubbles).",
    "pipeline_bubble_fraction": "Idle share of all pipeline stages' step time.",
}

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_:]")


def _metric_name(key: str) -> str:
    name = PREFIX + _NAME_BAD.sub("_", str(key))
    return name


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: object) -> str | None:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return None


def _samples(snapshot: dict) -> dict[str, list[tuple[str, str]]]:
    """metric name -> [(label text, value text)], in snapshot order."""
    out: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for instance, values in (snapshot.get("instances") or {}).items():
        for key, value in values.items():
            text = _number(value)
            if text is not None:
                out[_metric_name(key)].append((f'instance="{_escape(instance)}"', text))
    for key, value in snapshot.items():
        if key == "instances":
            continue
        if isinstance(value, dict):
            label = LABEL_NAMES.get(key, "key")
            for label_value, v in value.items():
                text = _number(v)
                if text is not None:
                    out[_metric_name(key)].append((f'{label}="{_escape(label_value)}"', text))
        elif (text := _number(value)) is not None:
            out[_metric_name(key)].append(("", text))
    return out


def render_metrics(snapshot: dict) -> str:
    """The snapshot as Prometheus text: ``# HELP`` / ``# TYPE`` then one line per sample."""
    lines: list[str] = []
    for name, samples in _samples(snapshot).items():
        short = name[len(PREFIX):]
        if short in HELP:
            lines.append(f"# HELP {name} {HELP[short]}")
        lines.append(f"# TYPE {name} {'counter' if name.endswith('_total') else 'gauge'}")
        for labels, value in samples:
            lines.append(f"{name}{{{labels}}} {value}" if labels else f"{name} {value}")
    return "\n".join(lines) + "\n"
