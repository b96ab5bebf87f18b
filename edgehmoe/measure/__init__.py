"""Measurement: the one round meter (time, peak memory), device facts, the per-round
profiler behind Table 1, and the inference benchmark."""
