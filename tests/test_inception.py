"""The FID Inception-v3 and the sample metrics against the field's own code: pytorch-fid's
``InceptionV3`` and torch-fidelity's metric functions, on the same (seeded random) weights,
images, features and logits.

pytorch-fid's network is built offline: its weight download is replaced by a seeded random state
dict (He-scaled convolutions; BatchNorm scales in [0.5, 1.5], biases ~ N(0, 0.1²), running means
in [0, 0.2) and running variances in [0.5, 2), so a mis-mapped BatchNorm statistic shows), saved
with ``torch.save`` in the legacy (pre-zip) layout, whose size for this state dict is within 5 kB
of the published weights file's 95,628,359 bytes (the zip layout's is ~80 kB larger), and read
back by ``ddpm_jax.torch_checkpoint`` (no torch); test_pth_reader.py covers both layouts.

Tolerances:
- Inception outputs: float32 rounding through ~90 layers (XLA's and oneDNN's convolutions sum in
  different orders). Measured largest |difference| ≈ 2e-7 · max|output| on this machine; the
  bound is 1e-5 · max|output| (the message prints the measured value).
- The resize: one float32 ulp of [0, 1] values (1.2e-7); bound 1e-6.
- IS and KID: both sides compute in float64 from the same numbers: 1e-6 relative (measured
  ~1e-13).
"""

import json
import os
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pfi = pytest.importorskip("pytorch_fid.inception")
pytest.importorskip("torch_fidelity")

from ddpm_jax import torch_checkpoint  # noqa: E402
from ddpm_jax.metrics import fid, inception, inception_metrics  # noqa: E402
from helpers import REPO, cpu_env  # noqa: E402

OUTPUT_RTOL = 1e-5
BATCH = 4  # one batch size for every input shape: one compile of the network


