"""The sampling plan: class counts, resumable shard requests, stable per-sample seeds."""

import pytest

from raysynth.config import load_config
from raysynth.artifacts import SHARD_RE, shard_name
from raysynth.design import class_counts
from raysynth.diffusion.sampler import sample_seed
from raysynth.stages.sample import plan_requests


@pytest.mark.parametrize(
    "overrides, real, expected",
    [
        (["sampling.ratio=1"], {0: 10, 1: 4}, {0: 10, 1: 10}),  # balanced to the largest class
        (["sampling.ratio=0.5"], {0: 10, 1: 4}, {0: 5, 1: 5}),
        (["sampling.ratio=2", "sampling.class_balance=proportional"], {0: 10, 1: 4}, {0: 20, 1: 8}),
        (["sampling.num_samples=7"], {0: 10, 1: 4}, {0: 4, 1: 3}),
        (["sampling.num_samples=7", "sampling.class_balance=proportional"], {0: 10, 1: 4}, {0: 5, 1: 2}),
        (["sampling.num_samples=0"], {0: 3, 1: 3, 2: 3}, {0: 0, 1: 0, 2: 0}),
    ],
)
def test_class_counts(overrides, real, expected):
    cfg = load_config("smoke", None, overrides)
    counts = class_counts(cfg, real, None)
    assert counts == expected
    if cfg.sampling.num_samples is not None:
        assert sum(counts.values()) == cfg.sampling.num_samples


def test_num_samples_argument_overrides_config():
    cfg = load_config("smoke")
    assert sum(class_counts(cfg, {0: 5, 1: 5}, 11).values()) == 11


def test_plan_covers_everything_once_in_aligned_shards():
    reqs = plan_requests({0: 10, 1: 3}, {}, shard_size=4)
    assert [(r["label"], r["lo"], r["hi"]) for r in reqs] == [(0, 0, 4), (0, 4, 8), (0, 8, 10), (1, 0, 3)]


def test_growing_plans_only_the_missing_samples():
    first = plan_requests({0: 6}, {}, shard_size=4)
    existing = {0: [(r["lo"], r["hi"]) for r in first]}
    grown = plan_requests({0: 11}, existing, shard_size=4)
    assert [(r["lo"], r["hi"]) for r in grown] == [(6, 8), (8, 11)]
    assert plan_requests({0: 6}, existing, shard_size=4) == []  # nothing to do
    assert plan_requests({0: 3}, existing, shard_size=4) == []  # shrinking writes nothing


def test_holes_from_a_crash_are_refilled():
    existing = {0: [(0, 4), (8, 12)]}
    assert [(r["lo"], r["hi"]) for r in plan_requests({0: 12}, existing, 4)] == [(4, 8)]


def test_shard_names_parse_back():
    m = SHARD_RE.match(shard_name(3, 128, 256))
    assert (int(m["c"]), int(m["lo"]), int(m["hi"])) == (3, 128, 256)


def test_seeds_depend_on_the_sample_key_only():
    seeds = {sample_seed(1234, f, c, j) for f in range(3) for c in range(2) for j in range(50)}
    assert len(seeds) == 300
    assert sample_seed(1234, 0, 1, 7) == sample_seed(1234, 0, 1, 7)
    assert sample_seed(1234, 0, 1, 7) != sample_seed(1235, 0, 1, 7)
