"""Image sources by name: the bundled MNIST sample, torchvision datasets, folders and .npz files.

Every source is a map-style dataset of ``(image float (C, H, W) in [0, 1], label or -1, id)``
where ``id`` is the item's position in the whole source. Order is stable, so an id is the row
of that image in every token store made from the source. ``splits`` maps split names to ids.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .config import DataConfig

ASSETS = Path(__file__).parent / "assets"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
T = TypeVar("T")
DEFAULT_DATA_ROOT = Path(os.environ.get("VQTOK_DATA", "~/.cache/vqtok/data")).expanduser()


class DataError(ValueError):
    """Input data that cannot be used; the message names the file or dataset."""


def holdout_splits(n: int) -> dict[str, np.ndarray]:
    """Every tenth image (id % 10 == 9) is validation: deterministic and spread evenly."""
    ids = np.arange(n, dtype=np.int64)
    return {"train": ids[ids % 10 != 9], "validation": ids[ids % 10 == 9]}


def _sha256_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class ImageSource(Dataset):
    """Base: subclasses fill ``splits``, ``name``, ``fingerprint`` and ``_load``."""

    name: str
    fingerprint: str
    splits: dict[str, np.ndarray]
    channels: int
    image_size: int

    def __len__(self) -> int:
        return sum(len(v) for v in self.splits.values())

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        images, labels = self.load_batch([index])
        return images[0], int(labels[0]), int(index)

    def load_batch(self, ids: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) float in [0, 1] and labels (B,) int64 for these ids."""
        raise NotImplementedError

    def split_ids(self, split: str) -> np.ndarray:
        if split not in self.splits:
            raise DataError(
                f"dataset {self.name} has no split '{split}'; it has {sorted(self.splits)}"
            )
        return self.splits[split]


class _Batches(Dataset):
    """One item per batch of ids, so DataLoader workers can assemble whole batches."""

    def __init__(self, source: ImageSource, batches: Sequence[np.ndarray]) -> None:
        self.source, self.batches = source, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.source.load_batch(self.batches[i])


def split_batches(ids: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]


def iterate_batches(
    source: ImageSource, ids: np.ndarray, batch_size: int, num_workers: int = 0,
    pin: bool = False, prefetch: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches in the order of ``ids``; see ``iterate_id_batches``."""
    yield from iterate_id_batches(source, split_batches(ids, batch_size), num_workers, pin,
                                  prefetch)


def iterate_id_batches(
    source: ImageSource, batches: Sequence[np.ndarray], num_workers: int = 0,
    pin: bool = False, prefetch: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) for each array of ids, in order.

    ``num_workers`` > 0 loads in DataLoader worker processes (for decoding image files);
    otherwise ``prefetch`` > 0 loads up to that many batches ahead in a background thread, so
    loading overlaps compute (tensor indexing releases the GIL). ``pin`` puts batches in
    page-locked memory for non-blocking copies to a GPU.
    """
    dataset = _Batches(source, batches)
    if num_workers > 0 or (pin and prefetch == 0):
        loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin,
                            prefetch_factor=max(prefetch, 2) if num_workers else None)
        try:
            yield from loader
        except DataError as exc:
            raise DataError(_worker_message(str(exc))) from None
        return
    items = (_pinned(dataset[i]) if pin else dataset[i] for i in range(len(dataset)))
    if prefetch > 0:
        yield from prefetched(items, prefetch)
    else:
        yield from items


def _worker_message(text: str) -> str:
    """A worker's DataError as torch re-raises it ("Caught DataError in DataLoader worker
    process 0.", then the worker's traceback) back to its own one-line message, which names
    the file."""
    if not text.startswith("Caught DataError"):
        return text
    last = text.rstrip().splitlines()[-1]
    _, sep, message = last.partition("DataError: ")
    return message if sep else last


