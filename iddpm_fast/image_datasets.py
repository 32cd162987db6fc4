"""
Image data for training and evaluation, a replacement for
``improved_diffusion.image_datasets`` (same ``load_data`` keywords, same
batches) that needs neither MPI nor blobfile.

``data_dir`` names one of three kinds of source:

* a folder: every ``.png``, ``.jpg``, ``.jpeg`` and ``.gif`` file below it
  (recursively, sorted by name at every level, extensions matched in any
  case), each one resized and centre-cropped exactly as the original does:
  halve with a BOX filter while the short side is at least twice the target,
  resize with BICUBIC so that the short side equals the target, then crop the
  centre square.  Class labels, when asked for, come from the file name's
  prefix before its first ``"_"`` (``cat_001.png`` has class ``"cat"``); the
  sorted prefixes are numbered 0, 1, 2, ...
* a ``.npz`` file holding ``arr_0``, uint8 images shaped ``[N, H, W, C]``
  (``C`` = 1 or 3) or ``[N, H, W]`` (grayscale), and optionally ``arr_1``,
  ``N`` non-negative integer labels (this is what the original's sampling
  script writes).  Images that are not already ``image_size x image_size``
  go through the same resize and crop as folder images.
* ``"digits"`` (also ``""`` or ``None``): scikit-learn's ``load_digits()``,
  1,797 real 8x8 grayscale scans of handwritten digits, with their digit
  (0-9) as class label.  The grey levels 0..16 become uint8 as
  ``round(v / 16 * 255)``, so the data lie on 17 of the 256 levels.  The
  built-in name takes precedence over a folder called ``digits`` in the
  working directory; write ``./digits`` to load such a folder.

Every sample is a float32 array ``[C, image_size, image_size]`` with values
``uint8 / 127.5 - 1`` in ``[-1, 1]``, paired with a dict that holds
``"y"`` (an int64 scalar) when labels are loaded and is empty otherwise.
"""

import os
import warnings

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")
DIGITS_NAME = "digits"
DIGITS_SIZE = 8
DIGITS_NUM_IMAGES = 1797
DIGITS_TRAIN_SIZE = 1500
DIGITS_SPLIT_SEED = 0
SPLITS = ("train", "test", "all")


def load_data(
    *,
    data_dir,
    batch_size,
    image_size,
    class_cond=False,
    deterministic=False,
    random_flip=False,
    image_channels=None,
    num_workers=0,
    shard=None,
    num_shards=None,
    split="train",
    seed=None,
):
    """
    An endless stream of ``(images, cond)`` training batches.

    ``images`` is a float32 tensor ``[batch_size, C, image_size,
    image_size]`` in ``[-1, 1]``; ``cond`` is a dict, holding ``"y"``, an
    int64 tensor ``[batch_size]`` of class labels, when ``class_cond`` is
    True and empty otherwise.  Passes over the data repeat forever; each pass
    drops its last incomplete batch, and (unless ``deterministic``) visits
    the data in a fresh random order.

    The arguments are checked and the data opened when this function is
    called, so bad arguments raise here rather than at the first ``next()``.

    :param data_dir: an image folder, a ``.npz`` file, or ``"digits"``
        (``""`` and ``None`` also mean ``"digits"``); see the module doc.
    :param batch_size: images per batch; must not exceed the number of
        images in this process's shard.
    :param image_size: side, in pixels, of the square images produced.
    :param class_cond: if True, include class labels as ``cond["y"]``; an
        error is raised when the data have none.
    :param deterministic: if True, visit the data in its stored order on
        every pass instead of shuffling.
    :param random_flip: if True, mirror each image left-right with
        probability 1/2 (the original never flips).  The coin flips come
        from a numpy generator per loading process: seeded with ``seed`` in
        the main process (``num_workers=0``), and with the seed PyTorch hands
        each worker otherwise (itself derived from ``seed`` when one is
        given).  Without ``seed`` the flips are not reproducible.
    :param image_channels: 1 (grayscale) or 3 (RGB).  ``None`` keeps the
        data's own: 3 for folders (as the original), the array's channel
        count for ``.npz`` files, 1 for digits.  Folders and ``.npz`` data
        are converted when the other count is asked for (PIL's ``"L"`` /
        ``"RGB"`` conversion); digits accept only 1.
    :param num_workers: DataLoader worker processes.  The original always
        used 1; the default here, 0, loads in the calling process, which is
        fastest for small in-memory data.  Workers, when used, persist from
        one pass to the next.
    :param shard: which part of the data this process loads, taking every
        ``num_shards``-th image starting at index ``shard``.  Defaults to the
        ``torch.distributed`` rank when a process group is initialised,
        else 0.
    :param num_shards: number of parts; defaults to the ``torch.distributed``
        world size when initialised, else 1.
    :param split: for digits, ``"train"`` (1,500 images), ``"test"`` (the
        other 297, held out) or ``"all"``; see :func:`load_dataset`.  Folders
        and ``.npz`` files have no held-out part: ``"train"`` and ``"all"``
        both load everything, anything else is an error.
    :param seed: if given, makes the shuffling order (and flips) the same on
        every run: it seeds the ``torch.Generator`` of the sampler.  ``None``
        draws from PyTorch's global generator, as the original does.
    :return: a generator of ``(images, cond)`` pairs that never ends.
    """
    batch_size = _positive_int(batch_size, "batch_size")
    num_workers = int(num_workers)
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    shard, num_shards = _resolve_shard(shard, num_shards)
    dataset = _build_dataset(
        data_dir,
        image_size,
        class_cond=class_cond,
        image_channels=image_channels,
        split=split,
        shard=shard,
        num_shards=num_shards,
        random_flip=random_flip,
        flip_seed=seed,
    )
    if len(dataset) < batch_size:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {len(dataset)} images in "
            f"shard {shard} of {num_shards} of {_describe(data_dir)}; with incomplete "
            "batches dropped no batch could ever be produced"
        )
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(int(seed))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=not deterministic,
        num_workers=num_workers,
        drop_last=True,
        generator=generator,
        persistent_workers=num_workers > 0,
    )
    return _forever(loader)


