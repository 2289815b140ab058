"""Image data decoded once into uint8 tensors, cached on disk, split by seed, batched as tensors.

Feeds the fast proxy trainer: after the first run a full CIFAR-10 loads from one cache file in about
a second, and `batches` builds each augmented, normalised batch with a few whole-batch tensor ops.

    splits = load_data("../shared/datasets/cifar10-jpg.tar.gz")          # or "cifar10", or a folder
    for x, y in batches(splits.train, batch_size=512, shuffle=True, augment=True,
                        mean=splits.mean, std=splits.std): ...

Sources: ``"cifar10"`` (torchvision, downloads if it can), an ImageFolder directory
(``train/<class>/*`` and ``test/<class>/*``, or a folder holding exactly one such directory), or a
``.tar``/``.tar.gz``/``.tgz`` archive of one, read in one streaming pass (never unpacked to disk).

Design choices:
- Validation is carved out of the *training* set, stratified: every class gives the same share.
- Normalisation statistics of ImageFolder data are computed from its training set (train + val
  pixels, never test); torchvision CIFAR-10 uses `CIFAR10_MEAN`/`CIFAR10_STD`, which are exactly
  the statistics of that set. Pass ``splits.mean``/``splits.std`` to `batches`.
- Augmentation pads by reflection (as airbench does): a zero border would add edges the real
  images never have.
- Cache: ``<cache_dir>/decoded/<name>-<source hash>-<content fingerprint>.pt``, a `torch.save`d dict
  of tensors loaded with ``weights_only=True``, written atomically (nas.files.write_atomic). Its
  fingerprint covers the archive's bytes (sha256), or for a folder its path and every image
  file's relative path, size and mtime; files of older fingerprints are deleted. A study records
  the fingerprint, so the same archive copied elsewhere or with a new mtime still resumes.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torchvision
from PIL import Image

from nas.files import cache_root, write_atomic

try:  # deprecated in torchvision 0.29 (moving to TorchCodec); PIL decodes when it is gone
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # pragma: no cover
    decode_image = None

# Per-channel (R, G, B) mean and std of the CIFAR-10 training images, in 0..1 units (pixel / 255).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# Same file types as torchvision's ImageFolder (plus gif); other files in class folders are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
                    ".gif")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CACHE_VERSION = 1  # bump when the cached payload changes; old cache files then stop matching
SPLIT_SEED = 0  # the train/validation split: the same in every run and every tool
_LIMIT_SEED = 0  # fixes the `limit` training subset, the same in every epoch and every run
_EXPECTED = ("expected 'cifar10', an ImageFolder directory <dir>/train/<class>/* + "
             "<dir>/test/<class>/* (or a folder holding exactly one such directory), or a "
             ".tar/.tar.gz/.tgz archive of one")


class DataError(ValueError):
    """Unloadable data or a bad option: one line naming the path or value and what is expected."""


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """One split: uint8 images [N, 3, H, W] (contiguous) and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        im, lab = self.images, self.labels
        if im.dtype != torch.uint8 or im.dim() != 4 or im.shape[1] != 3 or not im.is_contiguous():
            raise DataError(f"ImageDataset: images {im.dtype} {tuple(im.shape)} must be contiguous "
                            "uint8 [N, 3, H, W]")
        if lab.dtype != torch.int64 or lab.shape != (im.shape[0],):
            raise DataError(f"ImageDataset: labels {lab.dtype} {tuple(lab.shape)} must be int64 "
                            f"[{im.shape[0]}]")

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass(frozen=True, eq=False)
class DataSplits:
    """Proxy-train, validation (held out of the training set) and test splits of one data set."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    classes: tuple[str, ...]
    source: str  # absolute path or "cifar10": `load_data(source)` loads the same data again
    mean: tuple[float, float, float] = CIFAR10_MEAN  # 0..1 units, for `batches(mean=...)`
    std: tuple[float, float, float] = CIFAR10_STD
    fingerprint: str = ""  # content key of the source (see module docstring), for run records
    # what the same source was fingerprinted as before 2026-12-05 (an archive's path, size and
    # mtime): a study recorded with it resumes (CHANGELOG.md)
    former_fingerprints: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @cached_property
    def full_train(self) -> ImageDataset:
        """Train then val concatenated, for final training; built once on first use."""
        return _concat(self.train, self.val)


def default_data_source() -> str | None:
    """The source `load_data(None)` uses: $NAS_DATA if set, else None (meaning "cifar10")."""
    return os.environ.get("NAS_DATA") or None


def load_data(source: str | os.PathLike | None = None, *, val_size: int = 5000,
              seed: int = SPLIT_SEED, cache_dir: str | os.PathLike | None = None,
              download: bool = True) -> DataSplits:
    """Load (decoding only on a cache miss) and split a data set into train, val and test."""
    source = default_data_source() if source is None else source
    source = "cifar10" if source is None else source
    cache = cache_root(cache_dir)
    former: tuple[str, ...] = ()
    if isinstance(source, str) and source.lower() == "cifar10":
        train, test, classes, mean, std = _load_cifar10(cache / "cifar10", download=download)
        name, fingerprint = "cifar10", f"torchvision:{cache / 'cifar10'}"
    else:
        path = Path(os.path.abspath(Path(source).expanduser()))
        (train, test, classes, mean, std), fingerprint = _load_path(path, cache)
        name = str(path)
        if path.is_file():
            st = path.stat()
            former = (_former_digest(path, st.st_size, st.st_mtime_ns),)
    fit, val = split_train_val(train, val_size=val_size, seed=seed)
    return DataSplits(train=fit, val=val, test=test, classes=classes, source=name, mean=mean,
                      std=std, fingerprint=fingerprint, former_fingerprints=former)


def split_train_val(data: ImageDataset, *, val_size: int, seed: int) -> tuple[ImageDataset,
                                                                               ImageDataset]:
    """Hold out a fixed, stratified, seeded `val_size` examples; both parts keep the data order."""
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 <= val_size < len(data):
        raise DataError(f"val_size={val_size!r} must be an integer >= 0 and < the {len(data)} "
                        "training images")
    order = stratified_order(data.labels, seed=seed)
    val_idx, train_idx = order[:val_size].sort().values, order[val_size:].sort().values
    return _take(data, train_idx), _take(data, val_idx)


def stratified_order(labels: torch.Tensor, *, seed: int) -> torch.Tensor:
    """A seeded permutation whose every prefix holds the classes in proportion to their sizes."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed={seed!r} must be an integer")
    n = labels.numel()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    lab = labels[perm]
    counts = torch.bincount(lab)
    by_class = torch.argsort(lab, stable=True)
    rank = torch.empty(n, dtype=torch.long)
    rank[by_class] = torch.arange(n) - (torch.cumsum(counts, 0) - counts)[lab[by_class]]
    # The k-th drawn example of a class lands at fraction (k + 0.5) / class size of the order.
    key = (rank.double() + 0.5) / counts[lab].double()
    return perm[torch.argsort(key, stable=True)]


