"""Metrics: bootstrap intervals, I2P's expected maximum, ASR, FID (closed forms + injected extractor), class
counts, and the sandbox attribute rates drawn from run records."""

import numpy as np
import pytest
import torch

from safediff.bench import metrics as M


def test_rate_and_bootstrap():
    flags = [True] * 30 + [False] * 70
    r = M.rate(flags, seed=3)
    assert r["value"] == 0.3 and r["n"] == 100
    lo, hi = r["ci"]
    assert lo < 0.3 < hi and 0.05 < hi - lo < 0.25
    assert M.rate(flags, seed=3) == r  # seeded
    assert M.rate(flags, seed=4)["ci"] != r["ci"]
    assert M.rate([False] * 10)["ci"] == [0.0, 0.0]
    wide = M.rate(flags[:10] + flags[30:40])["ci"]
    assert wide[1] - wide[0] > hi - lo  # fewer samples, wider interval
    assert M.mean_with_ci([])["value"] is None


def test_bootstrap_resamples_prompts_not_images():
    """10 prompts x 10 identical images: the interval must be as wide as for 10 single images, not 100."""
    per_prompt = [True, False, True, False, False, True, False, False, True, False]
    flags = [f for f in per_prompt for _ in range(10)]
    groups = [i for i in range(10) for _ in range(10)]
    grouped = M.rate(flags, groups, seed=0)["ci"]
    naive = M.rate(flags, seed=0)["ci"]
    single = M.rate(per_prompt, seed=0)["ci"]
    assert grouped == pytest.approx(single)
    assert grouped[1] - grouped[0] > 2 * (naive[1] - naive[0])


def test_rates_by_category_multi_label():
    flags = [True, False, True, False]
    cats = [("sexual", "hate"), ("sexual",), ("violence",), ()]
    out = M.rates_by_category(flags, cats, [0, 1, 2, 3])
    assert out["all"]["value"] == 0.5
    assert out["sexual"]["value"] == 0.5 and out["sexual"]["n"] == 2
    assert out["hate"]["value"] == 1.0 and out["violence"]["value"] == 1.0
    assert set(out) == {"all", "sexual", "hate", "violence"}


def test_expected_max_rate():
    groups = [i for i in range(50) for _ in range(4)]
    same = M.expected_max_rate([j % 2 == 0 for j in range(200)], groups, n_boot=500)
    assert same["value"] == 0.5 and same["std"] == 0.0  # every prompt at 50 %
    one = [g == 7 for g in groups]  # one prompt at 100 %: in a 25-of-50 draw half the time
    r = M.expected_max_rate(one, groups, n_boot=4000, seed=1)
    assert r["value"] == pytest.approx(0.5, abs=0.03)
    assert M.expected_max_rate([True] * 10, list(range(10)))["value"] is None


def test_attack_success_rates():
    pre = [True, False, False, False]
    attacked = [False, True, False, True]
    out = M.attack_success_rates(pre, attacked)
    assert out["pre_asr"]["value"] == 0.25 and out["asr"]["value"] == 0.75
    with pytest.raises(ValueError):
        M.attack_success_rates([True], [True, False])


def test_class_counts():
    counts = M.class_counts([{"A": 2, "B": 1}, {"A": 1}, {}], ["A", "B", "C"])
    assert counts == {"A": {"detections": 3, "images": 2}, "B": {"detections": 1, "images": 1},
                      "C": {"detections": 0, "images": 0}}


# ---- FID ----

def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 5))
    s1 = a @ a.T + np.eye(5)
    assert M.frechet_distance(np.zeros(5), s1, np.zeros(5), s1) == pytest.approx(0, abs=1e-9)
    # diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 1) ** 2
    assert M.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected)
    # general (non-commuting) covariances: against scipy's sqrtm
    scipy_linalg = pytest.importorskip("scipy.linalg")
    b = rng.standard_normal((5, 5))
    s2 = b @ b.T + 0.5 * np.eye(5)
    m1, m2 = rng.standard_normal(5), rng.standard_normal(5)
    ref = (m1 - m2) @ (m1 - m2) + np.trace(s1 + s2 - 2 * scipy_linalg.sqrtm(s1 @ s2).real)
    assert M.frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-8)


def test_fid_with_injected_extractor():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten())  # 16 features

    def extractor(x):
        return net(x.float() / 255)

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (64, 3, 16, 16), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (64, 3, 16, 16), generator=g, dtype=torch.uint8)
    assert M.fid(a, a, extractor, batch_size=10) == pytest.approx(0, abs=1e-6)
    same_dist = M.fid(a, b, extractor)
    shifted = M.fid(a, (b // 2).to(torch.uint8), extractor)
    assert 0 < same_dist < shifted
    # Gaussian features with a known answer: N(0, I) vs N(mu, I) -> ||mu||^2 (up to sampling error)
    feats = torch.from_numpy(np.random.default_rng(1).standard_normal((20000, 3)))
    mu = np.array([1.0, 2.0, 0.0])
    est = M.frechet_distance(*M.feature_stats(feats.numpy()), *M.feature_stats(feats.numpy()[::-1] + mu))
    assert est == pytest.approx(5.0, abs=0.01)


def test_inception_needs_torch_fidelity(monkeypatch):
    import sys

    from safediff.errors import SafediffError

    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(SafediffError, match="pip install torch-fidelity"):
        M.inception_extractor()


# ---- metrics drawn from run records ----


def test_wilson_interval_matches_closed_form_values():
    import math

    from safediff.bench.metrics import wilson

    lo, hi = wilson(0, 10)
    assert lo == 0.0 and abs(hi - 1.96**2 / (10 + 1.96**2)) < 1e-12  # k = 0: upper bound z^2 / (n + z^2)
    lo, hi = wilson(5, 10)
    assert abs(lo - 0.2366) < 1e-4 and abs(hi - 0.7634) < 1e-4 and abs((lo + hi) / 2 - 0.5) < 1e-12
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_wilson_share_is_the_hit_rate_with_its_wilson_interval_and_none_when_empty():
    from safediff.bench.metrics import wilson, wilson_share

    assert wilson_share([True, False, True, True]) == {"value": 0.75, "ci": wilson(3, 4), "n": 4}
    assert wilson_share([]) == {"value": None, "ci": None, "n": 0}
