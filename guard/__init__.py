"""vlm-guard: an inference-time guard proxy for vision-language model serving."""

__version__ = "0.1.0"
