"""Extraction sources: every common image format to RGB, image folders, local Hugging Face datasets."""

import numpy as np
import pytest
from PIL import Image

from ditforge.data.sources import list_hf_dataset, list_image_folder, list_items, load_rgb, to_rgb
from ditforge.errors import UnreadableImage


def test_every_mode_becomes_8bit_rgb(tmp_path):
    grey16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert grey16.mode.startswith("I;16")
    assert np.asarray(to_rgb(grey16)).tolist() == np.full((4, 4, 3), 255).tolist()  # scaled, not clipped to 255 by chance
    half16 = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert np.asarray(to_rgb(half16))[0, 0].tolist() == [128, 128, 128]
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red: white on white
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]
    assert to_rgb(Image.new("CMYK", (4, 4), (0, 255, 255, 0))).mode == "RGB"
    assert np.asarray(to_rgb(Image.new("L", (4, 4), 7)))[0, 0].tolist() == [7, 7, 7]


def test_folder_with_mixed_formats_and_nesting(tmp_path):
    (tmp_path / "a" / "deep" / "er").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    Image.new("RGB", (20, 30), (10, 20, 30)).save(tmp_path / "a" / "x.jpg")
    Image.new("RGBA", (16, 16), (0, 0, 0, 255)).save(tmp_path / "a" / "deep" / "er" / "y.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "b" / "z.webp")
    Image.new("CMYK", (16, 16)).save(tmp_path / "b" / "w.tiff")
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    il = list_image_folder(tmp_path)
    assert il.class_names == ["a", "b"] and il.labels == [0, 0, 1, 1, 1]
    ok = [il.load(item, 8, "center") for item in il.items if not item.endswith("broken.png")]
    assert all(a.shape == (8, 8, 3) and a.dtype == np.uint8 for a in ok)
    with pytest.raises(UnreadableImage, match="UnidentifiedImageError"):  # the decoder's error, named
        il.load(next(i for i in il.items if i.endswith("broken.png")), 8, "center")
    assert load_rgb(tmp_path / "a" / "x.jpg", 8, "resize").shape == (8, 8, 3)


def _hf_rows(tmp_path):
    datasets = pytest.importorskip("datasets")  # the `hf` extra

    images = [Image.new("RGB", (12, 12), (i * 40, 0, 0)) for i in range(4)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    return datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]}, features=features)


def test_local_hf_dataset_saved_to_disk_and_parquet(tmp_path):
    ds = _hf_rows(tmp_path)
    ds.save_to_disk(str(tmp_path / "saved"))
    il = list_items(f"hf:{tmp_path / 'saved'}")
    assert il.class_names == ["cat", "dog"] and il.labels == [0, 1, 0, 1]
    assert il.load(il.items[3], 8, "center").shape == (8, 8, 3)
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    il2 = list_hf_dataset(f"hf:{tmp_path / 'pq'}")
    assert il2.labels == [0, 1, 0, 1] and il2.class_names == ["cat", "dog"]
    assert np.array_equal(il2.load(1, 8, "center"), il.load(1, 8, "center"))


def test_hf_errors_are_one_line(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")  # the `hf` extra
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at import: patch the imported constants too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(ValueError, match="cannot load Hugging Face dataset 'no-such/dataset-xyz'"):
        list_hf_dataset("hf:no-such/dataset-xyz")
    ds = _hf_rows(tmp_path).remove_columns("label")
    ds.save_to_disk(str(tmp_path / "nolabel"))
    with pytest.raises(ValueError, match="no label column"):
        list_hf_dataset(f"hf:{tmp_path / 'nolabel'}")
