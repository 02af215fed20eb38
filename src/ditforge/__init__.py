"""ditforge: train class-conditional Diffusion Transformers (Peebles & Xie, 2022) on your own images."""

__version__ = "0.1.0"
