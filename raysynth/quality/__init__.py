"""Synthetic-data quality: fidelity, coverage, diversity and memorisation (library; the stage is ``stages.quality``).

``features``: encoders trained on real data (no hub weights); ``metrics``: FD, KID,
precision/recall, (MS-)SSIM diversity; ``memorisation``: nearest real image and the gate.
"""
