"""Mechanism: memory, KV cache, attention, scheduling, model execution."""
