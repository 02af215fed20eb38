"""Autoencoders beyond the SD VAE (issue 29): a 16-channel AutoencoderKL with a shift (FLUX, SD3),
AutoencoderDC (deterministic), AutoencoderKLQwenImage (per-channel config statistics), and
`extract --latent-norm channel`.

Each autoencoder is a small random-weight model of its diffusers class, saved with
`save_pretrained` and loaded back as a user's folder. Figures are checked against float64
closed forms of the autoencoder's own outputs.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from ditforge.data.autoencoder import (
    DiffusersDC,
    DiffusersKL,
    DiffusersQwenImage,
    LatentNorm,
    load_autoencoder,
    with_recorded_normalisation,
)
from ditforge.data.store import LatentStore, extract, finalize_store
from ditforge.data.store.format import map_shard
from ditforge.errors import UserError

diffusers = pytest.importorskip("diffusers")  # the `vae` extra

SIZE = 16  # image side; every test autoencoder downsamples by 2 -> 8x8 latents
SHIFT, SCALE = 3.0, 0.5  # the FLUX-like config: shift_factor 3.0, scaling_factor 0.5
DC_SCALE = 0.41407  # SANA's DC-AE f32c32


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("autoencoders")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 32), latent_channels=16, norm_num_groups=16, shift_factor=SHIFT, scaling_factor=SCALE,
    ).save_pretrained(root / "kl16")
    diffusers.AutoencoderDC(
        latent_channels=8, attention_head_dim=8, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(16, 32),
        decoder_block_out_channels=(16, 32), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)), scaling_factor=DC_SCALE,
    ).save_pretrained(root / "dc")
    diffusers.AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.3, -0.4], latents_std=[1.5, 2.0, 0.5, 4.0],
    ).save_pretrained(root / "qwen")
    return {name: str(root / name) for name in ("kl16", "dc", "qwen")}


def images(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, SIZE, SIZE, generator=g) * 2 - 1


def pixel_items(n, seed=0):
    rng = np.random.default_rng(seed)
    pixels = {f"img-{i}": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for i in range(n)}
    return [(k, i % 2) for i, k in enumerate(pixels)], pixels


def write_store(root, ae, items, load, **kw):
    extract(items, load, ae, root, batch_size=kw.pop("batch_size", 3), shard_size=kw.pop("shard_size", 4), **kw)
    return finalize_store(root, {"source": "test", "image_size": SIZE, "autoencoder": ae.describe(), "class_names": ["a", "b"]})


def unit(pixels):
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0


# -- each class, from its folder's config ----------------------------------------------------


def test_a_shifted_16_channel_kl_encodes_and_decodes_by_its_config_shift_and_scale(folders):
    ae = load_autoencoder(folders["kl16"], device="cpu")
    assert isinstance(ae, DiffusersKL) and ae.channels == 16 and ae.latent_shape(SIZE) == (16, 8, 8)
    d = ae.describe()
    assert (d["kind"], d["shift"], d["scale"], d.get("latent_norm", "scale")) == ("diffusers-kl", SHIFT, SCALE, "scale")
    x = images()
    mean, std = ae.encode(x)
    with torch.no_grad():
        dist = ae.vae.encode(x).latent_dist
    torch.testing.assert_close(mean.double(), (dist.mean.double() - SHIFT) * SCALE, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std.double(), dist.std.double() * SCALE, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        theirs = ae.vae.decode((mean.double() / SCALE + SHIFT).float()).sample.clamp(-1, 1)
    torch.testing.assert_close(ae.decode(mean), theirs, rtol=1e-5, atol=1e-5)
    assert load_autoencoder(d).describe() == d  # the record rebuilds it


def test_a_dc_autoencoder_folder_loads_as_one_deterministic(folders):
    ae = load_autoencoder(folders["dc"], device="cpu")
    assert isinstance(ae, DiffusersDC) and ae.means_only and ae.latent_shape(SIZE) == (8, 8, 8)
    assert ae.describe()["kind"] == "diffusers-dc" and ae.scale == DC_SCALE and ae.shift == 0.0
    x = images()
    mean, std = ae.encode(x)
    with torch.no_grad():
        z = ae.vae.encode(x).latent
        theirs = ae.vae.decode(z).sample.clamp(-1, 1)
    torch.testing.assert_close(mean.double(), z.double() * DC_SCALE, rtol=1e-6, atol=1e-6)
    assert not std.any()
    torch.testing.assert_close(ae.decode(mean), theirs, rtol=1e-5, atol=1e-5)


def test_a_qwen_image_vae_normalises_by_its_config_channel_statistics(folders):
    ae = load_autoencoder(folders["qwen"], device="cpu")
    assert isinstance(ae, DiffusersQwenImage) and ae.latent_shape(SIZE) == (4, 8, 8)
    m = torch.tensor([0.1, -0.2, 0.3, -0.4], dtype=torch.float64).view(4, 1, 1)
    s = torch.tensor([1.5, 2.0, 0.5, 4.0], dtype=torch.float64).view(4, 1, 1)
    x = images()
    mean, std = ae.encode(x)
    with torch.no_grad():
        dist = ae.vae.encode(x[:, :, None]).latent_dist
    torch.testing.assert_close(mean.double(), (dist.mean[:, :, 0].double() - m) / s, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std.double(), dist.std[:, :, 0].double() / s, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        theirs = ae.vae.decode((mean.double() * s + m).float()[:, :, None]).sample[:, :, 0].clamp(-1, 1)
    torch.testing.assert_close(ae.decode(mean), theirs, rtol=1e-5, atol=1e-5)


def test_a_folder_of_another_class_is_a_one_line_error(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(UserError, match="UNet2DModel; ditforge encodes with one of: AutoencoderKL, AutoencoderDC") as e:
        load_autoencoder(str(tmp_path / "unet"))
    assert "\n" not in str(e.value)


def test_records_written_before_shifts_mean_what_they_meant(folders):
    """An old record (kind diffusers-kl, a scale, no shift) is x = z * scale: shift 0, no statistics."""
    old = {"kind": "diffusers-kl", "id": folders["kl16"], "scale": 0.18215, "channels": 16, "in_channels": 3, "downsample": 2}
    ae = load_autoencoder(old, device="cpu")
    assert ae.norm == LatentNorm(0.0, 0.18215, "scale") and ae.shift == 0.0  # not the folder's shift_factor
    x = images(2)
    with torch.no_grad():
        z = ae.vae.encode(x).latent_dist.mean
    torch.testing.assert_close(ae.encode(x)[0], z * 0.18215)
    store = LatentStore(Path(__file__).parent / "data" / "store_v1")  # written by an earlier version
    assert store._channel is None and LatentNorm.from_record(store.autoencoder) == LatentNorm(0.0, 0.18215, "scale")


# -- stores --------------------------------------------------------------------------------


def test_a_shifted_store_records_the_shift_and_round_trips_as_the_vae_itself(folders, tmp_path):
    ae = load_autoencoder(folders["kl16"], device="cpu")
    items, pixels = pixel_items(5)
    manifest = write_store(tmp_path / "s", ae, items, pixels.__getitem__, dtype="float32")
    assert manifest["autoencoder"]["shift"] == SHIFT and manifest["autoencoder"]["scale"] == SCALE
    assert manifest["version"] == 2  # an earlier ditforge, which would ignore the shift, refuses the store
    store = LatentStore(tmp_path / "s")
    x = torch.stack([unit(pixels[k]) for k, _ in items])
    mean, std, _ = store.posterior(torch.arange(5), torch.zeros(5, dtype=torch.bool))
    with torch.no_grad():
        dist = ae.vae.encode(x).latent_dist
    torch.testing.assert_close(mean.double(), (dist.mean.double() - SHIFT) * SCALE, rtol=1e-5, atol=1e-5)
    decoded = load_autoencoder(store.autoencoder, device="cpu").decode(mean)  # what sample and eval decode with
    with torch.no_grad():
        theirs = ae.vae.decode(dist.mean).sample.clamp(-1, 1)
    torch.testing.assert_close(decoded, theirs, rtol=1e-4, atol=1e-4)


def test_a_dc_store_keeps_means_only_at_half_the_record_size_with_its_pixels(folders, tmp_path):
    ae = load_autoencoder(folders["dc"], device="cpu")
    items, pixels = pixel_items(5)
    manifest = write_store(tmp_path / "dc", ae, items, pixels.__getitem__, keep_pixels=True)
    tensors, _ = map_shard(tmp_path / "dc" / manifest["shards"][0]["file"])
    assert tuple(tensors["posterior"].shape[1:]) == (2, 1, 8, 8, 8)  # image and flip, the mean only
    assert tensors["posterior"][0].numel() * 2 == 2 * 8 * 8 * 8 * 2  # 2 KiB a record in float16: half of mean + logvar
    assert manifest["means_only"] and manifest["posterior_std_zero"] and manifest["version"] == 2
    store = LatentStore(tmp_path / "dc")
    assert store.deterministic
    x = torch.stack([unit(pixels[k]) for k, _ in items])
    flip = torch.tensor([False, True, False, True, False])
    z, _ = store.get_batch(torch.arange(5), flip)  # a training batch: the means, no noise
    want = ae.encode(torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x))[0]
    torch.testing.assert_close(z, want, rtol=1e-3, atol=2e-3)  # float16 storage
    assert torch.equal(store.pixels(torch.arange(5), flip)[1], torch.from_numpy(pixels["img-1"][:, ::-1].copy()).permute(2, 0, 1))


def _channel_stats_of_records(root):
    """float64 mean and population std per channel of the stored means (both views), from the shards."""
    store = LatentStore(root)
    n = len(store)
    views = [store.gather(torch.arange(n), torch.full((n,), bool(f)))[0].double() for f in (0, 1)]
    allm = torch.cat(views)  # (2N, C, h, w)
    return allm.mean(dim=(0, 2, 3)), allm.std(dim=(0, 2, 3), correction=0)


def test_channel_normalisation_is_the_records_own_statistics_applied_and_undone_exactly(folders, tmp_path):
    ae = load_autoencoder(folders["kl16"], device="cpu", latent_norm="channel")
    items, pixels = pixel_items(7)
    manifest = write_store(tmp_path / "c", ae, items, pixels.__getitem__)
    rec = manifest["autoencoder"]
    assert rec["latent_norm"] == "channel" and rec["shift"] == SHIFT and len(rec["channel_mean"]) == 16
    m, s = _channel_stats_of_records(tmp_path / "c")
    np.testing.assert_allclose(rec["channel_mean"], m.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(rec["channel_std"], s.numpy(), rtol=1e-12)
    store = LatentStore(tmp_path / "c")
    idx, flip = torch.arange(7), torch.zeros(7, dtype=torch.bool)
    stored, logvar, _ = store.gather(idx, flip)
    mean, std, _ = store.posterior(idx, flip)  # the model's inputs
    mc, sc = m.view(-1, 1, 1), s.view(-1, 1, 1)
    torch.testing.assert_close(mean.double(), (stored.double() - mc) / sc, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std.double(), (0.5 * logvar.double()).exp() / sc, rtol=1e-3, atol=1e-7)
    pooled = mean.double().permute(1, 0, 2, 3).reshape(16, -1)
    assert pooled.std(dim=1).mean().item() == pytest.approx(1.0, abs=0.3)  # about unit variance, per channel
    # every decode (sample, previews, eval) undoes exactly the record: z = (x s + m) / scale + shift
    decoder = load_autoencoder(store.autoencoder, device="cpu")
    with torch.no_grad():
        theirs = ae.vae.decode(((mean.double() * sc + mc) / SCALE + SHIFT).float()).sample.clamp(-1, 1)
    torch.testing.assert_close(decoder.decode(mean), theirs, rtol=1e-4, atol=1e-4)
    # `sample --vae FOLDER` swaps the weights, never the normalisation
    swapped = with_recorded_normalisation(folders["kl16"], store.autoencoder, device="cpu")
    assert swapped.norm == decoder.norm
    torch.testing.assert_close(swapped.decode(mean), decoder.decode(mean))
    # a training batch is the posterior sample of the stored records, normalised
    z, _ = store.get_batch(idx, flip, seed=5, position=0)
    from ditforge.data.store import sample_posterior

    (raw,) = sample_posterior([(stored, logvar, 0)], seed=5, position=0, global_batch=7)
    torch.testing.assert_close(z.double(), (raw.double() - mc) / sc, rtol=1e-6, atol=1e-6)


def test_a_resumed_channel_extraction_gives_the_same_statistics(folders, tmp_path):
    ae = load_autoencoder(folders["kl16"], device="cpu", latent_norm="channel")
    items, pixels = pixel_items(9)
    straight = write_store(tmp_path / "straight", ae, items, pixels.__getitem__)

    calls = []

    class Killed(Exception):
        pass

    def dies_at_seven(key):
        calls.append(key)
        if key == "img-7" and len(calls) < 10:
            raise Killed  # killed mid-extraction: the first shard of 4 written, not the rest
        return pixels[key]

    with pytest.raises(Killed):
        write_store(tmp_path / "resumed", ae, items, dies_at_seven)
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    resumed = write_store(tmp_path / "resumed", ae, items, dies_at_seven)
    assert resumed["autoencoder"] == straight["autoencoder"]  # to the last bit (math.fsum of the shards' float64 sums)


def test_channel_statistics_of_an_unfinished_normalisation_refuse_to_decode():
    with pytest.raises(UserError, match="no channel statistics yet"):
        LatentNorm(kind="channel").decode(torch.zeros(1, 4, 2, 2))


# -- sampling and evaluation decode what the record says -------------------------------------


def test_eval_decodes_a_channel_normalised_store_as_the_vae_itself(folders, tmp_path):
    from ditforge.evaluation.run_report import _decode_store

    ae = load_autoencoder(folders["dc"], device="cpu", latent_norm="channel")
    items, pixels = pixel_items(10)
    write_store(tmp_path / "e", ae, items, pixels.__getitem__, dtype="float32")
    train, held = _decode_store(str(tmp_path / "e"), torch.device("cpu"), progress=False)
    x = torch.stack([unit(pixels[k]) for k, _ in items])
    with torch.no_grad():
        theirs = ae.vae.decode(ae.vae.encode(x).latent).sample.clamp(-1, 1)
    everything = torch.cat([train.images, held.images])
    assert everything.shape == (10, 3, SIZE, SIZE)
    # each decoded image is the VAE's own reconstruction of one of the images (float32 store)
    dist = torch.cdist(everything.flatten(1), theirs.flatten(1))
    assert dist.min(dim=1).values.max().item() < 1e-3


# -- the patch size and the progress output ---------------------------------------------------


def test_a_patch_size_that_does_not_divide_the_latent_grid_names_the_sizes_that_do():
    from ditforge.train.trainer import check_patch

    check_patch("DiT-XL/2", (32, 8, 8), "features")  # DC-AE at 256 px: 8x8, patch 2 divides
    with pytest.raises(UserError) as e:
        check_patch("DiT-XL/4", (32, 6, 6), "features")  # DC-AE at 192 px
    msg = str(e.value)
    assert "\n" not in msg and "patch size 4 does not divide the 6x6 grid" in msg
    assert "patch sizes that do: 1, 2, 3, 6" in msg and "--model DiT-XL/2" in msg


def test_extract_and_bulk_sample_write_plain_lines_not_carriage_returns_to_a_file(folders, tmp_path, capsys):
    from ditforge.models import create_model
    from ditforge.sampling.bulk import sample_to_npz
    from ditforge.sampling.load import SamplingModel

    items, pixels = pixel_items(8)
    ae = load_autoencoder(folders["dc"], device="cpu")
    extract(items, pixels.__getitem__, ae, tmp_path / "p", batch_size=2, progress=True)
    torch.manual_seed(0)
    sm = SamplingModel(create_model("DiT-Ti/4", input_size=8, in_channels=1, num_classes=2), ["a", "b"])
    sample_to_npz(sm, tmp_path / "x.npz", 8, cfg_scale=1.0, steps=2, sampler="ddim", batch_size=2, shard_size=2, progress=True)
    err = capsys.readouterr().err  # pytest's capture is a file, not a terminal
    assert "\r" not in err
    assert "extract (rank 0): " in err and "sample: " in err  # the estimate lines, in images
    assert "images/s over the first images" in err


def test_extract_train_and_sample_on_a_channel_normalised_dc_store(folders, tmp_path):
    """The user's path on a DC-AE folder: `extract --latent-norm channel` (into a pipe: no carriage
    returns), `train` on the store (a preview decoded), `sample --vae` from the run."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    store, run = tmp_path / "store", tmp_path / "run"
    out = run_cli("extract", "--data", str(tmp_path / "imgs"), "--vae", folders["dc"], "--image-size", str(SIZE),
                  "--latent-norm", "channel", "--out", str(store), "--workers", "0")
    assert "\r" not in out.stderr and "8 records of (8, 8, 8)" in out.stdout
    manifest = json.loads((store / "manifest.json").read_text())
    rec = manifest["autoencoder"]
    assert (rec["kind"], rec["latent_norm"], manifest["means_only"]) == ("diffusers-dc", "channel", True)
    assert len(rec["channel_mean"]) == len(rec["channel_std"]) == 8
    run_cli("train", "--data", str(store), "--run-dir", str(run), "--steps", "2", "--model", "DiT-Ti/2", "--batch-size", "4",
            "--sample-every", "2", "--sample-steps", "2", "--ckpt-every", "2", "--log-every", "1", "--no-progress")
    assert (run / "samples" / "step-0000002.png").is_file()
    state = json.loads((run / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state["autoencoder"] == rec  # the checkpoint records what decodes its samples
    # --vae: the same weights from a folder, decoded with the recorded channel statistics
    run_cli("sample", str(run), "--classes", "0", "1", "--per-class", "1", "--steps", "2", "--vae", folders["dc"],
            "--out", str(tmp_path / "g.png"))
    assert np.asarray(Image.open(tmp_path / "g.png")).ndim == 3
