"""ganlib/fewshot.py: class share and coverage, memorisation and intra-cluster diversity.

Real images stand in for generators whose answer is known: the training shots themselves (a
copier), digits of the source classes (a generator that never left the source), and held-out
images of the target classes (a perfect generator of new target images).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from ganlib.data import load_images
from ganlib.data.spec import DataSpec
from ganlib.fewshot import (class_metrics_reason, class_share_and_coverage, feature_distances,
                            intra_cluster_diversity, training_positions, transfer_metrics)

TARGET = DataSpec.parse("mnist5k:classes=5-9:n=25")
SOURCE = DataSpec.parse("mnist5k:classes=0-4")


def domain_of(spec: DataSpec):
    return load_images(dataclasses.replace(spec, n=None), 28, 1)


@pytest.fixture(scope="module")
def domain():
    return domain_of(TARGET)


def score(fake, spec=TARGET, domain=None):
    return transfer_metrics(fake, spec, domain if domain is not None else domain_of(spec), "lenet-mnist5k",
                            lpips=False).metrics


def test_training_positions_select_exactly_the_few_shots(domain):
    pos = training_positions(TARGET, len(domain))
    shots = load_images(TARGET, 28, 1)
    assert torch.equal(domain.images[pos], shots.images) and torch.equal(domain.labels[pos], shots.labels)
    other_seed = dataclasses.replace(TARGET, seed=3)
    assert torch.equal(domain.images[training_positions(other_seed, len(domain))], load_images(other_seed, 28, 1).images)


def test_a_copier_is_memorised_and_has_no_diversity(domain):
    shots = load_images(TARGET, 28, 1).images
    m = score(shots.repeat(20, 1, 1, 1), domain=domain)                 # 500 samples, each a training shot
    assert m["transfer/memorised_share"] > 0.99 and m["transfer/nn_dist_ratio"] < 0.01
    assert m["transfer/diversity"] < 1e-3 * m["transfer/diversity_real"]
    assert m["transfer/diversity_clusters"] == 25 and m["transfer/diversity_singletons"] == 0
    assert m["transfer/diversity_space"] == "features:lenet-mnist5k"


def test_held_out_target_images_are_on_target_covered_and_new(domain):
    pos = training_positions(TARGET, len(domain))
    keep = torch.ones(len(domain), dtype=torch.bool)
    keep[pos] = False
    fake = domain.images[keep][torch.randperm(int(keep.sum()), generator=torch.Generator().manual_seed(1))[:500]]
    m = score(fake, domain=domain)
    assert m["transfer/target_class_share"] > 0.95 and m["transfer/class_coverage"] > 0.95
    assert m["transfer/classifier_real_accuracy"] > 0.95
    assert m["transfer/memorised_share"] < 0.15 and 0.8 < m["transfer/nn_dist_ratio"] < 1.25
    assert 0.8 < m["transfer/diversity_vs_real"] < 1.25
    assert m["transfer/num_heldout"] == len(domain) - 25 and m["transfer/num_shots"] == 25


def test_a_generator_stuck_on_the_source_classes_misses_the_target(domain):
    source_digits = load_images(dataclasses.replace(SOURCE, n=500), 28, 1).images
    m = score(source_digits, domain=domain)
    assert m["transfer/target_class_share"] < 0.3


def test_coverage_is_the_normalised_entropy_over_target_classes():
    classes = (5, 6, 7, 8, 9)
    uniform = torch.tensor([5, 6, 7, 8, 9] * 4)
    one_class = torch.tensor([7] * 20)
    half = torch.tensor([5, 6] * 10 + [0] * 20)
    assert class_share_and_coverage(uniform, classes)["transfer/class_coverage"] == pytest.approx(1.0)
    assert math.copysign(1, class_share_and_coverage(one_class, classes)["transfer/class_coverage"]) == 1.0  # +0.0
    m = class_share_and_coverage(half, classes)
    assert m["transfer/target_class_share"] == pytest.approx(0.5)
    assert m["transfer/class_coverage"] == pytest.approx(math.log(2) / math.log(5))
    assert class_share_and_coverage(torch.tensor([0, 1]), classes)["transfer/class_coverage"] == 0.0
    single = class_share_and_coverage(torch.tensor([5, 5, 1]), (5,))
    assert "transfer/class_coverage" not in single and "one target class" in single["transfer/class_coverage_reason"]
    assert single["transfer/target_class_share"] == pytest.approx(2 / 3)


def test_diversity_equals_a_brute_force_computation():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(9, 4, generator=gen)
    assign = torch.tensor([0, 0, 0, 2, 2, 5, 7, 7, 7])  # cluster 5 has one sample: skipped, counted
    clusters = {}
    for row, c in zip(feats.tolist(), assign.tolist()):
        clusters.setdefault(c, []).append(row)
    per_cluster = []
    for rows in clusters.values():
        if len(rows) >= 2:
            pairs = list(itertools.combinations(rows, 2))
            per_cluster.append(sum(math.dist(a, b) for a, b in pairs) / len(pairs))
    value, counted, singletons = intra_cluster_diversity(feats, assign, feature_distances)
    assert value == pytest.approx(sum(per_cluster) / len(per_cluster), rel=1e-9)
    assert (counted, singletons) == (3, 1)
    assert intra_cluster_diversity(feats[:2], torch.tensor([0, 1]), feature_distances) == (None, 0, 2)


@pytest.mark.parametrize("spec, labeled, words", [
    ("lfw-faces:n=10", False, "has no labels"),
    ("mnist5k:n=25", True, "selects no classes"),
    ("fashion-mnist:classes=0-4:n=25", True, "not of fashion-mnist"),
])
def test_class_metrics_that_do_not_apply_say_why(spec, labeled, words):
    assert words in class_metrics_reason(DataSpec.parse(spec), "lenet-mnist5k", labeled)
    assert "no classifier head" in class_metrics_reason(TARGET, "inception-v3-compat", True)
    assert class_metrics_reason(TARGET, "lenet-mnist5k", True) is None


def test_unlabelled_and_not_few_shot_targets_give_reasons_not_errors():
    faces = DataSpec.parse("lfw-faces:n=10")
    m = score(load_images(faces, 28, 1).images.repeat(2, 1, 1, 1), faces)
    assert "has no labels" in m["transfer/class_metrics_reason"] and "transfer/target_class_share" not in m
    assert "transfer/memorised_share" in m and "transfer/fewshot_reason" not in m

    whole = DataSpec.parse("mnist5k:classes=5-9")
    m = score(load_images(SOURCE, 28, 1).images[:100], whole)
    assert "not few-shot" in m["transfer/fewshot_reason"]
    assert not any(k.startswith(("transfer/memorised", "transfer/diversity", "transfer/nn_")) for k in m)
    assert m["transfer/target_class_share"] < 0.3


def test_a_classifier_that_fails_on_the_targets_reals_gives_no_class_metrics():
    digits = DataSpec.parse("digits:classes=5-9:n=25")   # 8 px digits: lenet-mnist5k recognises ~69%
    m = score(load_images(digits, 28, 1).images, digits)
    assert m["transfer/classifier_real_accuracy"] < 0.9 and "recognises only" in m["transfer/class_metrics_reason"]
    assert "transfer/target_class_share" not in m


def test_a_target_with_no_held_out_images_and_one_class():
    every = DataSpec.parse("mnist5k:classes=5:n=500")     # all 500 fives
    m = score(load_images(every, 28, 1).images[:50].repeat(2, 1, 1, 1), every)
    assert "none held out" in m["transfer/memorisation_reason"] and "transfer/memorised_share" not in m
    assert "one target class" in m["transfer/class_coverage_reason"]
    assert m["transfer/classifier_real_accuracy"] > 0.95 and m["transfer/target_class_share"] > 0.95
    assert m["transfer/diversity"] == 0 and "transfer/diversity_real" not in m

    spread = score(load_images(every, 28, 1).images[:50], every)   # each sample its own shot: 50 singletons
    assert "transfer/diversity" not in spread and "two or more" in spread["transfer/diversity_reason"]
    assert (spread["transfer/diversity_clusters"], spread["transfer/diversity_singletons"]) == (0, 50)


def test_lpips_is_used_only_when_package_and_weights_are_local(monkeypatch, tmp_path):
    import importlib.util

    from ganlib import fewshot

    real_find_spec = importlib.util.find_spec

    def lpips_spec(spec):
        return lambda name, *a: spec if name == "lpips" else real_find_spec(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", lpips_spec(None))
    assert fewshot.lpips_distances() is None                       # no package
    monkeypatch.setattr(importlib.util, "find_spec", lpips_spec(object()))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert fewshot.lpips_distances() is None                       # a package but no AlexNet weights: no download
