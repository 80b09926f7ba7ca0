"""Stage 1: how much work the worker may claim."""
