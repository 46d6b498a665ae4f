"""MAUVE (arXiv:2102.01454) in torch: the divergence curve, its area, k-means quantisation and the features."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from hf_decoding_ext.bench.mauve import (
    divergence_curve,
    kmeans,
    mauve,
    mauve_from_histograms,
    quantize,
    text_features,
)


def _blobs(n, dim, shift, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen) + shift


def test_histogram_mauve_against_the_closed_form():
    # identical histograms: every mixture equals both, KL = 0, the curve is the unit square's corner: area 1
    assert mauve_from_histograms([3, 1, 2], [3, 1, 2]) == pytest.approx(1.0, abs=1e-12)
    # disjoint supports: KL(Q||R_w) = -log(1 - w), KL(P||R_w) = -log w, so the curve is ((1 - w)^c, w^c)
    w = torch.linspace(1e-6, 1 - 1e-6, 25, dtype=torch.float64)
    x, y = (1 - w) ** 5, w ** 5
    xs = torch.cat([torch.tensor([0.0], dtype=torch.float64), y, torch.tensor([1.0], dtype=torch.float64)])
    ys = torch.cat([torch.tensor([1.0], dtype=torch.float64), x, torch.tensor([0.0], dtype=torch.float64)])
    expected = float(torch.trapezoid(ys, xs))
    assert mauve_from_histograms([1, 0], [0, 1]) == pytest.approx(expected, rel=1e-9)
    assert expected < 0.01
    # the curve: extremes (1, 0) and (0, 1), the second coordinate increasing with the mixture weight
    curve = divergence_curve([0.5, 0.3, 0.2], [0.2, 0.3, 0.5])
    assert curve.shape == (27, 2) and curve[0].tolist() == [1.0, 0.0] and curve[-1].tolist() == [0.0, 1.0]
    assert bool((curve[1:, 1] >= curve[:-1, 1]).all()) and bool((curve[1:, 0] <= curve[:-1, 0]).all())
    # a hand-computed point: w = 1/2 mixture, c = 1
    p, q = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    r = 0.5 * p + 0.5 * q
    kl_q = float((q[:1] * (q[:1] / r[:1]).log()).sum())
    kl_p = float((p * (p / r).log()).sum())
    mid = divergence_curve(p, q, scaling_factor=1.0, num_points=3)[2]
    torch.testing.assert_close(mid, torch.tensor([math.exp(-kl_q), math.exp(-kl_p)], dtype=torch.float64),
                               atol=1e-5, rtol=0)


def test_histogram_mauve_is_symmetric_and_monotone_under_mixing():
    p = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0], dtype=torch.float64)
    far = torch.tensor([0.0, 0.0, 0.0, 0.1, 0.9], dtype=torch.float64)
    scores = [mauve_from_histograms(p, (1 - a) * p + a * far) for a in (0.0, 0.1, 0.3, 0.6, 1.0)]
    assert scores[0] == pytest.approx(1.0)
    assert all(a > b for a, b in pairwise(scores)), scores
    assert mauve_from_histograms(p, far) == pytest.approx(mauve_from_histograms(far, p), rel=1e-9)


def test_feature_mauve_identical_disjoint_and_mixing():
    human = _blobs(300, 16, 0.0, 0)
    assert mauve(human, human.clone()).mauve == pytest.approx(1.0, abs=1e-9)
    assert mauve(human, _blobs(300, 16, 0.0, 1)).mauve > 0.8  # same distribution, another sample
    assert mauve(human, _blobs(300, 16, 6.0, 2)).mauve < 0.05  # disjoint
    scores = []
    for frac in (0.0, 0.3, 0.6, 1.0):  # the model sample drifts away from the human one
        n = int(300 * frac)
        scores.append(mauve(human, torch.cat([_blobs(300 - n, 16, 0.0, 3), _blobs(n, 16, 6.0, 4)])).mauve)
    assert all(a > b + 0.05 for a, b in pairwise(scores)), scores
    result = mauve(human, _blobs(300, 16, 0.0, 1), num_buckets=12)
    assert result.num_buckets == 12 and result.p_hist.sum().item() == pytest.approx(1.0)


def test_kmeans_recovers_separated_clusters_and_quantize_auto_buckets():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([c + 0.1 * torch.randn(40, 2, generator=gen) for c in centres])
    labels = kmeans(x, 3, seed=1)
    truth = torch.arange(3).repeat_interleave(40)
    # the same partition up to a relabelling
    assert all(len(set(labels[truth == c].tolist())) == 1 for c in range(3)) and len(set(labels.tolist())) == 3
    p_hist, q_hist = quantize(_blobs(50, 4, 0.0, 5), _blobs(70, 4, 0.0, 6))
    assert p_hist.numel() == 5 and q_hist.numel() == 5  # "auto": round(min(50, 70) / 10)
    assert quantize(_blobs(8, 4, 0.0, 5), _blobs(8, 4, 0.0, 6))[0].numel() == 2  # at least 2 buckets


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="differ in size"):
        mauve_from_histograms([1, 1], [1, 1, 1])
    with pytest.raises(ValueError, match="-1"):
        mauve_from_histograms([1, -1], [1, 1])
    with pytest.raises(ValueError, match="num_points"):
        divergence_curve([1, 1], [1, 1], num_points=0)
    with pytest.raises(ValueError, match="'many'"):
        mauve(_blobs(20, 4, 0, 0), _blobs(20, 4, 0, 1), num_buckets="many")
    with pytest.raises(ValueError, match="equal dim"):
        mauve(_blobs(20, 4, 0, 0), _blobs(20, 5, 0, 1))
    with pytest.raises(ValueError, match="`k`"):
        kmeans(_blobs(5, 2, 0, 0), 6)


def test_text_features_last_and_mean_pooling(tiny_model):
    rows = [[5, 6, 7, 8], [9, 10]]
    last = text_features(tiny_model, rows, pooling="last", batch_size=2)
    mean = text_features(tiny_model, rows, pooling="mean", batch_size=1)
    assert last.shape == mean.shape == (2, tiny_model.config.hidden_size)
    for i, r in enumerate(rows):  # padding does not leak into a row's features
        hidden = tiny_model(input_ids=torch.tensor([r]), output_hidden_states=True).hidden_states[-1][0]
        torch.testing.assert_close(last[i], hidden[-1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mean[i], hidden.mean(0), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="'max'"):
        text_features(tiny_model, rows, pooling="max")
