"""memzoo kernels: blockwise attention and recurrent memory updates.

Imports jax only (never flax, zoo or pipelines). Each op lives in ``ops/<op>/`` with the same
files: ``api.py`` (the public entry point), ``reference.py`` (the specification), ``xla.py``
(blockwise pure JAX), ``pallas_tpu.py`` / ``pallas_gpu.py`` (kernels) and a README.
"""
