"""crosslayer: per-layer SAEs vs sparse crosscoders on the residual stream of every layer."""

__version__ = "0.1.0"

from crosslayer.errors import CrosslayerError

__all__ = ["CrosslayerError", "__version__"]
