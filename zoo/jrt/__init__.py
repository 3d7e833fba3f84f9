"""JRT: JRT-RNN (prefix linear attention) and JRT-Prompt (context repetition for any model)."""

from zoo.jrt.config import JRTConfig
from zoo.jrt.model import JRT
from zoo.jrt.prompt import jrt_prompt, jrt_prompt_prefill, repeat_context

__all__ = ["JRT", "JRTConfig", "jrt_prompt", "jrt_prompt_prefill", "repeat_context"]