def _forever(loader):
    while True:
        yield from loader


def load_dataset(
    data_dir, image_size, *, class_cond=False, image_channels=None, split="train", random_flip=False, seed=None
):
    """
    The whole (unsharded) dataset behind :func:`load_data`, e.g. to evaluate
    held-out likelihood on the digits test split or to learn the data's
    channel count (``dataset.image_channels``) and number of classes
    (``dataset.num_classes``, ``None`` without labels).

    Item ``i`` is ``(image, cond)``: a float32 numpy array ``[C, image_size,
    image_size]`` in ``[-1, 1]`` and a dict with ``"y"`` (int64 scalar) when
    ``class_cond`` is True.

    The digits splits are fixed: a permutation of the 1,797 indices drawn
    with ``numpy.random.default_rng(0)`` gives its first 1,500 entries to
    ``"train"`` and the remaining 297 to ``"test"``; each split keeps the
    images in their original order.  ``"all"`` is every image.

    :param data_dir: an image folder, a ``.npz`` file, or ``"digits"`` /
        ``""`` / ``None``.
    :param image_size: side, in pixels, of the square images produced.
    :param class_cond: load class labels (error if the data have none).
    :param image_channels: 1, 3, or ``None`` for the data's own count.
    :param split: ``"train"``, ``"test"`` (digits only) or ``"all"``.
    :param random_flip: mirror each item left-right with probability 1/2,
        as in :func:`load_data` (off by default: evaluation data unflipped).
    :param seed: seeds the flips drawn in the main process; in DataLoader
        workers the seed PyTorch gives each worker is used instead.
    :return: a ``torch.utils.data.Dataset`` (:class:`ImageDataset` for
        folders, :class:`ArrayDataset` otherwise).
    """
    return _build_dataset(
        data_dir,
        image_size,
        class_cond=class_cond,
        image_channels=image_channels,
        split=split,
        shard=0,
        num_shards=1,
        random_flip=random_flip,
        flip_seed=seed,
    )


def _build_dataset(
    data_dir, image_size, *, class_cond, image_channels, split, shard, num_shards, random_flip, flip_seed
):
    image_size = _positive_int(image_size, "image_size")
    if image_channels is not None:
        image_channels = _check_channels(image_channels)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    kind, path = _resolve_source(data_dir)
    extra = dict(image_channels=image_channels, random_flip=random_flip, flip_seed=flip_seed)

    if kind == "digits":
        images, labels = _load_digits(split, image_size, image_channels)
        return ArrayDataset(
            image_size,
            images,
            labels if class_cond else None,
            shard,
            num_shards,
            name="the digits dataset",
            num_classes=10 if class_cond else None,
            **extra,
        )

    if split not in ("train", "all"):
        raise ValueError(
            f"split={split!r} exists only for the built-in digits data; {path!r} has no "
            "held-out part, so use split='train' or 'all' (both load everything)"
        )

    if kind == "npz":
        images, labels = _load_npz(path)
        if class_cond and labels is None:
            raise ValueError(
                f"class_cond=True but the npz file {path!r} has no class labels (it needs an 'arr_1' array)"
            )
        return ArrayDataset(
            image_size,
            images,
            labels if class_cond else None,
            shard,
            num_shards,
            name=f"npz file {path!r}",
            **extra,
        )

    files = _list_image_files_recursively(path)
    if not files:
        raise FileNotFoundError(
            f"no images found under {path!r} (accepted extensions: "
            f"{', '.join('.' + e for e in IMAGE_EXTENSIONS)}, in any case)"
        )
    classes = _classes_from_names(files) if class_cond else None
    if image_channels is None:
        extra["image_channels"] = 3
    return ImageDataset(image_size, files, classes, shard, num_shards, **extra)


