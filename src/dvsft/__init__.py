"""dvsft: direct vision supervision for multimodal LLMs."""

__version__ = "0.1.0"