def _pinned(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch[0].pin_memory(), batch[1].pin_memory()


_DONE = object()


def prefetched(items: Iterator[T], depth: int) -> Iterator[T]:
    """``items``, produced up to ``depth`` ahead by a background thread.

    Errors in the producer are raised here, at the item where they happened; closing the
    generator early stops the producer within a fraction of a second.
    """
    box: queue.Queue[tuple[object, BaseException | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[object, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                box.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put((_DONE, exc))
            return
        put((_DONE, None))

    worker = threading.Thread(target=produce, name="vqtok-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = box.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        worker.join()


class ArraySource(ImageSource):
    """Images held in memory as one uint8 (N, C, H, W) tensor: batches are a single index."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        splits: dict[str, np.ndarray],
        name: str,
        fingerprint: str,
        cfg: DataConfig,
    ) -> None:
        self.name, self.fingerprint, self.splits = name, fingerprint, splits
        self.channels, self.image_size = cfg.channels, cfg.image_size
        self.images = _conform(images, cfg, name)
        self.labels = labels.long()

    def load_batch(self, ids: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(np.array(ids, dtype=np.int64))
        return self.images[idx].float().div_(255), self.labels[idx]


def _conform(images: torch.Tensor, cfg: DataConfig, where: str) -> torch.Tensor:
    """Convert uint8 (N, C, H, W) to the configured channels and size (resize + centre crop)."""
    images = _match_channels(images, cfg.channels, where)
    h, w = images.shape[-2:]
    if (h, w) == (cfg.image_size, cfg.image_size):
        return images.contiguous()
    if cfg.resize == "error":
        raise DataError(
            f"{where}: images are {h}x{w} but the config wants {cfg.image_size}x{cfg.image_size}"
            " and data.resize is 'error'; set data.resize: resize or data.image_size"
        )
    from torchvision.transforms.v2 import functional as TF  # slow to import; rarely needed

    out = []
    for start in range(0, images.shape[0], 4096):
        part = TF.resize(images[start : start + 4096], cfg.image_size, antialias=True)
        out.append(TF.center_crop(part, cfg.image_size))
    return torch.cat(out).contiguous()


def _match_channels(images: torch.Tensor, channels: int, where: str) -> torch.Tensor:
    have = images.shape[1]
    if have == channels:
        return images
    if have == 4:  # drop alpha, then convert as RGB
        images, have = images[:, :3], 3
        if channels == 3:
            return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1)
    if have == 3 and channels == 1:
        from torchvision.transforms.v2 import functional as TF

        return TF.rgb_to_grayscale(images)
    raise DataError(f"{where}: images have {have} channels and the config wants {channels}")


# --- IDX files (MNIST, Fashion-MNIST) -------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format): big-endian header, then raw uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX uint8 file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DataError(f"{path}: truncated or oversized IDX file (header says {dims})")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(root: Path, folder: str, stem: str) -> Path | None:
    for base in (root, root / folder / "raw", root / folder):
        for name in (stem + ".gz", stem):
            if (base / name).is_file():
                return base / name
    return None


def _idx_source(name: str, folder: str, root: Path, cfg: DataConfig) -> ArraySource:
    """train ids 0..59999, test ids 60000..; files are looked up first, downloaded second."""
    stems = [s for pair in IDX_FILES.values() for s in pair]
    paths = [_find_idx(root, folder, s) for s in stems]
    if any(p is None for p in paths):
        _download_torchvision(name, root)
        paths = [_find_idx(root, folder, s) for s in stems]
    missing = [s for s, p in zip(stems, paths, strict=True) if p is None]
    if missing:
        raise DataError(f"{name}: {missing[0]}(.gz) not found under {root}")
    arrays = [read_idx(p) for p in paths]  # type: ignore[arg-type]
    images = np.concatenate([arrays[0], arrays[2]])[:, None]
    labels = np.concatenate([arrays[1], arrays[3]])
    n_train = len(arrays[0])
    ids = np.arange(len(images), dtype=np.int64)
    splits = {"train": ids[:n_train], "test": ids[n_train:]}
    return ArraySource(
        torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), splits,
        name, _sha256_files(paths), cfg,  # type: ignore[arg-type]
    )


def _download_torchvision(name: str, root: Path) -> None:
    """Fetch through torchvision; offline this fails and the caller reports what is missing."""
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[name]
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as exc:  # noqa: BLE001 - any network failure means "not available"
        raise DataError(
            f"{name}: files not under {root} and download failed ({type(exc).__name__}); "
            "pass --data-root pointing at a folder holding the IDX .gz files"
        ) from None


def bundled_mnist_sample(cfg: DataConfig) -> ArraySource:
    """The MNIST test split shipped in the package: 9,000 train / 1,000 validation."""
    folder = ASSETS / "mnist"
    img_path = folder / "t10k-images-idx3-ubyte.gz"
    lbl_path = folder / "t10k-labels-idx1-ubyte.gz"
    images, labels = read_idx(img_path), read_idx(lbl_path)
    return ArraySource(
        torch.from_numpy(images[:, None].copy()),
        torch.from_numpy(labels.astype(np.int64)),
        holdout_splits(len(images)),
        "mnist-sample",
        _sha256_files([img_path, lbl_path]),
        cfg,
    )


# --- CIFAR-10 (binary version: raw bytes, nothing to unpickle) -------------------------------

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"


def _cifar10(root: Path, cfg: DataConfig) -> ArraySource:
    folder = root / "cifar-10-batches-bin"
    files = [folder / f"data_batch_{i}.bin" for i in range(1, 6)] + [folder / "test_batch.bin"]
    if not all(f.is_file() for f in files):
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(CIFAR_URL, str(root), md5=CIFAR_MD5)
        except Exception as exc:  # noqa: BLE001
            raise DataError(
                f"cifar10: {folder} incomplete and download failed ({type(exc).__name__}); "
                "pass --data-root pointing at a folder holding cifar-10-batches-bin/"
            ) from None
    records = []
    for f in files:
        raw = np.fromfile(f, dtype=np.uint8)
        if raw.size % 3073:
            raise DataError(f"{f}: not a CIFAR-10 binary batch (size {raw.size})")
        records.append(raw.reshape(-1, 3073))
    data = np.concatenate(records)
    images = data[:, 1:].reshape(-1, 3, 32, 32)
    labels = data[:, 0].astype(np.int64)
    ids = np.arange(len(data), dtype=np.int64)
    n_train = sum(len(r) for r in records[:5])
    splits = {"train": ids[:n_train], "test": ids[n_train:]}
    return ArraySource(
        torch.from_numpy(images.copy()), torch.from_numpy(labels), splits,
        "cifar10", _sha256_files(files), cfg,
    )


# --- .npz arrays ------------------------------------------------------------------------------


LABEL_MAX = 2**31 - 1  # token stores keep labels as int32; -1 means "no label"


def _class_ids(labels: np.ndarray, path: Path) -> np.ndarray:
    """Labels as int64 class ids, or a DataError naming the file and the first bad entry
    (strings, NaN, fractions and ids out of -1..2**31-1 would fail later, far from here)."""
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{path}: 'labels' must be whole class ids; entry {i} is "
                            f"{labels[i]!r}; store -1 for an image without a label")
    elif labels.dtype.kind not in "iub":
        raise DataError(f"{path}: 'labels' must be integer class ids, got dtype {labels.dtype};"
                        " map class names to 0, 1, 2, ... before saving")
    ids = labels.astype(np.int64)
    bad = (ids < -1) | (ids > LABEL_MAX)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: 'labels' entry {i} is {ids[i]}; class ids must be 0 to "
                        f"{LABEL_MAX} (-1 for no label)")
    return ids


def _npz(path: Path, cfg: DataConfig) -> ArraySource:
    if path.is_dir():
        raise DataError(f"npz:{path}: is a folder; use imagefolder:{path} for folders of images")
    if not path.is_file():
        raise DataError(f"npz:{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive:
                raise DataError(f"{path}: no array named 'images' (found {list(archive)})")
            images = np.asarray(archive["images"])
            labels = np.asarray(archive["labels"]) if "labels" in archive else None
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip/format errors of all kinds
        raise DataError(f"{path}: cannot read .npz ({exc})") from None
    if images.dtype != np.uint8:
        raise DataError(f"{path}: 'images' must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[1] not in (1, 3, 4) and images.shape[3] in (1, 3, 4):
        images = images.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    elif images.ndim != 4:
        raise DataError(f"{path}: 'images' must be NHW, NHWC or NCHW, got shape {images.shape}")
    n = len(images)
    if n == 0:
        raise DataError(f"{path}: 'images' holds no images; nothing to train on or encode")
    if labels is None:
        labels = np.full(n, -1, dtype=np.int64)
    elif labels.shape != (n,):
        raise DataError(f"{path}: 'labels' has shape {labels.shape}, expected ({n},)")
    else:
        labels = _class_ids(labels, path)
    return ArraySource(
        torch.from_numpy(np.ascontiguousarray(images)),
        torch.from_numpy(labels.astype(np.int64)),
        holdout_splits(n),
        f"npz:{path}",
        _sha256_files([path]),
        cfg,
    )


# --- folders of PNG/JPEG files ----------------------------------------------------------------


class ImageFolderSource(ImageSource):
    """PNG/JPEG files under a folder, sorted by path; class subfolders become labels."""

    def __init__(self, root: Path, cfg: DataConfig) -> None:
        if root.is_file():
            hint = f"npz:{root}" if root.suffix == ".npz" else "the folder holding the images"
            raise DataError(f"imagefolder:{root}: is a file, not a folder; use {hint}")
        if not root.is_dir():
            raise DataError(f"imagefolder:{root}: folder not found")
        if cfg.channels not in (1, 3):
            raise DataError(
                f"imagefolder:{root}: image files are read as 1 or 3 channels, the config has "
                f"data.channels {cfg.channels}; set 1 or 3"
            )
        files = sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise DataError(f"imagefolder:{root}: no .png/.jpg/.jpeg files found")
        classes = sorted({p.relative_to(root).parts[0] for p in files if p.parent != root})
        self.class_names = classes
        lookup = {c: i for i, c in enumerate(classes)}
        self.files = files
        self.labels = np.array(
            [lookup[p.relative_to(root).parts[0]] if p.parent != root else -1 for p in files],
            dtype=np.int64,
        )
        self.root, self.cfg = root, cfg
        self.name = f"imagefolder:{root}"
        self.channels, self.image_size = cfg.channels, cfg.image_size
        self.splits = holdout_splits(len(files))
        h = hashlib.sha256()
        for p in files:
            st = p.stat()
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        self.fingerprint = h.hexdigest()

    def _read(self, path: Path) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        mode = "L" if self.cfg.channels == 1 else "RGB"
        try:
            with Image.open(path) as img:
                img = img.convert(mode)
                array = np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read image ({exc}); fix or remove the file") from None
        tensor = torch.from_numpy(array.copy())
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
        return _conform(tensor[None], self.cfg, str(path))[0]

    def load_batch(self, ids: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ids = np.asarray(ids, dtype=np.int64)
        images = torch.stack([self._read(self.files[i]) for i in ids]).float().div_(255)
        return images, torch.from_numpy(self.labels[ids])


# --- by name ----------------------------------------------------------------------------------

DATASET_NAMES = (
    "mnist-sample", "mnist", "fashion-mnist", "cifar10", "imagefolder:PATH", "npz:PATH"
)


def open_source(cfg: DataConfig) -> ImageSource:
    """The image source a config names (see ``DATASET_NAMES``)."""
    name = cfg.dataset
    root = Path(cfg.data_root).expanduser() if cfg.data_root else DEFAULT_DATA_ROOT
    if name == "mnist-sample":
        return bundled_mnist_sample(cfg)
    if name == "mnist":
        return _idx_source("mnist", "MNIST", root, cfg)
    if name == "fashion-mnist":
        return _idx_source("fashion-mnist", "FashionMNIST", root, cfg)
    if name == "cifar10":
        return _cifar10(root, cfg)
    if name.startswith("imagefolder:"):
        return ImageFolderSource(Path(name.split(":", 1)[1]).expanduser(), cfg)
    if name.startswith("npz:"):
        return _npz(Path(name.split(":", 1)[1]).expanduser(), cfg)
    raise DataError(f"unknown dataset '{name}'; use one of {', '.join(DATASET_NAMES)}")