def _resolve_source(data_dir):
    """Return ``(kind, path)`` with kind "digits", "folder" or "npz"."""
    if data_dir is None:
        return "digits", None
    path = os.fspath(data_dir)
    if path in ("", DIGITS_NAME):
        return "digits", None
    if os.path.isdir(path):
        return "folder", path
    if os.path.isfile(path):
        if path.lower().endswith(".npz"):
            return "npz", path
        raise ValueError(
            f"data_dir {path!r} is a file but not a .npz archive; expected an image "
            f"folder, a .npz file or {DIGITS_NAME!r}"
        )
    raise FileNotFoundError(f"data_dir {path!r} does not exist")


def _describe(data_dir):
    kind, path = _resolve_source(data_dir)
    return "the digits dataset" if kind == "digits" else repr(path)


def _resolve_shard(shard, num_shards):
    distributed = dist.is_available() and dist.is_initialized()
    if shard is None:
        shard = dist.get_rank() if distributed else 0
    if num_shards is None:
        num_shards = dist.get_world_size() if distributed else 1
    shard, num_shards = int(shard), int(num_shards)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
    return shard, num_shards


def _positive_int(value, what):
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a positive integer, got {value!r}") from None
    if number != value or number <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return number


def _check_channels(image_channels):
    if image_channels not in (1, 3) or isinstance(image_channels, bool):
        raise ValueError(f"image_channels must be 1 (grayscale), 3 (RGB) or None, got {image_channels!r}")
    return int(image_channels)


def _list_image_files_recursively(data_dir):
    """
    Paths of the image files below ``data_dir``: entries are visited in
    sorted order, folders are entered where they appear, and a file counts
    as an image when its extension (after the last ``"."``) is one of
    :data:`IMAGE_EXTENSIONS` in any case.  Unlike the original, a folder
    whose name looks like an image (``x.png/``) is entered, not returned.

    :param data_dir: a folder path.
    :return: a list of paths, each ``os.path.join(data_dir, ...)``.
    """
    found = []
    for entry in sorted(os.listdir(data_dir)):
        full = os.path.join(data_dir, entry)
        if os.path.isdir(full):
            found.extend(_list_image_files_recursively(full))
        elif "." in entry and entry.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS:
            found.append(full)
    return found


def _classes_from_names(paths):
    """Class id of each path: its file name up to the first ``"_"``,
    numbered by sorted order of the distinct names."""
    names = [os.path.basename(p).split("_")[0] for p in paths]
    ids = {name: i for i, name in enumerate(sorted(set(names)))}
    return [ids[name] for name in names]


