"""The latent pipeline: autoencoders, the latent store's writer and reader, resumable extraction.

The VAE is a small diffusers AutoencoderKL with random weights, saved with `save_pretrained`
and loaded back through `load_autoencoder(folder)`: the same `from_pretrained` call users run
with a hub id (no pretrained VAE installs offline).
"""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ditforge.data.autoencoder import DiffusersKL, IdentityAutoencoder, load_autoencoder
from ditforge.data.store import (
    LatentStore,
    LatentWriter,
    extract,
    finalize_store,
    rank_range,
    sample_posterior,
)
from ditforge.data.loader import InfiniteLoader, StoreSource
from ditforge.data.sources import center_crop_arr, open_image
from ditforge.errors import UnreadableImage, UserError

SIZE = 16  # image side; the test VAE downsamples by 2 -> latents (4, 8, 8)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    AutoencoderKL = pytest.importorskip("diffusers").AutoencoderKL  # the `vae` extra

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )
    folder = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ae(vae_folder):
    return load_autoencoder(str(vae_folder), device="cpu")


def make_items(n=23, bad=(5, 17), seed=0):
    """(key, label) items and an in-memory loader; keys in `bad` raise like a truncated file."""
    rng = np.random.default_rng(seed)
    pixels = {f"img-{i:03d}": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for i in range(n)}
    items = [(f"img-{i:03d}", i % 3) for i in range(n)]
    bad_keys = {f"img-{i:03d}" for i in bad}

    def load(key):
        if key in bad_keys:
            raise UnreadableImage(f"OSError: image file is truncated ({key})")  # as data.sources.open_image says it
        return pixels[key]

    return items, load, pixels


def unit(pixels):
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0


def meta_for(ae):
    return {"source": "test", "image_size": SIZE, "autoencoder": ae.describe(), "class_names": ["a", "b", "c"]}


def shard_bytes(root):
    return {p.name: p.read_bytes() for p in sorted((root / "shards").glob("*.safetensors"))}


# -- autoencoders --------------------------------------------------------------------------


