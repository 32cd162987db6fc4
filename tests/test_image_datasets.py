"""iddpm_fast.image_datasets: folders, .npz files and the built-in digits."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from iddpm_fast import image_datasets as imd
from iddpm_fast.image_datasets import (
    ArrayDataset,
    ImageDataset,
    _list_image_files_recursively,
    load_data,
    load_dataset,
)


def _save(path, arr, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path, format=fmt)
    return path


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _to_uint8(x):
    """Undo the [-1, 1] scaling of a float tensor/array."""
    return np.rint((np.asarray(x) + 1) * 127.5).astype(np.int64)


def _npz(tmp_path, images, labels=None, name="data.npz"):
    path = tmp_path / name
    if labels is None:
        np.savez(path, images)
    else:
        np.savez(path, images, labels)
    return path


# ---------------------------------------------------------------- folders


def test_listing_is_recursive_sorted_and_filters_extensions(tmp_path):
    for name in ["zz.jpeg", "b.PNG", "a.jpg", "sub/c.gif", "sub/a/x.Jpg", "notes.txt", "noext", "x.png.txt"]:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    found = [p[len(str(tmp_path)) + 1 :] for p in _list_image_files_recursively(str(tmp_path))]
    assert found == ["a.jpg", "b.PNG", "sub/a/x.Jpg", "sub/c.gif", "zz.jpeg"]


def test_class_labels_come_from_the_prefix(tmp_path):
    for name in ["dog_2.png", "cat_1.png", "cat_3.png", "bird.png"]:
        _save(tmp_path / name, _rgb(8, 8))
    ds = load_dataset(str(tmp_path), 8, class_cond=True)
    # files sorted: bird.png, cat_1, cat_3, dog_2; prefixes sorted: "bird.png" < "cat" < "dog"
    assert [int(ds[i][1]["y"]) for i in range(4)] == [0, 1, 1, 2]
    assert ds[0][1]["y"].dtype == np.int64
    assert ds.num_classes == 3
    assert load_dataset(str(tmp_path), 8)[0][1] == {}


def test_folder_batches_shape_dtype_range(tmp_path):
    _save(tmp_path / "a.png", _rgb(10, 12, 1))  # 12 wide, 10 high
    _save(tmp_path / "b.jpg", _rgb(30, 40, 2))
    _save(tmp_path / "c.gif", _rgb(16, 16, 3))
    x, cond = next(load_data(data_dir=tmp_path, batch_size=3, image_size=8, deterministic=True))
    assert x.shape == (3, 3, 8, 8) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and cond == {}


def test_box_halving_matches_hand_computation(tmp_path):
    base = np.random.default_rng(0).integers(0, 254, size=(8, 8, 3))
    offsets = np.array([[0, 2], [2, 0]])[:, :, None]  # each 2x2 block averages to base + 1
    img = (np.repeat(np.repeat(base, 2, 0), 2, 1) + np.tile(offsets, (8, 8, 1))).astype(np.uint8)
    _save(tmp_path / "a.png", img)
    x, _ = load_dataset(tmp_path, 8)[0]
    np.testing.assert_array_equal(_to_uint8(x), (base + 1).transpose(2, 0, 1))


def test_centre_crop_without_resampling(tmp_path):
    img = _rgb(10, 12)
    _save(tmp_path / "a.png", img)
    x, _ = load_dataset(tmp_path, 10)[0]
    # short side already 10: no resize, crop columns (12 - 10) // 2 = 1 .. 11
    np.testing.assert_array_equal(_to_uint8(x), img[:, 1:11].transpose(2, 0, 1))
    tall = _rgb(13, 10, 1)
    _save(tmp_path / "a.png", tall)
    x, _ = load_dataset(tmp_path, 10)[0]
    np.testing.assert_array_equal(_to_uint8(x), tall[1:11].transpose(2, 0, 1))  # rows (13 - 10) // 2 = 1 ..


def test_large_image_follows_box_then_bicubic_then_crop(tmp_path):
    img = _rgb(30, 40)
    _save(tmp_path / "a.png", img)
    pil = Image.fromarray(img).resize((20, 15), Image.Resampling.BOX)  # 30 >= 16: halve once
    pil = pil.resize((11, 8), Image.Resampling.BICUBIC)  # 20 * 8/15 = 10.67 -> 11
    expect = np.asarray(pil)[:, 1:9]
    x, _ = load_dataset(tmp_path, 8)[0]
    np.testing.assert_array_equal(_to_uint8(x), expect.transpose(2, 0, 1))


def test_grayscale_folder(tmp_path):
    gray = np.random.default_rng(1).integers(0, 256, size=(8, 8), dtype=np.uint8)
    _save(tmp_path / "a.png", gray)
    rgb = _rgb(8, 8, 2)
    _save(tmp_path / "b.png", rgb)
    ds1 = load_dataset(tmp_path, 8, image_channels=1)
    assert ds1.image_channels == 1
    np.testing.assert_array_equal(_to_uint8(ds1[0][0]), gray[None])
    np.testing.assert_array_equal(_to_uint8(ds1[1][0]), np.asarray(Image.fromarray(rgb).convert("L"))[None])
    ds3 = load_dataset(tmp_path, 8)  # natural for folders: RGB, like the original
    assert ds3.image_channels == 3
    np.testing.assert_array_equal(_to_uint8(ds3[0][0]), np.stack([gray] * 3))


def test_original_class_and_positional_signature(tmp_path):
    paths = [str(_save(tmp_path / f"{i}.png", _rgb(8, 8, i))) for i in range(4)]
    ds = ImageDataset(8, paths, [0, 1, 0, 1], 1, 2)
    assert len(ds) == 2 and ds.local_images == paths[1::2]
    x, cond = ds[0]
    assert x.shape == (3, 8, 8) and x.dtype == np.float32 and int(cond["y"]) == 1


# ---------------------------------------------------------------- npz


def test_npz_nhwc_with_labels(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5])
    path = _npz(tmp_path, images, labels)
    x, cond = next(load_data(data_dir=str(path), batch_size=5, image_size=8, class_cond=True, deterministic=True))
    assert x.shape == (5, 3, 8, 8) and x.dtype == torch.float32
    np.testing.assert_array_equal(_to_uint8(x), images.transpose(0, 3, 1, 2))
    assert cond["y"].dtype == torch.int64 and cond["y"].tolist() == labels.tolist()
    assert load_dataset(path, 8, class_cond=True).num_classes == 6


def test_npz_nhw_grayscale_and_channel_conversion(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8), dtype=np.uint8)
    path = _npz(tmp_path, images)
    ds = load_dataset(path, 8)
    assert ds.image_channels == 1
    np.testing.assert_array_equal(_to_uint8(ds[2][0]), images[2][None])
    ds3 = load_dataset(path, 8, image_channels=3)
    np.testing.assert_array_equal(_to_uint8(ds3[2][0]), np.stack([images[2]] * 3))


def test_npz_is_resized_like_a_folder(tmp_path):
    images = np.stack([_rgb(30, 40, 5), _rgb(30, 40, 6)])
    _save(tmp_path / "imgs" / "0.png", images[0])
    _save(tmp_path / "imgs" / "1.png", images[1])
    from_npz = load_dataset(_npz(tmp_path, images), 8, image_channels=1)
    from_folder = load_dataset(tmp_path / "imgs", 8, image_channels=1)
    for i in range(2):
        np.testing.assert_array_equal(from_npz[i][0], from_folder[i][0])


# ---------------------------------------------------------------- digits


def test_digits_splits_are_fixed_and_disjoint():
    full = load_dataset("digits", 8, class_cond=True, split="all")
    train = load_dataset("digits", 8, class_cond=True)
    test = load_dataset("digits", 8, class_cond=True, split="test")
    assert (len(full), len(train), len(test)) == (1797, 1500, 297)
    order = np.random.default_rng(0).permutation(1797)
    train_idx, test_idx = np.sort(order[:1500]), np.sort(order[1500:])
    assert not set(train_idx) & set(test_idx)
    np.testing.assert_array_equal(train.local_images, full.local_images[train_idx])
    np.testing.assert_array_equal(test.local_images, full.local_images[test_idx])
    np.testing.assert_array_equal(test.local_labels, full.local_labels[test_idx])
    again = load_dataset("digits", 8, split="test")
    np.testing.assert_array_equal(again.local_images, test.local_images)


def test_digits_values_labels_and_defaults():
    ds = load_dataset(None, 8, class_cond=True, split="all")
    assert ds.image_channels == 1 and ds.num_classes == 10
    x = np.stack([ds[i][0] for i in range(len(ds))])
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.float32
    levels = (x.astype(np.float64) + 1) * 127.5
    np.testing.assert_allclose(levels, np.rint(levels), atol=1e-4)
    expected_levels = [int(np.floor(v / 16 * 255 + 0.5)) for v in range(17)]  # 8 -> 127.5 -> 128
    assert np.unique(np.rint(levels)).astype(int).tolist() == expected_levels
    ys = [int(ds[i][1]["y"]) for i in range(len(ds))]
    assert sorted(set(ys)) == list(range(10))
    _, cond = next(load_data(data_dir="", batch_size=4, image_size=8, class_cond=True))
    assert cond["y"].shape == (4,)


def test_digits_upsampling_and_size_errors():
    small = load_dataset("digits", 8, split="test")
    big = load_dataset("digits", 16, split="test")
    np.testing.assert_array_equal(big[0][0], np.kron(small[0][0], np.ones((2, 2), np.float32)))
    with pytest.raises(ValueError, match="multiple"):
        load_dataset("digits", 12)
    with pytest.raises(ValueError, match="image_channels=1"):
        load_dataset("digits", 8, image_channels=3)


def test_digits_without_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'iddpm_fast\[data\]'"):
        load_dataset("digits", 8)


# ---------------------------------------------------------------- loading


def _indexed_npz(tmp_path, n):
    """n constant 4x4 images, image i filled with the value 10 * i."""
    images = (np.arange(n, dtype=np.uint8) * 10)[:, None, None].repeat(4, 1).repeat(4, 2)
    return _npz(tmp_path, images)


def _ids(x):
    return (_to_uint8(x)[:, 0, 0, 0] // 10).tolist()


def test_sharding_takes_every_other_image(tmp_path):
    path = _indexed_npz(tmp_path, 6)
    x, _ = next(load_data(data_dir=path, batch_size=3, image_size=4, deterministic=True, shard=1, num_shards=2))
    assert _ids(x) == [1, 3, 5]


def test_shards_default_to_torch_distributed(tmp_path, monkeypatch):
    path = _indexed_npz(tmp_path, 6)
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 2)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 3)
    x, _ = next(load_data(data_dir=path, batch_size=2, image_size=4, deterministic=True))
    assert _ids(x) == [2, 5]


def test_deterministic_order_repeats(tmp_path):
    data = load_data(data_dir=_indexed_npz(tmp_path, 7), batch_size=3, image_size=4, deterministic=True)
    # drop_last: each pass yields [0, 1, 2], [3, 4, 5]; image 6 is never seen
    assert [_ids(next(data)[0]) for _ in range(4)] == [[0, 1, 2], [3, 4, 5], [0, 1, 2], [3, 4, 5]]


def test_seed_makes_shuffling_reproducible(tmp_path):
    path = _indexed_npz(tmp_path, 20)

    def order(seed):
        data = load_data(data_dir=path, batch_size=10, image_size=4, seed=seed)
        return [_ids(next(data)[0]) for _ in range(4)]

    first = order(3)
    assert first == order(3)
    assert first != order(4)
    assert sorted(first[0] + first[1]) == list(range(20))
    assert first[:2] != first[2:]  # a new order on each pass


def test_random_flip_flips_some(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(32, 4, 4, 3), dtype=np.uint8)
    path = _npz(tmp_path, images)
    x, _ = next(load_data(data_dir=path, batch_size=32, image_size=4, deterministic=True, random_flip=True, seed=0))
    got = _to_uint8(x).transpose(0, 2, 3, 1)
    flipped = [bool((g == im[:, ::-1]).all()) for g, im in zip(got, images)]
    kept = [bool((g == im).all()) for g, im in zip(got, images)]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 0 < sum(flipped) < 32
    again, _ = next(load_data(data_dir=path, batch_size=32, image_size=4, deterministic=True, random_flip=True, seed=0))
    assert torch.equal(x, again)
    plain, _ = next(load_data(data_dir=path, batch_size=32, image_size=4, deterministic=True))
    np.testing.assert_array_equal(_to_uint8(plain), images.transpose(0, 3, 1, 2))
    ds = load_dataset(path, 4, random_flip=True, seed=0)
    assert torch.equal(torch.stack([torch.from_numpy(ds[i][0]) for i in range(32)]), x)


def test_worker_process(tmp_path):
    path = _indexed_npz(tmp_path, 8)
    data = load_data(data_dir=path, batch_size=4, image_size=4, deterministic=True, num_workers=1)
    assert [_ids(next(data)[0]) for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]


# ---------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_data(data_dir=missing, batch_size=1, image_size=8)


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match=r"no images found under .*\.png"):
        load_dataset(tmp_path, 8)


def test_class_cond_without_labels(tmp_path):
    path = _npz(tmp_path, np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="no class labels.*arr_1"):
        load_data(data_dir=path, batch_size=1, image_size=4, class_cond=True)


def test_batch_larger_than_shard(tmp_path):
    path = _indexed_npz(tmp_path, 5)
    with pytest.raises(ValueError, match=r"batch_size=3 is larger than the 2 images in shard 1 of 2"):
        load_data(data_dir=path, batch_size=3, image_size=4, shard=1, num_shards=2)


@pytest.mark.parametrize("size", [0, -8, 2.5])
def test_bad_image_size(size):
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        load_dataset("digits", size)


def test_other_bad_arguments(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="not a .npz"):
        load_dataset(tmp_path / "a.txt", 8)
    path = _npz(tmp_path, np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_dataset(path, 4)
    path = _npz(tmp_path, np.zeros((2, 4, 4, 2), np.uint8), name="two.npz")
    with pytest.raises(ValueError, match="C = 1 or 3"):
        load_dataset(path, 4)
    with pytest.raises(ValueError, match="only for the built-in digits"):
        load_dataset(_indexed_npz(tmp_path, 2), 4, split="test")
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("digits", 8, split="val")
    with pytest.raises(ValueError, match="image_channels must be"):
        load_dataset(tmp_path, 8, image_channels=2)
    with pytest.raises(ValueError, match="shard must be in"):
        load_data(data_dir="digits", batch_size=1, image_size=8, shard=2, num_shards=2)


def test_corrupt_file_is_skipped_with_a_warning(tmp_path):
    good = [_rgb(8, 8, i) for i in range(3)]
    _save(tmp_path / "a.png", good[0])
    (tmp_path / "b.png").write_bytes(b"this is not a png")
    _save(tmp_path / "c.png", good[1])
    (tmp_path / "d.jpg").write_bytes(b"\xff\xd8\xff truncated")
    _save(tmp_path / "e.png", good[2])
    ds = load_dataset(tmp_path, 8)
    with pytest.warns(UserWarning, match=r"unreadable image file .*b\.png") as record:
        got = [_to_uint8(ds[i][0]).transpose(1, 2, 0) for i in range(len(ds))]
    assert len(record) == 1
    expect = [good[0], good[1], good[1], good[2], good[2]]  # a bad file yields the next good one
    for g, e in zip(got, expect):
        np.testing.assert_array_equal(g, e)
    assert [p[-5:] for p in ds.skipped_files] == ["b.png", "d.jpg"]


def test_array_dataset_directly():
    images = np.random.default_rng(0).integers(0, 256, size=(4, 6, 6, 3), dtype=np.uint8)
    ds = ArrayDataset(6, images, np.arange(4), 0, 2)
    assert len(ds) == 2 and int(ds[1][1]["y"]) == 2
    assert imd.IMAGE_EXTENSIONS == ("jpg", "jpeg", "png", "gif")