def _random_state_dict(names_and_shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in names_and_shapes.items():
        if k.endswith("conv.weight"):
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        elif k.endswith("bn.weight"):
            sd[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith("bn.bias"):
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_mean"):
            sd[k] = 0.2 * torch.rand(v.shape, generator=g)
        elif k.endswith("running_var"):
            sd[k] = 0.5 + 1.5 * torch.rand(v.shape, generator=g)
        elif k == "fc.weight":
            sd[k] = torch.randn(v.shape, generator=g) / 2048 ** 0.5
        elif k == "fc.bias":
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        else:  # num_batches_tracked
            sd[k] = v.clone()
    return sd


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(pytorch-fid's InceptionV3 with random weights, its state dict, the .pth path, our variables)."""
    tmp = tmp_path_factory.mktemp("inception")
    holder = {}
    with pytest.MonkeyPatch.context() as mp:
        # fid_inception_v3() builds torchvision's Inception with the FID blocks, then loads the
        # state dict it downloads: hand it ours instead (the shapes come from the same module).
        def fake_download(url, *a, **k):
            assert url == pfi.FID_WEIGHTS_URL == inception.FID_WEIGHTS_URL
            return holder["sd"]

        mp.setattr(pfi, "load_state_dict_from_url", fake_download)
        shapes = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
        for name, block in [("Mixed_5b", pfi.FIDInceptionA(192, 32)), ("Mixed_5c", pfi.FIDInceptionA(256, 64)),
                            ("Mixed_5d", pfi.FIDInceptionA(288, 64)), ("Mixed_6b", pfi.FIDInceptionC(768, 128)),
                            ("Mixed_6c", pfi.FIDInceptionC(768, 160)), ("Mixed_6d", pfi.FIDInceptionC(768, 160)),
                            ("Mixed_6e", pfi.FIDInceptionC(768, 192)), ("Mixed_7b", pfi.FIDInceptionE_1(1280)),
                            ("Mixed_7c", pfi.FIDInceptionE_2(2048))]:
            setattr(shapes, name, block)
        holder["sd"] = _random_state_dict(shapes.state_dict())
        net = pfi.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    path = tmp / "random_fid_inception.pth"
    torch.save(holder["sd"], path, _use_new_zipfile_serialization=False)  # the published file's layout
    data_cache = tmp / "cache"  # DDPM_JAX_DATA of the CLI runs below: they find the conversion there
    cache = data_cache / "inception"
    weights = inception.load_weights(str(path), expected_sha256=None, cache=str(cache))
    return {"net": net, "sd": holder["sd"], "path": path, "weights": weights, "cache": cache, "data_cache": data_cache}


def _torch_outputs(ref, x):
    """pytorch-fid's pool3 (its forward: resize, 2x − 1, blocks) and fc(pool3), unbiased and not."""
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    if xt.shape[1] == 1:  # what PIL's convert('RGB') does for pytorch-fid's grayscale files
        xt = xt.repeat(1, 3, 1, 1)
    with torch.no_grad():
        pool3 = ref["net"](xt)[0][:, :, 0, 0]
        unbiased = pool3 @ ref["sd"]["fc.weight"].T
        logits = torch.nn.functional.linear(pool3, ref["sd"]["fc.weight"], ref["sd"]["fc.bias"])
    return {"pool3": pool3.numpy(), "logits_unbiased": unbiased.numpy(), "logits": logits.numpy()}


def _images(shape, seed):
    """Images that differ globally (colour, contrast, smooth shapes), so their pool3 features
    differ: i.i.d. pixel noise would average out in the global pool and give every image one feature."""
    rng = np.random.default_rng(seed)
    b, h, w, c = shape
    smooth = np.asarray(jax.image.resize(rng.uniform(-1, 1, (b, 4, 4, c)), (b, h, w, c), "linear"))
    x = rng.uniform(0.1, 0.9, (b, 1, 1, c)) + rng.uniform(0.1, 0.5, (b, 1, 1, 1)) * smooth + rng.uniform(-0.1, 0.1, shape)
    return np.clip(x, 0, 1).astype(np.float32)


@pytest.mark.parametrize("shape", [(BATCH, 28, 28, 1), (BATCH, 32, 32, 3), (BATCH, 299, 299, 3)],
                         ids=["28x28x1", "32x32x3", "299x299x3"])
def test_features_and_logits_equal_pytorch_fid(reference, shape):
    x = _images(shape, sum(shape))
    want = _torch_outputs(reference, x)
    got = inception.extract(x, reference["weights"], batch_size=BATCH, outputs=("pool3", "logits_unbiased", "logits"))
    for name in ("pool3", "logits_unbiased", "logits"):
        scale = float(np.abs(want[name]).max())
        diff = float(np.abs(got[name] - want[name]).max())
        assert got[name].shape == want[name].shape and got[name].dtype == np.float32
        assert diff <= OUTPUT_RTOL * scale, (f"{name}: max |jax - pytorch-fid| = {diff:.3g} = {diff / scale:.3g} x max|output| "
                                             f"(bound {OUTPUT_RTOL:g})")
        print(f"{shape} {name}: max|diff| {diff:.3g} ({diff / scale:.2g} of max|output| {scale:.3g})")
    # the features vary between images far beyond the tolerance, so the comparison is not vacuous
    spread = np.abs(want["pool3"] - want["pool3"].mean(0)).max()
    assert spread > 100 * OUTPUT_RTOL * np.abs(want["pool3"]).max(), spread


def test_a_mismapped_batchnorm_shows(reference):
    """The parity test would catch a swapped mean/variance in one BatchNorm (Mixed_7c's pool branch)."""
    x = _images((BATCH, 299, 299, 3), 0)
    good = inception.extract(x, reference["weights"], BATCH, outputs=("pool3",))["pool3"]
    v = reference["weights"].variables
    bn = v["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]
    swapped = {**v, "batch_stats": {**v["batch_stats"], "Mixed_7c": {**v["batch_stats"]["Mixed_7c"], "branch_pool": {
        "bn": {"mean": bn["var"], "var": bn["mean"]}}}}}
    bad = inception.extract(x, swapped, BATCH, outputs=("pool3",))["pool3"]
    assert np.abs(bad - good).max() > 100 * OUTPUT_RTOL * np.abs(good).max()


@pytest.mark.parametrize("size", [28, 32, 512])
def test_resize_equals_torch_interpolate(size):
    """pytorch-fid resizes with F.interpolate(bilinear, align_corners=False) and no antialiasing,
    then maps to 2x − 1: upsampling 28/32 → 299 and downsampling 512 → 299 agree to float32 rounding."""
    x = np.random.default_rng(size).uniform(size=(2, size, size, 3)).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    want = (2 * torch.nn.functional.interpolate(xt, size=(299, 299), mode="bilinear", align_corners=False) - 1)
    got = np.asarray(inception.preprocess(x))
    diff = float(np.abs(got - want.permute(0, 2, 3, 1).numpy()).max())
    assert diff <= 1e-6, f"max |preprocess - F.interpolate| = {diff:.3g}"


def test_weights_cache_and_refusals(reference, tmp_path):
    # the conversion was cached beside the weights, keyed by the file's SHA-256, and loads the same
    sha = reference["weights"].sha256
    cached = reference["cache"] / f"fid_inception_{sha[:16]}.npz"
    assert cached.is_file()
    again = inception.load_weights(str(reference["path"]), expected_sha256=None, cache=str(reference["cache"]))
    flat_a, flat_b = inception._flatten(reference["weights"].variables), inception._flatten(again.variables)  # noqa: SLF001
    assert set(flat_a) == set(flat_b) and all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)
    # a file that is not pytorch-fid's (by SHA-256) is refused by default
    with pytest.raises(inception.WeightsError, match="SHA-256"):
        inception.load_weights(str(reference["path"]), cache=str(tmp_path))
    # wrong shapes, unknown and missing names
    sd = dict(reference["sd"])
    sd["Mixed_6b.branch7x7_2.conv.weight"] = sd["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3)
    with pytest.raises(inception.WeightsError, match=r"Mixed_6b\.branch7x7_2\.conv\.weight has shape"):
        inception.variables_from_state_dict({k: v.numpy() for k, v in sd.items()})
    sd = {k: v.numpy() for k, v in reference["sd"].items() if k != "fc.bias"}
    sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    with pytest.raises(inception.WeightsError, match=r"AuxLogits\.fc\.weight.*fc/bias"):
        inception.variables_from_state_dict(sd)
    # a .pth whose pickle would run code: refused, not run
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"fc.weight": torch.zeros(1), "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(torch_checkpoint.UnsafePickleError, match="system"):
        inception.load_weights(str(tmp_path / "evil.pth"), expected_sha256=None, cache=str(tmp_path))
    assert not marker.exists()


def test_check_images_refuses_bad_input():
    ok = np.zeros((2, 8, 8, 3), np.float32)
    assert inception.check_images(ok) is ok
    assert inception.check_images(np.zeros((2, 8, 8), np.uint8)).shape == (2, 8, 8, 1)
    for bad, match in [(ok - 0.5, r"span \[-0\.5"), (ok + 1.01, r"\[0, 1\]"), (np.full((1, 4, 4, 3), np.nan, np.float32), "NaN"),
                       (np.zeros((2, 8, 8, 2), np.float32), "C = 1 or 3"), (np.zeros((2, 8, 8, 3), np.int32), "dtype")]:
        with pytest.raises((ValueError, TypeError), match=match):
            inception.check_images(bad)


# ------------------------------------------------------------------------------------------------
# The metrics against torch-fidelity (its metric functions on the same logits and features)
# ------------------------------------------------------------------------------------------------


def test_inception_score_equals_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = (3 * np.random.default_rng(0).normal(size=(503, 1008))).astype(np.float32)  # 503: unequal splits
    want = isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=True, rng_seed=2020)
    got = inception_metrics.inception_score(logits)
    assert got["mean"] == pytest.approx(want["inception_score_mean"], rel=1e-6)
    assert got["std"] == pytest.approx(want["inception_score_std"], rel=1e-6)
    # confident, diverse predictions score the number of classes; uniform ones score 1
    onehot = np.eye(1008, dtype=np.float32)[np.arange(1000) % 100] * 50
    assert inception_metrics.inception_score(onehot, shuffle=False)["mean"] == pytest.approx(100, rel=1e-6)
    assert inception_metrics.inception_score(np.zeros((100, 1008)))["mean"] == pytest.approx(1.0, abs=1e-12)


def test_kid_equals_torch_fidelity():
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(1)
    g = np.abs(rng.normal(size=(300, 64))).astype(np.float32)
    r = np.abs(rng.normal(size=(280, 64)) + 0.05).astype(np.float32)
    kw = dict(kid_subsets=20, kid_subset_size=200, kid_kernel="poly", kid_kernel_poly_degree=3,
              kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1, rng_seed=2020, verbose=False)
    # torch-fidelity computes in its features' dtype: given float64 it computes what this does
    want = kid_features_to_metric(torch.from_numpy(g.astype(np.float64)), torch.from_numpy(r.astype(np.float64)), **kw)
    got = inception_metrics.kernel_inception_distance(g, r, subsets=20, subset_size=200)
    assert got["mean"] == pytest.approx(want["kernel_inception_distance_mean"], rel=1e-6)
    assert got["std"] == pytest.approx(want["kernel_inception_distance_std"], rel=1e-6)
    want32 = kid_features_to_metric(torch.from_numpy(g), torch.from_numpy(r), **kw)["kernel_inception_distance_mean"]
    print(f"KID float64 {got['mean']:.10g}, torch-fidelity on float32 features {want32:.10g} "
          f"(relative {abs(want32 / got['mean'] - 1):.2g})")
    # the subset size is capped at the smaller set (torch-fidelity refuses instead)
    assert inception_metrics.kernel_inception_distance(g[:50], r, subsets=3)["subset_size"] == 50
    # identical distributions: KID ≈ 0 within its spread; shifted ones: clearly positive
    same = inception_metrics.kernel_inception_distance(g[:150], g[150:], subsets=20, subset_size=100)
    assert abs(same["mean"]) < 3 * same["std"] + 1e-12
    assert inception_metrics.kernel_inception_distance(g, g + 1.0, subsets=5, subset_size=100)["mean"] > 10 * same["std"]


def test_precision_recall_hand_count_and_torch_fidelity():
    from torch_fidelity.metric_prc import prc_features_to_metric

    # On a line, k = 1 (the nearest other point). Real points 0, 1, 2, 3: every radius is 1.
    # Generated 0.5, 2.5, 10, 11: radii 2, 2, 1, 1.
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    gen = np.array([[0.5], [2.5], [10.0], [11.0]])
    # precision: 0.5 and 2.5 lie within 1 of a real point, 10 and 11 do not -> 2/4.
    # recall: real 0, 1, 2, 3 each lie within 2 of 0.5 or 2.5 -> 4/4.
    got = inception_metrics.precision_recall(gen, real, k=1)
    assert (got["precision"], got["recall"]) == (0.5, 1.0)
    assert "VGG-16" in got["features"]
    rng = np.random.default_rng(2)
    g = rng.normal(size=(300, 32)).astype(np.float32)
    r = (rng.normal(size=(280, 32)) * 1.3 + 0.2).astype(np.float32)
    want = prc_features_to_metric(torch.from_numpy(g), torch.from_numpy(r), prc_neighborhood=3, prc_batch_size=10000,
                                  save_cpu_ram=False, verbose=False)
    got = inception_metrics.precision_recall(g, r, k=3, chunk=64)  # chunks that do not divide N
    assert got["precision"] == pytest.approx(want["precision"], abs=1e-6)
    assert got["recall"] == pytest.approx(want["recall"], abs=1e-6)


# ------------------------------------------------------------------------------------------------
# Statistics files and the CLI
# ------------------------------------------------------------------------------------------------


def test_statistics_files_in_pytorch_fid_layout(tmp_path):
    from pytorch_fid.fid_score import calculate_frechet_distance, compute_statistics_of_path

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(320, 16)) + 0.1
    ours = inception_metrics.statistics_from_features(a, "f" * 64, allow_small_n=True)
    path = str(tmp_path / "ours.npz")
    inception_metrics.save_statistics(path, ours)
    mu, sigma = compute_statistics_of_path(path, None, 50, 16, "cpu")  # pytorch-fid reads it as it is
    np.testing.assert_array_equal(mu, ours["mu"])
    np.testing.assert_array_equal(sigma, ours["sigma"])
    # a pytorch-fid / TTUR file (only mu and sigma) is pytorch-fid's extractor with its published weights
    theirs = str(tmp_path / "theirs.npz")
    np.savez_compressed(theirs, mu=b.mean(0), sigma=np.cov(b, rowvar=False))
    t = inception_metrics.load_statistics(theirs)
    assert (t["extractor_id"], t["extractor_version"], t["n"]) == (inception.EXTRACTOR_ID, inception.FID_WEIGHTS_SHA256, None)
    with pytest.raises(ValueError, match="different feature extractors"):  # our random weights vs the published ones
        fid.fid_from_statistics(inception_metrics.load_statistics(path), t)
    same = {**inception_metrics.load_statistics(path), "extractor_version": inception.FID_WEIGHTS_SHA256}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pytorch-fid passes sqrtm's deprecated disp=False
        assert fid.fid_from_statistics(same, t) == pytest.approx(
            calculate_frechet_distance(same["mu"], same["sigma"], t["mu"], t["sigma"]), rel=1e-6)
    # another dimension, another extractor, a foreign file
    np.savez(str(tmp_path / "d8.npz"), mu=np.zeros(8), sigma=np.eye(8))
    with pytest.raises(ValueError, match="different feature dimensions"):
        fid.fid_from_statistics(t, inception_metrics.load_statistics(str(tmp_path / "d8.npz")))
    pix = fid.compute_statistics(a, fid.PIXELS_ID, fid.PIXELS_VERSION)
    with pytest.raises(ValueError, match="different feature extractors"):
        fid.fid_from_statistics(pix, t)
    np.savez(str(tmp_path / "other.npz"), x=np.zeros(3))
    with pytest.raises(ValueError, match="expected 'mu' and 'sigma'"):
        inception_metrics.load_statistics(str(tmp_path / "other.npz"))
    with pytest.raises(ValueError, match=r"N > 2048"):
        inception_metrics.statistics_from_features(a, "f" * 64)


def test_sample_metrics_report():
    rng = np.random.default_rng(4)
    gen = {"pool3": np.abs(rng.normal(size=(120, 16))).astype(np.float32),
           "logits_unbiased": rng.normal(size=(120, 1008)).astype(np.float32)}
    real = np.abs(rng.normal(size=(130, 16))).astype(np.float32)
    floor = {"a": np.abs(rng.normal(size=(120, 16))).astype(np.float32), "b": real[:120]}
    with pytest.raises(ValueError, match=r"N > 2048 samples"):
        inception_metrics.sample_metrics(gen, "f" * 64, real=real)
    rep = inception_metrics.sample_metrics(gen, "f" * 64, real=real, floor=floor, allow_small_n=True)
    assert set(rep["fid"]) == {"vs_real"} and rep["kid"]["subset_size"] == 120 and rep["inception_score"]["splits"] == 10
    assert {"precision", "recall"} <= set(rep["precision_recall"]) and rep["floor"]["n"] == 120
    assert rep["fid"]["vs_real"] == pytest.approx(fid.fid_from_features(gen["pool3"], real))
    json.dumps(rep)  # JSON-ready


def test_evaluate_images_against_data_and_reference(reference, monkeypatch):
    """What experiments.evaluate runs: samples, N training images, N held-out images (the floor),
    optionally a reference statistics file, which must come from the same weights.

    A 2048-d FID costs two eigendecompositions and an SVD of 2048 x 2048 matrices (~10-30 s on two
    shared cores); the FIDs' values are test_fid.py's subject, so here they are taken on the first
    64 features, and this test checks what is compared with what."""
    exact = fid.frechet_distance
    monkeypatch.setattr(fid, "frechet_distance", lambda m1, s1, m2, s2: exact(m1[:64], s1[:64, :64], m2[:64], s2[:64, :64]))
    gen, real, held = _images((5, 32, 32, 3), 10), _images((9, 32, 32, 3), 11), _images((5, 32, 32, 3), 12)
    w = reference["weights"]
    with pytest.raises(ValueError, match=r"N > 2048 samples"):
        inception_metrics.evaluate_images(gen, w, real=real)
    rep = inception_metrics.evaluate_images(gen, w, real=real, held_out=held, batch_size=5, allow_small_n=True)
    assert set(rep["fid"]) == {"vs_real"} and rep["num_real"] == 5 and rep["floor"]["n"] == 5
    assert rep["weights_sha256"] == w.sha256 and rep["kid"]["subset_size"] == 5
    stats = inception_metrics.statistics_from_features(
        inception.extract(real, w, 5, outputs=("pool3",))["pool3"], w.sha256, allow_small_n=True)
    rep = inception_metrics.evaluate_images(gen, w, real=real, held_out=held, reference=stats, batch_size=5,
                                            allow_small_n=True)
    assert set(rep["fid"]) == {"vs_reference"} and "fid_real_vs_reference" in rep["floor"]
    assert rep["fid"]["vs_reference"] >= 0 and rep["floor"]["fid_real_vs_reference"] >= 0
    published = {**stats, "extractor_version": inception.FID_WEIGHTS_SHA256}  # e.g. TTUR's file, other weights
    with pytest.raises(ValueError, match="different feature extractors"):
        inception_metrics.evaluate_images(gen, w, real=real, reference=published, allow_small_n=True)
    wrong_d = {**stats, "mu": stats["mu"][:768], "sigma": stats["sigma"][:768, :768]}
    with pytest.raises(ValueError, match="different feature dimensions"):
        inception_metrics.evaluate_images(gen, w, real=real, reference=wrong_d, allow_small_n=True)
    line = inception_metrics.format_line(rep)
    assert "vs_reference" in line and "IS" in line and "KID" in line


def _cli(args, cache, timeout=600):
    return subprocess.run([sys.executable, "-m", "experiments.reference_stats", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=cpu_env(DDPM_JAX_DATA=str(cache)), timeout=timeout)


def test_reference_stats_cli_matches_pytorch_fid_on_an_image_folder(reference, tmp_path):
    from PIL import Image
    from pytorch_fid.fid_score import calculate_activation_statistics

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(5)
    files = []
    for i in range(6):
        files.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(files[-1])
    out = tmp_path / "stats.npz"
    weights = reference["path"]
    p = _cli(["--data_source", "folder", "--data_path", folder, "--inception_weights", weights, "--out", out,
              "--allow_other_weights", "--allow_small_n", "--batch_size", 4], reference["data_cache"])
    assert p.returncode == 0, p.stderr[-3000:]
    with np.load(out) as z:  # pytorch-fid's layout plus the extractor, its weights and the provenance
        mu, sigma = z["mu"], z["sigma"]
        assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and int(z["n"]) == 6
        assert str(z["extractor_version"]) == reference["weights"].sha256
        prov = json.loads(str(z["provenance"]))
        assert prov["command"].startswith("python -m experiments.reference_stats") and prov["data"]["split"] == "all"
    # pytorch-fid's own pipeline on the PNG files (ToTensor, resize, network, mean and covariance)
    want_mu, want_sigma = calculate_activation_statistics([str(f) for f in files], reference["net"], batch_size=6,
                                                          dims=2048, device="cpu", num_workers=0)
    scale = np.abs(want_mu).max()
    assert np.abs(mu - want_mu).max() <= OUTPUT_RTOL * scale, np.abs(mu - want_mu).max() / scale
    assert np.abs(sigma - want_sigma).max() <= 2 * OUTPUT_RTOL * scale * scale

    # bad input: one error line, exit 2, nothing written
    bad = [
        (["--inception_weights", weights, "--allow_small_n"], "SHA-256"),  # not pytorch-fid's weights file
        (["--inception_weights", weights, "--allow_other_weights"], "N > 2048"),
        (["--inception_weights", tmp_path / "missing.pth"], "does not exist"),
    ]
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    bad.append((["--inception_weights", tmp_path / "evil.pth", "--allow_other_weights"], "system"))
    for extra, match in bad:
        target = tmp_path / "refused.npz"
        p = _cli(["--data_source", "folder", "--data_path", folder, "--out", target, *extra], reference["data_cache"])
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and lines and lines[-1].startswith("error: ") and match in lines[-1], (extra, p.stderr[-2000:])
        assert not target.exists()
    assert not marker.exists()