def batches(data: ImageDataset, *, batch_size: int, shuffle: bool, augment: bool,
            generator: torch.Generator | None = None, drop_last: bool = False,
            mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD,
            device: str | torch.device = "cpu", channels_last: bool = True,
            limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of normalised float32 [B, 3, H, W] images and int64 labels, built per batch.

    `limit` keeps only the first `limit` examples of a fixed stratified permutation (the same
    subset every epoch; a limit >= len(data) keeps all). `generator` drives shuffling and
    augmentation. Arguments are checked here, not at the first `next`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batches: batch_size={batch_size!r} must be an integer >= 1")
    order = _epoch_order(data, shuffle=shuffle, generator=generator, limit=limit)
    scale, shift = _normaliser(mean, std, device)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    starts = range(0, stop, batch_size)
    return (_batch(data, order[s:s + batch_size], augment=augment, generator=generator, scale=scale,
                   shift=shift, device=device, channels_last=channels_last) for s in starts)


def augment_batch(images: torch.Tensor, *, pad: int = 4,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Random crop of the reflect-padded images plus random horizontal flip, as one gather.

    Each image moves by (dy, dx) drawn uniformly from [-pad, pad] (what RandomCrop(H, padding=pad)
    does) and is mirrored with probability 1/2. Works on any dtype and device; the output is
    contiguous. One flat index_select with 32-bit indices: on CPU ~6x faster than 4-D advanced
    indexing, and no padded copy is ever made.
    """
    if images.dim() != 4:
        raise DataError(f"augment_batch: images of shape {tuple(images.shape)} must be "
                        "[B, C, H, W]")
    b, c, h, w = images.shape
    if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < min(h, w):
        raise DataError(f"augment_batch: pad={pad!r} must be an integer >= 0 and < {min(h, w)} "
                        "(the image size, for reflection)")
    dev, rng = images.device, _rng_device(generator, images.device)
    shifts = torch.randint(-pad, pad + 1, (2, b, 1), generator=generator, device=rng).to(dev)
    flips = torch.rand(b, 1, generator=generator, device=rng).to(dev) < 0.5
    rows = _reflect(torch.arange(h, device=dev) + shifts[0], h)  # source row of each output row
    cols = torch.arange(w, device=dev) + shifts[1]
    cols = _reflect(torch.where(flips, cols.flip(1), cols), w)  # source column, flip folded in
    idx_type = torch.int32 if images.numel() < 2**31 else torch.int64
    planes = torch.arange(b * c, device=dev, dtype=idx_type).view(b, c, 1) * h
    row_starts = (planes + rows.to(idx_type).view(b, 1, h)) * w
    flat = (row_starts.view(b, c, h, 1) + cols.to(idx_type).view(b, 1, 1, w)).view(-1)
    return images.contiguous().view(-1).index_select(0, flat).view(b, c, h, w)


# --- batching helpers ---

def _rng_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    """Random draws must happen on the generator's own device."""
    return generator.device if generator is not None else fallback


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Map indices in [-(size-1), 2*(size-1)] into range by mirroring at the edges (no repeat)."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def _epoch_order(data: ImageDataset, *, shuffle: bool, generator: torch.Generator | None,
                 limit: int | None) -> torch.Tensor:
    """Indices of one epoch: the (limited) subset, shuffled if asked."""
    if limit is None:
        idx = torch.arange(len(data))
    elif isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise DataError(f"batches: limit={limit!r} must be None or an integer >= 1")
    else:
        idx = stratified_order(data.labels, seed=_LIMIT_SEED)[:limit].sort().values
    if shuffle:
        perm = torch.randperm(len(idx), generator=generator,
                              device=_rng_device(generator, torch.device("cpu")))
        idx = idx[perm.cpu()]
    return idx


def _normaliser(mean: Sequence[float], std: Sequence[float],
                device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and shift so that uint8 * scale - shift == (pixel / 255 - mean) / std."""
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise DataError(f"batches: mean={tuple(mean)} and std={tuple(std)} must hold 3 values "
                        "each (R, G, B in 0..1 units), std > 0")
    mean_t = torch.tensor(mean, dtype=torch.float64)
    std_t = torch.tensor(std, dtype=torch.float64)
    scale, shift = 1.0 / (255.0 * std_t), mean_t / std_t
    return (scale.float().view(1, 3, 1, 1).to(device), shift.float().view(1, 3, 1, 1).to(device))


def _batch(data: ImageDataset, idx: torch.Tensor, *, augment: bool,
           generator: torch.Generator | None, scale: torch.Tensor, shift: torch.Tensor,
           device: str | torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather, move and augment in uint8 (4x less memory traffic), then normalise in float32."""
    images = data.images.index_select(0, idx).to(device)
    if augment:
        images = augment_batch(images, generator=generator)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    x = images.float().mul_(scale).sub_(shift)
    return x, data.labels.index_select(0, idx).to(device)


def _take(data: ImageDataset, idx: torch.Tensor) -> ImageDataset:
    return ImageDataset(data.images.index_select(0, idx), data.labels.index_select(0, idx))


def _concat(a: ImageDataset, b: ImageDataset) -> ImageDataset:
    return ImageDataset(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]))


