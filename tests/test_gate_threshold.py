"""The privacy gate's threshold adapts to how alike distinct real scans already are."""

import numpy as np
import pytest

from raysynth.quality.memorisation import nearest_ncc, privacy_gate
from raysynth.stages.quality import effective_threshold


def _one_subject(rng, n, base):
    """Scans of one subject: the same anatomy, each with its own small noise and bias."""
    return np.stack([base * rng.uniform(0.9, 1.1) + rng.normal(0, 0.08, base.shape) for _ in range(n)]).astype(np.float32)


@pytest.mark.parametrize("quantile, expected_raise", [(None, False), (0.99, True)])
def test_threshold_rises_to_the_real_reference(quantile, expected_raise):
    rng = np.random.default_rng(0)
    base = np.sin(np.linspace(0, 6, 16))[:, None] * np.cos(np.linspace(0, 4, 16))[None, :]
    train, held = _one_subject(rng, 40, base), _one_subject(rng, 20, base)
    ref, _ = nearest_ncc(held, train)
    assert np.mean(ref > 0.95) > 0.5  # distinct real scans already exceed a fixed 0.95
    thr = effective_threshold(0.95, quantile, ref)
    assert (thr > 0.95) == expected_raise
    faithful = _one_subject(rng, 30, base)  # new samples of the same subject: not copies
    copies = train[:30] + rng.normal(0, 0.005, train[:30].shape).astype(np.float32)
    gate_faithful = privacy_gate(nearest_ncc(faithful, train)[0], thr, 0.1)
    gate_copies = privacy_gate(nearest_ncc(copies, train)[0], thr, 0.1)
    assert not gate_copies["passed"]
    assert gate_faithful["passed"] == expected_raise  # a fixed 0.95 fails even a faithful generator


def test_without_reference_the_configured_threshold_holds():
    assert effective_threshold(0.9, 0.99, np.zeros(0)) == 0.9
    assert effective_threshold(0.999, 0.5, np.array([0.2, 0.3])) == 0.999


def test_study_reads_the_drop_list_the_quality_stage_writes(tmp_path):
    from raysynth.artifacts import Layout, dropped_ids, quality_digest, write_json
    from raysynth.config import load_config
    from raysynth.errors import StageError

    layout = Layout.at(tmp_path)
    cfg = load_config("smoke", overrides=["quality.drop_memorised=true"])
    assert dropped_ids(layout, cfg) == set()
    write_json(layout.quality / "dropped.json", {"config_digest": quality_digest(cfg), "ncc_threshold": 0.95,
                                                 "ids": {"0": ["syn-f0-c0-0000001"], "1": ["syn-f1-c1-0000002"]}})
    assert dropped_ids(layout, cfg) == {"syn-f0-c0-0000001", "syn-f1-c1-0000002"}
    # A list written for another config is an error, and with dropping off it is never read.
    other = load_config("smoke", overrides=["quality.drop_memorised=true", "quality.knn=5"])
    with pytest.raises(StageError, match="another config"):
        dropped_ids(layout, other)
    assert dropped_ids(layout, load_config("smoke")) == set()
