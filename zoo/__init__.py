"""memzoo models. ``zoo.list_models()``, ``zoo.config(name, preset, **overrides)``,
``zoo.build(config, rngs=...)``; every model returns ``(logits, aux)`` and decodes with
``init_state`` / ``step``."""

from zoo.registry import build, config, family, list_models, model_class, presets, register

register(
  "transformer", "zoo.transformer", "Transformer", "Llama-style baseline (GQA, RoPE, SwiGLU)"
)
register("streaming", "zoo.streaming", "StreamingLLM", "sinks + rolling window, position shift")
register("duo", "zoo.duo", "DuoAttention", "full retrieval heads, sinks+window streaming heads")
register("infllm", "zoo.infllm", "InfLLM", "training-free block memory, top-k retrieval")
register("landmark", "zoo.landmark", "Landmark", "landmark tokens, grouped softmax, top-k blocks")
register("hmt", "zoo.hmt", "HMT", "segment recurrence, sensory memory, memory recall")
register("based", "zoo.based", "Based", "Taylor linear attention + sliding window + short conv")
register("deltanet", "zoo.deltanet", "DeltaNet", "delta-rule linear memory, short conv, L2 keys")
register("gated_deltanet", "zoo.gated_deltanet", "GatedDeltaNet", "DeltaNet with decay and gate")
register("mamba2", "zoo.mamba2", "Mamba2", "Mamba-2 SSD blocks on the scalar-decay memory")
register("mom", "zoo.mom", "MoM", "mixture of routed linear memories plus a shared one")
register("jrt", "zoo.jrt", "JRT", "JRT-RNN: prefix (non-causal prompt) linear attention")
register("titans", "zoo.titans", "Titans", "neural long-term memory: MAC, MAG, MAL, LMM")
register("atlas", "zoo.atlas", "Atlas", "Titans with Omega rule, polynomial features, Muon")
register("hope", "zoo.hope", "Hope", "continuum memory system + self-modifying Titans")

__all__ = ["build", "config", "family", "list_models", "model_class", "presets", "register"]