# --- sources ---

_Loaded = tuple[ImageDataset, ImageDataset, tuple[str, ...], tuple[float, ...], tuple[float, ...]]


def _load_cifar10(root: Path, *, download: bool) -> _Loaded:
    """torchvision's CIFAR-10 (already fast to read: no extra cache), as CHW uint8 tensors."""
    try:
        sets = [torchvision.datasets.CIFAR10(str(root), train=t, download=download)
                for t in (True, False)]
    except (OSError, RuntimeError) as err:
        why = "it could not be downloaded (offline?)" if download else "download=False"
        raise DataError(f"no CIFAR-10 found at {root} and {why}; pass --data PATH to an "
                        "ImageFolder directory or .tar/.tar.gz archive, e.g. --data "
                        f"../shared/datasets/cifar10-jpg.tar.gz ({type(err).__name__})") from err
    train, test = (ImageDataset(torch.from_numpy(np.asarray(s.data)).permute(0, 3, 1, 2)
                                .contiguous(), torch.as_tensor(s.targets, dtype=torch.int64))
                   for s in sets)
    return train, test, tuple(sets[0].classes), CIFAR10_MEAN, CIFAR10_STD


def _load_path(path: Path, cache: Path) -> tuple[_Loaded, str]:
    """An ImageFolder directory or an archive of one, from the cache when the fingerprint matches.

    A warm load of an archive hashes it; a folder is listed and its files stat-ed.
    """
    tree = None
    if path.is_dir():
        files = _FolderFiles(path)
        tree = _scan(files)
        items = tree.train + tree.test
        fingerprint = _digest(str(path), *(f"{rel}\t{files.stats[rel]}" for rel, _ in items))
    elif path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES):
        # The archive's bytes alone (not its path or mtime, nor the cache's format version): a
        # copied or re-provisioned archive is the same data, and a study made on it resumes.
        # sha256 of the 19 MB CIFAR-10 archive takes a few hundredths of a second.
        fingerprint = _file_sha256(path)
    else:
        what = "does not exist" if not path.exists() else "is not a directory or archive"
        raise DataError(f"{path} {what}; {_EXPECTED}")
    cache_file = cache / "decoded" / f"{_slug(path)}-{fingerprint[:16]}.pt"
    loaded = _read_cache(cache_file, fingerprint)
    if loaded is None:
        loaded = _decode_tree(tree or _scan(_ArchiveFiles(path)))
        _write_cache(cache_file, fingerprint, loaded)
    return loaded, fingerprint


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()  # hashlib.file_digest is Python 3.11+; nas supports 3.10
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _former_digest(path: Path, size: int, mtime_ns: int) -> str:
    """An archive's fingerprint before 2026-12-05 (cache format v1): its path, size, mtime."""
    return hashlib.sha256("\n".join(("v1", str(path), str(size), str(mtime_ns))).encode()
                          ).hexdigest()


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join((f"v{CACHE_VERSION}", *parts)).encode()).hexdigest()


