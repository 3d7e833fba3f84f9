"""Blockwise softmax attention: masks, packed segments, block sparsity, GQA, decode, ring.

``dot_product_attention`` is the entry point (``IMPLEMENTATIONS``/``DEFAULTS`` its dispatch
tables); ``Mask`` says which keys a query sees; ``decode_attention`` serves few queries against
a long cache; ``ring_attention`` (``context_parallel.py``) shards the sequence over a
``context`` mesh axis; ``merge``/``merge_pair`` combine partial results by their lse (memory +
window). See ``README.md`` in this folder for the math and the benchmark table.
"""

from ops.attention.api import DEFAULTS, IMPLEMENTATIONS, dot_product_attention
from ops.attention.context_parallel import ring_attention
from ops.attention.decode import decode_attention
from ops.attention.mask import Mask
from ops.attention.merge import merge, merge_pair

__all__ = [
  "DEFAULTS",
  "IMPLEMENTATIONS",
  "Mask",
  "decode_attention",
  "dot_product_attention",
  "merge",
  "merge_pair",
  "ring_attention",
]
