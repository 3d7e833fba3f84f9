"""memzoo kernels: blockwise attention and recurrent memory updates.

Imports jax only (never flax, zoo or pipelines). Each op lives in ``ops/<op>/`` with the same
files: ``api.py`` (the public entry point and its ``IMPLEMENTATIONS``/``DEFAULTS`` tables),
``reference.py`` (the specification), ``xla.py`` (blockwise pure JAX), ``pallas_tpu.py`` /
``pallas_gpu.py`` (kernels), ``context_parallel.py`` (the sequence split over a ``context``
mesh axis, where the op has one) and a README. ``ops.common.dispatch`` chooses and records the
implementation that serves each call.
"""
