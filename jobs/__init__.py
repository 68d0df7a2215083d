"""adarun's controller side: manifest, method specs, plan, storage, on-disk layout, dispatch, report, CLI.

Torch-free: nothing in this package imports torch or the decoder (tests/test_layout.py checks it).
"""

__version__ = "0.1.0"
