"""The CPU-tuned kernels (`model.kernels='cpu_tuned'`) and the plain XLA ones ('xla').

Both sets compute the same functions on the same parameters; `models/layers.py` is the one place
that picks a set. Why each CPU-tuned kernel exists, and what it was measured against:
docs/kernels.md.
"""