def _resize_center_crop(pil_image, resolution, channels):
    """
    The original's resize: BOX halving while the short side is at least
    ``2 * resolution``, BICUBIC to a short side of ``resolution``, conversion
    to ``"RGB"`` (channels 3) or ``"L"`` (channels 1), centre crop.

    :return: uint8 array ``[resolution, resolution, channels]``.
    """
    while min(pil_image.size) >= 2 * resolution:
        half = tuple(side // 2 for side in pil_image.size)
        pil_image = pil_image.resize(half, resample=Image.Resampling.BOX)
    scale = resolution / min(pil_image.size)
    target = tuple(round(side * scale) for side in pil_image.size)
    pil_image = pil_image.resize(target, resample=Image.Resampling.BICUBIC)
    arr = np.asarray(pil_image.convert("RGB" if channels == 3 else "L"))
    if arr.ndim == 2:
        arr = arr[:, :, None]
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return arr[top : top + resolution, left : left + resolution]


class _SampleMixin:
    """Flipping and the uint8 -> float conversion shared by the datasets."""

    random_flip = False
    flip_seed = None
    _rng = None
    _rng_key = None

    def _flip_rng(self):
        # One generator per loading process: a worker (fresh copy of the
        # dataset) seeds from the seed PyTorch gives it, the main process
        # from flip_seed.
        info = torch.utils.data.get_worker_info()
        key = None if info is None else info.seed
        if self._rng is None or self._rng_key != key:
            self._rng = np.random.default_rng(self.flip_seed if info is None else info.seed)
            self._rng_key = key
        return self._rng

    def _finish(self, arr, label):
        """uint8 ``[H, W, C]`` -> (float32 ``[C, H, W]`` in [-1, 1], cond)."""
        if self.random_flip and self._flip_rng().random() < 0.5:
            arr = arr[:, ::-1]
        out = arr.astype(np.float32) / 127.5 - 1
        cond = {}
        if label is not None:
            cond["y"] = np.array(label, dtype=np.int64)
        return np.ascontiguousarray(out.transpose(2, 0, 1)), cond


class ImageDataset(_SampleMixin, Dataset):
    """
    Image files resized and centre-cropped to ``resolution x resolution``
    (the original's class, same positional arguments).

    An unreadable file (corrupt, truncated, not an image) does not stop
    training: it is replaced by the next readable file in this shard, one
    warning is issued the first time this happens (in each loading
    process), and the path is added to ``skipped_files``.  Files are not
    checked up front, so that opening a large folder stays fast.

    :param resolution: output side in pixels.
    :param image_paths: list of file paths.
    :param classes: optional list of int class ids, one per path.
    :param shard: this process's part: every ``num_shards``-th path from
        index ``shard``.
    :param num_shards: number of parts.
    :param image_channels: 3 (``convert("RGB")``, the original) or 1
        (``convert("L")``).
    :param random_flip: mirror left-right with probability 1/2.
    :param flip_seed: seed of the flip generator in the main process.
    """

    def __init__(
        self,
        resolution,
        image_paths,
        classes=None,
        shard=0,
        num_shards=1,
        *,
        image_channels=3,
        random_flip=False,
        flip_seed=None,
    ):
        super().__init__()
        self.resolution = _positive_int(resolution, "resolution")
        self.image_channels = _check_channels(image_channels)
        image_paths = list(image_paths)
        if classes is not None:
            classes = [int(c) for c in classes]
            if len(classes) != len(image_paths):
                raise ValueError(f"got {len(classes)} classes for {len(image_paths)} image paths")
        self.num_classes = None if classes is None else (max(classes) + 1 if classes else 0)
        self.local_images = image_paths[shard::num_shards]
        self.local_classes = None if classes is None else classes[shard::num_shards]
        self.random_flip = bool(random_flip)
        self.flip_seed = flip_seed
        self.skipped_files = []
        self._unreadable = set()
        self._warned = False

    def __len__(self):
        return len(self.local_images)

    def __getitem__(self, idx):
        idx = self._check_index(idx)
        pil_image, idx = self._read(idx)
        arr = _resize_center_crop(pil_image, self.resolution, self.image_channels)
        label = None if self.local_classes is None else self.local_classes[idx]
        return self._finish(arr, label)

    def _check_index(self, idx):
        n = len(self.local_images)
        if not -n <= idx < n:
            raise IndexError(f"index {idx} out of range for {n} images")
        return idx % n

    def _read(self, idx):
        """Open the image at ``idx`` or, if it cannot be read, the next
        readable one; return ``(pil_image, index_used)``."""
        n = len(self.local_images)
        for step in range(n):
            j = (idx + step) % n
            path = self.local_images[j]
            if path in self._unreadable:
                continue
            try:
                with open(path, "rb") as f:
                    pil_image = Image.open(f)
                    pil_image.load()
                return pil_image, j
            except Exception as exc:  # any failure to decode this one file
                self._unreadable.add(path)
                self.skipped_files.append(path)
                if not self._warned:
                    self._warned = True
                    warnings.warn(
                        f"skipping unreadable image file {path!r} ({type(exc).__name__}: {exc}); "
                        "the next readable image is used instead, and further unreadable files "
                        "are skipped without a warning (see dataset.skipped_files)",
                        stacklevel=2,
                    )
        raise RuntimeError(f"none of the {n} image files in this dataset could be read, e.g. {self.local_images[0]!r}")


class ArrayDataset(_SampleMixin, Dataset):
    """
    Images held in memory as one uint8 array (``.npz`` files, digits).

    Images already ``resolution x resolution`` with the requested channel
    count are used as they are; others go through the same PIL resize,
    centre crop and channel conversion as folder images.

    :param resolution: output side in pixels.
    :param images: uint8 array ``[N, H, W, C]`` with ``C`` in {1, 3}, or
        ``[N, H, W]`` for grayscale.
    :param labels: optional ``N`` non-negative integer class labels.
    :param shard: this process's part: every ``num_shards``-th image from
        index ``shard``.
    :param num_shards: number of parts.
    :param image_channels: 1, 3, or ``None`` for the array's own count.
    :param random_flip: mirror left-right with probability 1/2.
    :param flip_seed: seed of the flip generator in the main process.
    :param name: how error messages refer to the data.
    :param num_classes: number of classes; defaults to ``max(labels) + 1``.
    """

    def __init__(
        self,
        resolution,
        images,
        labels=None,
        shard=0,
        num_shards=1,
        *,
        image_channels=None,
        random_flip=False,
        flip_seed=None,
        name="image array",
        num_classes=None,
    ):
        super().__init__()
        self.resolution = _positive_int(resolution, "resolution")
        images, labels = _check_arrays(images, labels, name)
        self.stored_channels = images.shape[-1]
        self.image_channels = self.stored_channels if image_channels is None else _check_channels(image_channels)
        if labels is not None and num_classes is None:
            num_classes = int(labels.max()) + 1 if len(labels) else 0
        self.num_classes = num_classes
        self.local_images = images[shard::num_shards]
        self.local_labels = None if labels is None else labels[shard::num_shards]
        self.random_flip = bool(random_flip)
        self.flip_seed = flip_seed
        self._ready = images.shape[1:] == (self.resolution, self.resolution, self.image_channels)

    def __len__(self):
        return len(self.local_images)

    def __getitem__(self, idx):
        arr = self.local_images[idx]
        if not self._ready:
            stored = arr[:, :, 0] if self.stored_channels == 1 else arr
            arr = _resize_center_crop(Image.fromarray(stored), self.resolution, self.image_channels)
        label = None if self.local_labels is None else self.local_labels[idx]
        return self._finish(arr, label)


def _check_arrays(images, labels, name):
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"{name}: images must be uint8, got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"{name}: images must be shaped [N, H, W, C] with C = 1 or 3, or [N, H, W]; got shape {images.shape}"
        )
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise ValueError(f"{name}: contains no images (shape {images.shape})")
    if labels is not None:
        labels = np.asarray(labels)
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name}: labels must be integers, got dtype {labels.dtype}")
        labels = labels.reshape(-1).astype(np.int64)
        if len(labels) != len(images):
            raise ValueError(f"{name}: {len(labels)} labels for {len(images)} images")
        if (labels < 0).any():
            raise ValueError(f"{name}: labels must be non-negative, got {labels.min()}")
    return images, labels


