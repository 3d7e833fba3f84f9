"""Data: corpora, the byte tokenizer, packing into fixed-length sequences, grain loaders."""
