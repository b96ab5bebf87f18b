"""Measurement: what a round or a prediction costs a device.

- :mod:`.meter`: the one memory and time meter (RSS, kernel high-water mark, psutil samples,
  ``malloc_trim``, getrusage fallback); the device client, the profiler and the bench use it.
- :mod:`.limits`: run a job in a fresh child process, optionally under a memory limit
  (cgroup v2, systemd-run, or an RSS watchdog).
- :mod:`.worker`: the child processes' entry point (``python -m edgehmoe.measure.worker``).
- :mod:`.profile`: the per-round profiler behind Table 1 (``edgehmoe-profile``).
- :mod:`.bench_inference`: the ONNX inference bench and its MAC cost model
  (``edgehmoe-bench-inference``).
"""
