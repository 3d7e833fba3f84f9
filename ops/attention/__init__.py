"""Blockwise softmax attention: masks, packed segments, block sparsity, GQA, decode, ring.

``dot_product_attention`` is the entry point; ``Mask`` says which keys a query sees;
``decode_attention`` serves few queries against a long cache; ``ring_attention`` shards the
sequence over a ``context`` mesh axis; ``merge``/``merge_pair`` combine partial results by
their lse (memory + window). See ``README.md`` in this folder for the math and the benchmark
table.
"""

from ops.attention.api import dot_product_attention
from ops.attention.decode import decode_attention
from ops.attention.mask import Mask
from ops.attention.merge import merge, merge_pair
from ops.attention.ring import ring_attention

__all__ = [
  "Mask",
  "decode_attention",
  "dot_product_attention",
  "merge",
  "merge_pair",
  "ring_attention",
]