def test_vae_encode_decode_shapes_and_scale(ae, vae_folder):
    assert isinstance(ae, DiffusersKL)
    d = ae.describe()
    assert d["kind"] == "diffusers-kl" and d["id"] == str(vae_folder.resolve())
    assert (d["scale"], d["channels"], d["downsample"]) == (0.18215, 4, 2)
    assert ae.latent_shape(SIZE) == (4, 8, 8)
    with pytest.raises(UserError, match="multiple"):
        ae.latent_shape(15)
    torch.manual_seed(1)
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    mean, std = ae.encode(x)
    assert mean.shape == std.shape == (2, 4, 8, 8) and mean.dtype == torch.float32
    with torch.no_grad():
        dist = ae.vae.encode(x).latent_dist
    torch.testing.assert_close(mean, dist.mean * 0.18215)
    torch.testing.assert_close(std, dist.std * 0.18215)
    assert not mean.requires_grad
    # decode divides by the scale first and returns [-1, 1]
    out = ae.decode(mean)
    assert out.shape == (2, 3, SIZE, SIZE) and out.min() >= -1 and out.max() <= 1
    with torch.no_grad():
        ref = ae.vae.decode(mean / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(out, ref)
    # an explicit scale overrides the config's
    half = DiffusersKL(str(vae_folder), scale=0.5, device="cpu")  # compared with CPU results: fp32, no TF32
    torch.testing.assert_close(half.encode(x)[0], dist.mean * 0.5)
    # describe() round trip: the manifest's record rebuilds the same autoencoder
    assert load_autoencoder(d).describe() == d
    assert load_autoencoder(half.describe()).scale == 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vae_on_cuda_under_autocast_matches_cpu(ae, vae_folder):
    gpu = load_autoencoder(str(vae_folder), device="cuda")
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    mean, std = gpu.encode(x)  # fp16 autocast on the GPU; results come back where x is, in float32
    assert mean.device.type == "cpu" and mean.dtype == std.dtype == torch.float32
    ref_mean, ref_std = ae.encode(x)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(std, ref_std, rtol=1e-2, atol=1e-3)
    assert gpu.decode(mean.cuda()).device.type == "cuda"


def test_identity_autoencoder():
    ident = load_autoencoder("identity:1")
    assert isinstance(ident, IdentityAutoencoder) and ident.latent_shape(8) == (1, 8, 8)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    mean, std = ident.encode(x)
    assert torch.equal(mean, x) and torch.equal(std, torch.zeros_like(x))
    assert torch.equal(ident.decode(x), x)
    assert load_autoencoder(ident.describe()).describe() == ident.describe() == {"kind": "identity", "channels": 1, "scale": 1.0, "downsample": 1}
    assert load_autoencoder({"kind": "identity"}).channels == 3
    with pytest.raises(UserError, match="expects images"):
        ident.encode(torch.zeros(1, 3, 8, 8))


def test_hub_id_offline_is_one_line_error_naming_vae_path(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(UserError) as e:
        load_autoencoder("ditforge-tests/no-such-vae")
    msg = str(e.value)
    assert "\n" not in msg and "'ditforge-tests/no-such-vae'" in msg and "--vae PATH" in msg
    with pytest.raises(UserError, match="does not exist"):
        load_autoencoder(str(tmp_path / "missing" / "vae"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a diffusers AutoencoderKL folder") as e:
        load_autoencoder(str(tmp_path / "empty"))
    assert "\n" not in str(e.value)


# -- writer and reader ---------------------------------------------------------------------


def write_store(root, mean, std, labels, dtype="float16", shard_size=4):
    """A finished one-rank store of records (n, 2, C, h, w)."""
    n = mean.shape[0]
    w = LatentWriter(root, shard_size=shard_size, num_items=n, dtype=dtype)
    w.add(torch.arange(n), labels, mean, std)
    w.close()
    finalize_store(root, {"source": "synthetic", "autoencoder": {"kind": "test"}, "class_names": ["x", "y"]})
    return LatentStore(root)


def test_store_round_trip_fp16_error_bounds(tmp_path):
    torch.manual_seed(0)
    n = 10
    mean = torch.randn(n, 2, 4, 8, 8) * 2  # scaled latents are O(1)
    # std over the SD VAE's whole range: logvar clamp [-30, 20], plus 2 ln 0.18215, and exact zeros
    logvar = torch.rand(n, 2, 4, 8, 8) * 50 - 30 + 2 * np.log(0.18215)
    std = (0.5 * logvar).exp()
    std[0, :, 0] = 0.0
    labels = torch.arange(n) % 2
    store = write_store(tmp_path / "f16", mean, std, labels)
    assert len(store) == n and store.latent_shape == (4, 8, 8) and store.manifest["dtype"] == "float16"
    for flip in (False, True):
        m, s, y = store.posterior(torch.arange(n), torch.full((n,), flip))
        k = int(flip)
        assert torch.equal(y, labels)
        err_m = (m - mean[:, k]).abs()
        # float16: half an ulp, 2**-11 relative (normal range) or 2**-25 absolute (subnormal)
        assert bool((err_m <= mean[:, k].abs() * 2**-11 + 2**-25).all())
        ref_s = std[:, k]
        assert torch.equal(s[0, 0], torch.zeros(8, 8))  # std 0 stays exactly 0
        nz = ref_s > 0
        rel_s = ((s - ref_s).abs() / ref_s.clamp_min(1e-30))[nz]
        lv = (2 * ref_s.log())[nz].abs()
        assert bool((rel_s <= lv * 2**-12 * 1.01 + 1e-6).all())  # logvar in float16: |logvar| 2**-12 relative
        small = nz & (ref_s <= 1)  # for std <= 1 the absolute error stays below 1.8e-4
        assert float((s - ref_s).abs()[small].max()) < 1.8e-4
        print(
            f"\nfp16 round trip (flip={flip}): mean max abs {err_m.max():.3g}, max rel {(err_m / mean[:, k].abs()).max():.3g}; "
            f"std max rel {rel_s.max():.3g} over std {ref_s[nz].min():.2g}..{ref_s.max():.2g}, "
            f"max abs where std <= 1: {(s - ref_s).abs()[small].max():.3g}"
        )
    # float32 stores both exactly (std through exp(log): float32 rounding only)
    store32 = write_store(tmp_path / "f32", mean, std, labels, dtype="float32")
    m, s, _ = store32.posterior(torch.arange(n), torch.zeros(n, dtype=torch.bool))
    assert torch.equal(m, mean[:, 0])
    torch.testing.assert_close(s, std[:, 0], rtol=1e-5, atol=0)


def test_posterior_samples_have_the_stored_mean_and_std(tmp_path):
    torch.manual_seed(0)
    mean = torch.randn(3, 2, 4, 8, 8)
    std = torch.rand(3, 2, 4, 8, 8) * 0.5 + 0.25
    store = write_store(tmp_path / "s", mean, std, torch.tensor([0, 1, 0]))
    m16, s16, _ = store.posterior(torch.tensor([1]), torch.tensor([True]))
    idx = torch.ones(2000, dtype=torch.int64)
    x, y = store.get_batch(idx, torch.ones(2000, dtype=torch.bool), seed=0)
    assert x.shape == (2000, 4, 8, 8) and x.dtype == torch.float32 and bool((y == 1).all())
    # 2000 draws: the sample mean is within 4 standard errors, the sample std within 10%
    assert bool(((x.mean(0) - m16[0]).abs() <= 4 * s16[0] / 2000**0.5).all())
    assert bool(((x.std(0) / s16[0] - 1).abs() < 0.1).all())
    # fresh noise at every visit, reproducible from (seed, position), the same as sample_posterior's
    a, _ = store.get_batch(torch.tensor([1, 1]), torch.tensor([True, True]), seed=5, position=8)
    b, _ = store.get_batch(torch.tensor([1, 1]), torch.tensor([True, True]), seed=5, position=8)
    c, _ = store.get_batch(torch.tensor([1, 1]), torch.tensor([True, True]), seed=5, position=9)
    assert torch.equal(a, b) and not torch.equal(a[0], a[1]) and not torch.equal(a, c)
    eps = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5 * 2**40 + 8))
    torch.testing.assert_close(a, m16 + s16 * eps)
    # a micro-batch takes its rows of the global batch's noise: the latents do not depend on the split
    mean, logvar, _ = store.gather(torch.tensor([0, 1, 2, 1]), torch.tensor([False, True, False, True]))
    (whole,) = sample_posterior([(mean, logvar, 0)], seed=2, position=3, global_batch=4)
    halves = sample_posterior([(mean[2:], logvar[2:], 2), (mean[:2], logvar[:2], 0)], seed=2, position=3, global_batch=4)
    assert torch.equal(torch.cat(halves[::-1]), whole)


def test_flip_choice_is_honoured(tmp_path):
    mean = torch.stack([torch.full((4, 4, 8, 8), 1.0), torch.full((4, 4, 8, 8), -1.0)], dim=1)  # flip half = -1
    mean += torch.arange(4.0)[:, None, None, None, None]
    store = write_store(tmp_path / "f", mean, torch.zeros_like(mean), torch.tensor([0, 1, 0, 1]))
    assert store.deterministic  # std all zero: no noise drawn
    idx = torch.tensor([3, 0, 2, 3, 1])
    flip = torch.tensor([True, False, True, False, True])
    x, y = store.get_batch(idx, flip)
    expected = torch.tensor([3 - 1.0, 0 + 1.0, 2 - 1.0, 3 + 1.0, 1 - 1.0])
    assert torch.equal(x[:, 0, 0, 0], expected) and torch.equal(y, torch.tensor([1, 0, 0, 1, 1]))
    # the store plugs into the project's resumable loader (its flips drawn per epoch)
    loader = InfiniteLoader(StoreSource(store), global_batch=4, seed=0, hflip=True)
    ((xb, yb),) = loader.next_step()
    idx4, flip4 = loader.indices(0, 4)
    assert torch.equal(xb, store.get_batch(idx4, flip4)[0]) and torch.equal(yb, store.labels[idx4])
    # and pickles as its folder (DataLoader workers map the shards anew)
    clone = pickle.loads(pickle.dumps(store))
    assert torch.equal(clone.get_batch(idx, flip)[0], x)


def test_store_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        LatentStore(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a latent store"):
        LatentStore(tmp_path / "empty")
    w = LatentWriter(tmp_path / "partial", num_items=1)
    w.add([0], [0], torch.zeros(1, 2, 1, 2, 2), torch.zeros(1, 2, 1, 2, 2))
    with pytest.raises(UserError, match="unfinished"):
        LatentStore(tmp_path / "partial")
    store = write_store(tmp_path / "ok", torch.zeros(6, 2, 1, 2, 2), torch.zeros(6, 2, 1, 2, 2), torch.zeros(6, dtype=torch.int64))
    manifest = store.manifest
    (tmp_path / "ok" / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        LatentStore(tmp_path / "ok")
    (tmp_path / "ok" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "ok" / manifest["shards"][1]["file"]).unlink()
    with pytest.raises(UserError, match="shard-00000-00001.safetensors.*missing"):
        LatentStore(tmp_path / "ok")
    with pytest.raises(IndexError):
        store.get_batch(torch.tensor([6]), torch.tensor([False]))


# -- extraction ----------------------------------------------------------------------------


def test_flip_record_equals_encoding_the_flipped_image(ae, tmp_path):
    items, load, pixels = make_items(n=6, bad=())
    extract(items, load, ae, tmp_path / "s", batch_size=4, shard_size=4)
    finalize_store(tmp_path / "s", meta_for(ae))
    store = LatentStore(tmp_path / "s")
    x = torch.stack([unit(pixels[k]) for k, _ in items])
    ref_mean, ref_std = ae.encode(x)
    ref_mean_f, ref_std_f = ae.encode(x.flip(-1))
    for flip, (rm, rs) in ((False, (ref_mean, ref_std)), (True, (ref_mean_f, ref_std_f))):
        m, s, y = store.posterior(torch.arange(6), torch.full((6,), flip))
        torch.testing.assert_close(m, rm, rtol=2e-3, atol=1e-4)  # float16 storage
        torch.testing.assert_close(s, rs, rtol=5e-3, atol=1e-5)
        assert y.tolist() == [0, 1, 2, 0, 1, 2]
    # the flipped image's latent is not the flipped latent: the VAE is not flip-equivariant
    assert not torch.allclose(ref_mean_f, ref_mean.flip(-1), atol=1e-3)


def test_resumed_extraction_equals_uninterrupted(ae, tmp_path):
    items, load, _ = make_items()
    whole = extract(items, load, ae, tmp_path / "whole", batch_size=3, shard_size=4)
    assert (whole["encoded"], whole["skipped"], whole["records"]) == (21, 2, 21)
    m_whole = finalize_store(tmp_path / "whole", meta_for(ae))

    calls = {"n": 0}

    def dying_load(key):  # the process "is killed" at the 14th image it reads
        calls["n"] += 1
        if calls["n"] == 14:
            raise RuntimeError("killed")
        return load(key)

    root = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="killed"):
        extract(items, dying_load, ae, root, batch_size=3, shard_size=4)
    assert not (root / "manifest.json").exists() and len(shard_bytes(root)) == 2  # 8 records saved, more lost
    writer = LatentWriter(root, num_items=len(items), shard_size=4, plan=json.loads((root / "shards" / "rank-00000.json").read_text())["plan"])
    assert writer.resume_position() == 9 and list(writer.done_indices()) == list(range(9))  # item 5 was skipped
    again = extract(items, load, ae, root, batch_size=3, shard_size=4, workers=2)
    assert again["resumed_at"] == 9 and again["encoded"] == 13 and again["skipped"] == 1
    m_again = finalize_store(root, meta_for(ae))
    assert shard_bytes(root) == shard_bytes(tmp_path / "whole")
    assert m_again == m_whole
    # the shards are ordinary safetensors files
    from safetensors.torch import load_file

    shard = load_file(root / "shards" / "shard-00000-00000.safetensors")
    assert shard["posterior"].shape == (4, 2, 2, 4, 8, 8) and shard["item"].tolist() == [0, 1, 2, 3]


def test_resume_refuses_other_inputs(ae, tmp_path):
    items, load, _ = make_items(n=8, bad=())
    with pytest.raises(RuntimeError):
        extract(items, lambda k: (_ for _ in ()).throw(RuntimeError("stop")) if k == "img-006" else load(k), ae, tmp_path, batch_size=2, shard_size=2)
    with pytest.raises(UserError, match="unfinished extraction with plan=.*rerun with the same inputs"):
        extract(items[::-1], load, ae, tmp_path, batch_size=2, shard_size=2)
    with pytest.raises(UserError, match="world_size"):
        extract(items, load, ae, tmp_path, batch_size=2, shard_size=2, rank=1, world_size=2)
    assert extract(items, load, ae, tmp_path, batch_size=2, shard_size=2)["resumed_at"] == 6


def test_two_ranks_write_disjoint_shards_and_cover_every_item_once(ae, tmp_path):
    items, load, _ = make_items()
    root = tmp_path / "two"
    assert [list(rank_range(23, r, 2)) for r in (0, 1)] == [list(range(0, 11)), list(range(11, 23))]
    s0 = extract(items, load, ae, root, batch_size=4, shard_size=4, rank=0, world_size=2)
    with pytest.raises(UserError, match="rank 1 of 2 has not finished"):
        finalize_store(root, meta_for(ae))
    s1 = extract(items, load, ae, root, batch_size=4, shard_size=4, rank=1, world_size=2)
    assert (s0["records"], s1["records"]) == (10, 11)
    names = sorted(shard_bytes(root))
    assert names == [f"shard-00000-0000{i}.safetensors" for i in range(3)] + [f"shard-00001-0000{i}.safetensors" for i in range(3)]
    manifest = finalize_store(root, meta_for(ae))
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 2, 4, 4, 3]  # full shards but the last of each rank
    store = LatentStore(root)
    readable = [i for i in range(23) if i not in (5, 17)]
    assert store.items.tolist() == readable  # every item once, in item-list order
    assert store.labels.tolist() == [i % 3 for i in readable]
    assert manifest["count"] == 21 and manifest["class_counts"] == [8, 8, 5]
    assert manifest["world_size"] == 2 and manifest["latent_shape"] == [4, 8, 8]
    assert [(s["file"], s["reason"]) for s in manifest["skipped"]] == [
        ("img-005", "OSError: image file is truncated (img-005)"),
        ("img-017", "OSError: image file is truncated (img-017)"),
    ]
    # the same records as one rank writes (batches differ: equal up to float rounding)
    extract(items, load, ae, tmp_path / "one", batch_size=4, shard_size=4)
    finalize_store(tmp_path / "one", meta_for(ae))
    one = LatentStore(tmp_path / "one")
    all_idx, no_flip = torch.arange(21), torch.zeros(21, dtype=torch.bool)
    torch.testing.assert_close(store.posterior(all_idx, no_flip)[0], one.posterior(all_idx, no_flip)[0], rtol=2e-3, atol=1e-4)


def test_finished_store_is_not_rewritten_by_accident(ae, tmp_path):
    items, load, _ = make_items(n=4, bad=())
    extract(items, load, ae, tmp_path, batch_size=4)
    finalize_store(tmp_path, meta_for(ae))
    with pytest.raises(UserError, match="finished latent store.*overwrite"):
        LatentWriter(tmp_path, num_items=4)
    with pytest.raises(UserError, match="finished latent store"):
        extract(items, load, ae, tmp_path, batch_size=4)
    summary = extract(items[:2], load, ae, tmp_path, batch_size=4, overwrite=True)
    assert summary["encoded"] == 2 and not (tmp_path / "manifest.json").exists()
    assert finalize_store(tmp_path, meta_for(ae))["count"] == 2 and len(LatentStore(tmp_path)) == 2


def test_unreadable_files_are_skipped_and_listed(ae, tmp_path):
    """Real files through PIL: a truncated PNG and a non-image are skipped with their reason."""
    src = tmp_path / "images"
    src.mkdir()
    rng = np.random.default_rng(0)
    files = []
    for i in range(5):
        path = src / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(path)
        files.append((str(path), i % 2))
    good = (src / "0.png").read_bytes()
    (src / "1.png").write_bytes(good[: len(good) // 2])  # truncated
    (src / "3.png").write_bytes(b"not an image")

    def load(path):
        return center_crop_arr(open_image(path).convert("RGB"), SIZE)

    summary = extract(files, load, ae, tmp_path / "store", batch_size=2)
    manifest = finalize_store(tmp_path / "store", {**meta_for(ae), "class_names": ["even", "odd"]})
    assert (summary["encoded"], summary["skipped"]) == (3, 2) and summary["images_per_s"] > 0
    assert [s["file"] for s in manifest["skipped"]] == [files[1][0], files[3][0]]
    assert all(s["reason"] and "\n" not in s["reason"] for s in manifest["skipped"])
    assert "UnidentifiedImageError" in manifest["skipped"][1]["reason"]
    assert manifest["count"] == 3 and LatentStore(tmp_path / "store").items.tolist() == [0, 2, 4]
    assert manifest["autoencoder"] == ae.describe() and manifest["record_fields"].keys() == {"posterior", "label", "item"}


def test_pixel_space_store_through_the_identity_autoencoder(tmp_path):
    items, load, pixels = make_items(n=5, bad=())
    ident = IdentityAutoencoder(3)
    extract(items, load, ident, tmp_path / "px", batch_size=2, dtype="float32")
    manifest = finalize_store(tmp_path / "px", {"autoencoder": ident.describe(), "class_names": ["a", "b", "c"]})
    store = LatentStore(tmp_path / "px")
    assert store.deterministic and manifest["posterior_std_zero"] and store.latent_shape == (3, SIZE, SIZE)
    x, _ = store.get_batch(torch.tensor([4, 1]), torch.tensor([True, False]))
    assert torch.equal(x[0], unit(pixels["img-004"]).flip(-1)) and torch.equal(x[1], unit(pixels["img-001"]))
    # images of another size are a loader error (fatal), not an unreadable file
    odd = dict(pixels, **{"img-003": np.zeros((SIZE, SIZE + 2, 3), np.uint8)})
    with pytest.raises(UserError, match="img-003.*18x16.*one size"):
        extract(items, odd.__getitem__, ident, tmp_path / "odd", batch_size=2)
    # nothing readable: no store
    def unreadable(key):
        raise UnreadableImage("UnidentifiedImageError: cannot identify image file")

    extract(items, unreadable, ident, tmp_path / "none", batch_size=2)
    with pytest.raises(UserError, match="no image could be encoded; all 5 were skipped"):
        finalize_store(tmp_path / "none", {})


def test_writer_keeps_pixels_for_every_record_or_none(tmp_path):
    mean, std = torch.zeros(2, 2, 4, 2, 2), torch.ones(2, 2, 4, 2, 2)
    pixels = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    w = LatentWriter(tmp_path / "a", num_items=6, shard_size=4)
    w.add([0, 1], [0, 0], mean, std, pixels)
    with pytest.raises(ValueError, match="pixels"):
        w.add([2, 3], [0, 0], mean, std)  # without, after records with
    with pytest.raises(ValueError, match="uint8"):
        w.add([2, 3], [0, 0], mean, std, pixels.float())
    w.add([2, 3], [0, 0], mean, std, pixels)
    w.add([4, 5], [1, 1], mean, std, pixels + 7)
    w.close()
    manifest = finalize_store(tmp_path / "a", {"class_names": ["a", "b"]})
    assert manifest["pixels_shape"] == [3, 16, 16]
    store = LatentStore(tmp_path / "a")
    assert torch.equal(store.pixels(torch.tensor([5, 0]), torch.tensor([1, 0]))[:, 0, 0, 0], torch.tensor([7, 0], dtype=torch.uint8))
