"""adarun: distributed batch generation with adaptive speculative decoding."""
__version__ = "0.1.0"
