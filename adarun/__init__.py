"""adarun: distributed batch generation with adaptive speculative decoding."""

from jobs import __version__

__all__ = ["__version__"]
