"""pemt: pretraining parameter-efficient audio-visual transformers."""

__version__ = "0.1.0"
