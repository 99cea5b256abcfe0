"""Reference models for tests and benchmarks."""

from .moe_decoder import MoEConfig, MoEDecoder

__all__ = ["MoEConfig", "MoEDecoder"]
