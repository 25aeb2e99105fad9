"""Synthetic-data quality: fidelity, coverage, diversity, memorisation and the privacy gate.

``features``: encoders trained on real data (no hub weights); ``metrics``: FD, KID,
precision/recall, (MS-)SSIM diversity; ``memorisation``: nearest real image and the gate;
``stage``: the ``raysynth quality`` stage; ``figures``: its plots.
"""

from raysynth.quality.features import Encoder, random_encoder, train_encoder
from raysynth.quality.memorisation import nearest_feature, nearest_ncc, privacy_gate
from raysynth.quality.metrics import frechet_distance, kid, ms_ssim_diversity, precision_recall
from raysynth.quality.stage import assess_quality, raise_if_failed

__all__ = [
    "Encoder", "train_encoder", "random_encoder",
    "frechet_distance", "kid", "precision_recall", "ms_ssim_diversity",
    "nearest_ncc", "nearest_feature", "privacy_gate",
    "assess_quality", "raise_if_failed",
]
