"""raysynth: synthetic MRI from diffusion models on Ray, and an honest study of whether it helps."""

__version__ = "0.1.0"
