"""Where the shipped default model lives: one path for the edge, the receiver and the tools.

The model is installed as data inside this package (``common/assets/``): the checkpoint pair
``last.json``/``last.safetensors`` and the edge's ``encoder.onnx`` in ``default_model/``, the
downstream classifier beside it. Torch-free, so the edge can find its encoder too.
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = ASSETS / "default_model"
DEFAULT_CLASSIFIER = ASSETS / "default_classifier"