def _slug(path: Path) -> str:
    """A file-name-safe stem for `path` that no other source path shares."""
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in path.name)[:40]
    return f"{name}-{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"


# --- the two kinds of file tree: a folder on disk, an archive read in one pass ---

class _FolderFiles:
    """A folder on disk, seen through relative POSIX paths ("" is the folder itself)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stats: dict[str, str] = {}  # relative path -> "size<TAB>mtime_ns" of listed files

    def listing(self, rel: str) -> tuple[list[str], list[str]]:
        """Sorted (subfolders, files) of `rel`, hidden names left out; remembers file stats."""
        dirs, files = [], []
        with os.scandir(self.root / rel) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    dirs.append(e.name)
                else:
                    st = e.stat()
                    self.stats[_join(rel, e.name)] = f"{st.st_size}\t{st.st_mtime_ns}"
                    files.append(e.name)
        return sorted(dirs), sorted(files)

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def show(self, rel: str) -> str:
        return str(self.root / rel)


class _ArchiveFiles:
    """A tar archive read in one streaming pass, nothing written to disk.

    Reading straight from the archive beats unpacking it (CIFAR-10: 4 s against 8-10 s for
    tarfile.extractall, and no 240 MB of small files left behind); the decoded cache then makes
    the archive a one-time cost. Members pass tarfile's "data" filter (no absolute paths, no
    `..`, no devices); only regular files are taken, links are ignored.
    """

    def __init__(self, archive: Path) -> None:
        self.archive = archive
        self._data: dict[str, bytes] = {}
        self._dirs: dict[str, tuple[set[str], set[str]]] = {"": (set(), set())}
        try:
            with tarfile.open(archive, "r|*") as tar:
                for member in tar:
                    self._add(tar, member)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            why = f"{type(err).__name__}: {err}"
            raise DataError(f"{archive}: cannot read archive ({why})") from err

    def _add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        tarfile.data_filter(member, "/archive")  # raises FilterError on an unsafe member
        rel = "/".join(PurePosixPath(member.name).parts)
        if member.isdir():
            self._add_path(rel, is_dir=True)
        elif member.isfile():
            self._add_path(rel, is_dir=False)
            if rel.lower().endswith(IMAGE_EXTENSIONS):
                self._data[rel] = tar.extractfile(member).read()

    def _add_path(self, rel: str, *, is_dir: bool) -> None:
        if not rel:  # the archive's top ("." or "./")
            return
        parent, _, name = rel.rpartition("/")
        if is_dir:
            self._dirs.setdefault(rel, (set(), set()))
        if parent not in self._dirs:
            self._add_path(parent, is_dir=True)
        self._dirs[parent][0 if is_dir else 1].add(name)

    def listing(self, rel: str) -> tuple[list[str], list[str]]:
        dirs, files = self._dirs.get(rel, (set(), set()))
        return (sorted(n for n in dirs if not n.startswith(".")),
                sorted(n for n in files if not n.startswith(".")))

    def read(self, rel: str) -> bytes:
        return self._data[rel]

    def show(self, rel: str) -> str:
        return f"{self.archive}:{rel}" if rel else str(self.archive)


_Files = _FolderFiles | _ArchiveFiles


# --- ImageFolder layout ---

@dataclass(frozen=True)
class _Tree:
    """The image files of an ImageFolder tree, sorted: (relative path, label) per split."""

    files: _Files
    classes: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    test: tuple[tuple[str, int], ...]


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def _find_root(files: _Files) -> str:
    """The folder holding train/ and test/: the top itself or its only subfolder."""
    top = files.listing("")[0]
    if "train" in top:
        base = ""
    elif len(top) == 1 and "train" in files.listing(top[0])[0]:
        base = top[0]
    else:
        raise DataError(f"{files.show('')}: no train/ folder; {_EXPECTED}")
    if "test" not in files.listing(base)[0]:
        raise DataError(f"{files.show(base)}: has train/ but no test/ folder; {_EXPECTED}")
    return base


def _scan(files: _Files) -> _Tree:
    """Classes are the sorted class folder names (as in ImageFolder); train and test must agree."""
    base = _find_root(files)
    train_classes = _class_dirs(files, _join(base, "train"))
    test_classes = _class_dirs(files, _join(base, "test"))
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DataError(f"{files.show(_join(base, 'train'))} and {files.show(_join(base, 'test'))} "
                        f"must have the same class folders; only in train: {only_train}, "
                        f"only in test: {only_test}")
    split = {s: tuple((f, label) for label, c in enumerate(train_classes)
                      for f in _image_files(files, _join(base, s, c))) for s in ("train", "test")}
    return _Tree(files, tuple(train_classes), split["train"], split["test"])


def _class_dirs(files: _Files, rel: str) -> list[str]:
    names = files.listing(rel)[0]
    if not names:
        raise DataError(f"{files.show(rel)}: no class folders; {_EXPECTED}")
    return names


def _image_files(files: _Files, rel: str) -> list[str]:
    """Image files of a class folder; like ImageFolder, other file types are ignored."""
    names = [_join(rel, n) for n in files.listing(rel)[1] if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not names:
        raise DataError(f"{files.show(rel)}: class folder holds no images "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    return names


# --- decoding ---

def _decode_tree(tree: _Tree) -> _Loaded:
    """Decode every image once (serially: on 2 shared cores threads were slower, not faster)."""
    with warnings.catch_warnings():
        # torchvision 0.29 deprecated its decoders for TorchCodec; they still decode 4x faster
        # than PIL here, and PIL takes over if they go.
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
        train = _decode_split(tree.files, tree.train)
        test = _decode_split(tree.files, tree.test, like=(tree.train[0][0], train.images.shape[2:]))
    mean, std = _channel_stats(train.images)
    return train, test, tree.classes, mean, std


def _decode_split(files: _Files, items: Sequence[tuple[str, int]], *,
                  like: tuple[str, torch.Size] | None = None) -> ImageDataset:
    """Decode into one preallocated tensor; every image must have the size of the first."""
    first = _decode_file(files.read(items[0][0]), files.show(items[0][0]))
    ref_rel, ref_size = like or (items[0][0], first.shape[1:])
    images = torch.empty((len(items), 3, *ref_size), dtype=torch.uint8)
    for i, (rel, _) in enumerate(items):
        img = first if i == 0 else _decode_file(files.read(rel), files.show(rel))
        if img.shape[1:] != ref_size:
            raise DataError(f"{files.show(rel)}: image is {img.shape[2]}x{img.shape[1]} (WxH) but "
                            f"{files.show(ref_rel)} is {ref_size[1]}x{ref_size[0]}; all images "
                            "must have the same size")
        images[i] = img
    return ImageDataset(images, torch.tensor([label for _, label in items], dtype=torch.int64))


def _decode_file(data: bytes, shown: str) -> torch.Tensor:
    """One image as uint8 RGB [3, H, W]: torchvision (JPEG, PNG, WebP, GIF; 4x PIL), else PIL."""
    if decode_image is None:
        return _decode_with_pil(data, shown)
    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                           mode=ImageReadMode.RGB)
    except RuntimeError:
        return _decode_with_pil(data, shown)
    if img.dtype != torch.uint8:  # 16-bit PNG: keep the top 8 bits
        img = (img.to(torch.int32) >> 8).to(torch.uint8)
    return img


def _decode_with_pil(data: bytes, shown: str) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.array(im.convert("RGB"))
    except OSError as err:
        raise DataError(f"{shown}: cannot decode image ({type(err).__name__}: {err})") from err
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std in 0..1 units, from 256-bin histograms (no float copy)."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        p = hist / hist.sum()
        mean = float((p * values).sum())
        means.append(round(mean, 6))
        stds.append(round(float((p * (values - mean) ** 2).sum()) ** 0.5, 6))
    return tuple(means), tuple(stds)


# --- decoded cache ---

def _read_cache(file: Path, fingerprint: str) -> _Loaded | None:
    """The cached tensors, or None when absent, stale or unreadable (then they are rebuilt)."""
    if not file.is_file():
        return None
    try:
        d = torch.load(file, weights_only=True)
        if d["version"] != CACHE_VERSION or d["fingerprint"] != fingerprint:
            return None
        train = ImageDataset(d["train_images"], d["train_labels"])
        test = ImageDataset(d["test_images"], d["test_labels"])
        return train, test, tuple(d["classes"]), tuple(d["mean"]), tuple(d["std"])
    except Exception as err:  # any damage to a cache file only costs a fresh decode
        warnings.warn(f"ignoring unreadable data cache {file} ({type(err).__name__}: {err}); "
                      "decoding again", stacklevel=3)
        return None


def _write_cache(file: Path, fingerprint: str, loaded: _Loaded) -> None:
    """Save atomically (nas.files.write_atomic); a cache that cannot be written only warns."""
    train, test, classes, mean, std = loaded
    payload = {"version": CACHE_VERSION, "fingerprint": fingerprint, "classes": list(classes),
               "mean": list(mean), "std": list(std), "train_images": train.images,
               "train_labels": train.labels, "test_images": test.images, "test_labels": test.labels}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(file, buffer.getbuffer())
    except OSError as err:
        warnings.warn(f"could not write data cache {file} ({err}); the next load decodes again",
                      stacklevel=3)
        return
    _remove_stale(file)


def _remove_stale(file: Path) -> None:
    """Delete cache files of this source with older fingerprints: they can never match again."""
    prefix = file.name.rsplit("-", 1)[0] + "-"
    for old in file.parent.glob(prefix + "*.pt"):
        if old != file:
            old.unlink(missing_ok=True)