def _load_npz(path):
    """Return ``(arr_0, arr_1 or None)`` from a ``.npz`` file."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            images = archive["arr_0"] if "arr_0" in keys else None
            labels = archive["arr_1"] if "arr_1" in keys else None
    except Exception as exc:
        raise ValueError(f"could not read npz file {path!r}: {type(exc).__name__}: {exc}") from exc
    if images is None:
        raise ValueError(f"npz file {path!r} has no 'arr_0' image array (it holds {keys})")
    return images, labels


def _load_digits(split, image_size, image_channels):
    """Digits images (uint8 ``[N, image_size, image_size]``) and labels of
    one split."""
    if image_channels == 3:
        raise ValueError(
            "the digits dataset is grayscale: pass image_channels=1 (or None) instead of image_channels=3"
        )
    if image_size % DIGITS_SIZE:
        raise ValueError(
            f"the digits are {DIGITS_SIZE}x{DIGITS_SIZE}: image_size must be {DIGITS_SIZE} or a multiple "
            f"of it (nearest-neighbour upsampling), got {image_size}"
        )
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "the built-in digits dataset needs scikit-learn: pip install 'iddpm_fast[data]'"
        ) from exc
    digits = load_digits()
    images = np.rint(np.asarray(digits.images, dtype=np.float64) / 16 * 255).astype(np.uint8)
    labels = np.asarray(digits.target, dtype=np.int64)
    if split != "all":
        order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(images))
        part = order[:DIGITS_TRAIN_SIZE] if split == "train" else order[DIGITS_TRAIN_SIZE:]
        part = np.sort(part)
        images, labels = images[part], labels[part]
    if image_size != DIGITS_SIZE:
        side = (image_size, image_size)
        images = np.stack([np.asarray(Image.fromarray(im).resize(side, Image.Resampling.NEAREST)) for im in images])
    return images, labels
