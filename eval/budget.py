"""How the report measures a configuration's KV budget, for its quality-vs-budget plots: entries kept per
head (eval.ppl.kept_per_head), or, when some configurations are quantized (KIVI: their entries take fewer
bytes), the bytes the cache really holds after compressing a window prompt (eval.sweep.held_bytes), so that
eviction, quantization and both compare at equal memory."""

from __future__ import annotations


UNITS = ("auto", "entries", "bytes")


def budget_axis(configs: list[dict], unit: str = "auto") -> tuple[str, dict[str, float]] | None:
    """(x label, label -> x) of configs ({label, settings, kept, kv_bytes}) in `unit`: entries, bytes, or auto
    (bytes when some configuration is quantized); None when they do not record it."""
    if unit not in UNITS:
        raise ValueError(f"the budget unit must be one of {', '.join(UNITS)}, got {unit!r}")
    quantized = unit == "bytes" or (unit == "auto" and any(c["settings"].get("kv_bits") is not None for c in configs))
    key = "kv_bytes" if quantized else "kept"
    if any(c.get(key) is None for c in configs):
        return None
    scale = 2**-20 if quantized else 1
    label = "KV bytes held after compression (MiB)" if quantized else "kept KV entries per head"
    return label, {c["label"]: c[key] * scale for c in configs}


def line_name(compressor: str, settings: dict) -> str:
    """The line a configuration is drawn on: its policy, and its storage when quantized (snapkv kv4)."""
    bits = settings.get("kv_bits")
    return compressor if bits is None else f"{compressor} kv{bits}"
