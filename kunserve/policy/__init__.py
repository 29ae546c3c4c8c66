"""Decisions, not mechanism: policies read a plain snapshot and return a plan object.

Nothing here touches CUDA, process groups or allocators, so every policy is unit-testable on
the CPU and the cluster simulator can drive the very same objects.
"""
