"""Data loading: labels from folders, the decoded cache, the seeded split, tensor augmentation."""

import os
import re
import tarfile
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from nas import data
from nas.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DataError,
    ImageDataset,
    augment_batch,
    batches,
    default_data_source,
    load_data,
    split_train_val,
    stratified_order,
)

# The red value of every synthetic image names its class, so labels can be checked by content;
# green is the image's number within its class folder, blue tells train (0) from test (255).
CODES = {"cat": 200, "ant": 20, "bee": 110}  # not in sorted order on purpose
N_TRAIN, N_TEST, SIZE = 12, 4, 8
CIFAR_ARCHIVE = Path(__file__).resolve().parents[1] / ".." / "shared/datasets/cifar10-jpg.tar.gz"


def _write_tree(root: Path, *, codes: dict = CODES) -> Path:
    for split, n, blue in (("train", N_TRAIN, 0), ("test", N_TEST, 255)):
        for name, red in codes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (SIZE, SIZE), (red, i, blue)).save(folder / f"{i:03d}.png")
    return root


def _tar(folder: Path, archive: Path, *, arcname: str = "mydata") -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return archive


def _ids(ds: ImageDataset) -> set[tuple[int, int]]:
    """(red, green) of each image: unique within a split of the synthetic tree."""
    return {(int(r), int(g)) for r, g in ds.images[:, :2, 0, 0].tolist()}


def _boom(*args, **kwargs):
    raise AssertionError("must not be called")


def _touch_later(path: Path) -> None:
    """Move mtime a second on, so even coarse file system clocks see the change."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    monkeypatch.delenv("NAS_DATA", raising=False)
    monkeypatch.setenv("NAS_CACHE", str(tmp_path / "env-cache"))


@pytest.fixture
def tree(tmp_path) -> Path:
    return _write_tree(tmp_path / "tree")


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


# --- sources and labels ---

def test_labels_follow_sorted_class_folders(tree, cache):
    s = load_data(tree, val_size=6, cache_dir=cache)
    assert s.classes == ("ant", "bee", "cat") and s.num_classes == 3
    for ds, blue in ((s.train, 0), (s.val, 0), (s.test, 255)):
        expected_red = torch.tensor([CODES[s.classes[k]] for k in ds.labels], dtype=torch.uint8)
        assert torch.equal(ds.images[:, 0, 0, 0], expected_red)
        assert ds.images[:, 2].eq(blue).all()
        assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
        assert ds.images.shape[1:] == (3, SIZE, SIZE) and ds.images.is_contiguous()
    assert (len(s.train), len(s.val), len(s.test)) == (30, 6, 12)
    assert s.source == str(tree) and len(s.fingerprint) == 64


def test_single_wrapping_folder_hidden_entries_and_other_files(tmp_path, cache):
    outer = tmp_path / "outer"
    _write_tree(outer / "cifar10")
    (outer / ".DS_Store").write_text("x")
    (outer / "cifar10" / "train" / "ant" / "notes.txt").write_text("not an image")
    (outer / "cifar10" / "train" / ".hidden").mkdir()
    s = load_data(outer, val_size=3, cache_dir=cache)
    assert s.classes == ("ant", "bee", "cat")
    assert len(s.train) + len(s.val) == 3 * N_TRAIN and len(s.test) == 3 * N_TEST


def test_grayscale_and_rgba_images_become_rgb(tree, cache):
    Image.new("L", (SIZE, SIZE), 77).save(tree / "train" / "ant" / "000.png")
    Image.new("RGBA", (SIZE, SIZE), (110, 5, 6, 40)).save(tree / "train" / "bee" / "000.png")
    s = load_data(tree, val_size=0, cache_dir=cache)  # no val: train keeps the file order
    assert s.train.images[0, :, 0, 0].tolist() == [77, 77, 77]
    assert s.train.images[N_TRAIN, :, 0, 0].tolist() == [110, 5, 6]


def test_archive_gives_the_same_data_as_its_folder(tree, tmp_path, cache):
    archive = _tar(tree, tmp_path / "d.tar.gz")
    a = load_data(archive, val_size=5, cache_dir=cache)
    b = load_data(tree, val_size=5, cache_dir=cache)
    for x, y in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
    assert a.classes == b.classes and a.source == str(archive)


def test_archive_is_read_once_then_served_from_cache(tree, tmp_path, cache, monkeypatch):
    archive = _tar(tree, tmp_path / "d.tgz")
    first = load_data(archive, val_size=6, cache_dir=cache)
    monkeypatch.setattr(data.tarfile, "open", _boom)
    monkeypatch.setattr(data, "_decode_file", _boom)
    again = load_data(archive, val_size=6, cache_dir=cache)
    assert torch.equal(first.train.images, again.train.images)
    assert torch.equal(first.test.labels, again.test.labels)
    assert again.classes == first.classes and again.mean == first.mean
    assert not any(p.name != "decoded" for p in cache.iterdir())  # nothing unpacked to disk


def test_folder_cache_skips_decoding_and_leaves_one_file(tree, cache, monkeypatch):
    first = load_data(tree, val_size=6, cache_dir=cache)
    monkeypatch.setattr(data, "_decode_file", _boom)
    again = load_data(tree, val_size=6, cache_dir=cache)
    assert torch.equal(first.val.images, again.val.images)
    assert [p.suffix for p in (cache / "decoded").iterdir()] == [".pt"]  # no temp file left


def test_default_cache_dir_is_nas_cache(tree, tmp_path):
    load_data(tree, val_size=3)
    assert len(list((tmp_path / "env-cache" / "decoded").glob("*.pt"))) == 1


def test_changed_folder_invalidates_cache(tree, cache):
    first = load_data(tree, val_size=0, cache_dir=cache)
    changed = tree / "test" / "cat" / "000.png"
    Image.new("RGB", (SIZE, SIZE), (201, 0, 255)).save(changed)
    _touch_later(changed)
    second = load_data(tree, val_size=0, cache_dir=cache)
    assert second.fingerprint != first.fingerprint
    assert int(second.test.images[2 * N_TEST, 0, 0, 0]) == 201  # cat is the third class
    assert len(list((cache / "decoded").iterdir())) == 1  # the stale cache file is gone
    Image.new("RGB", (SIZE, SIZE), (20, 99, 0)).save(tree / "train" / "ant" / "new.png")
    assert len(load_data(tree, val_size=0, cache_dir=cache).train) == 3 * N_TRAIN + 1


def test_changed_archive_invalidates_cache(tree, tmp_path, cache):
    archive = _tar(tree, tmp_path / "d.tar")
    load_data(archive, val_size=0, cache_dir=cache)
    Image.new("RGB", (SIZE, SIZE), (201, 0, 255)).save(tree / "test" / "cat" / "000.png")
    _tar(tree, archive)
    _touch_later(archive)
    assert int(load_data(archive, val_size=0, cache_dir=cache).test.images[2 * N_TEST, 0, 0, 0]) \
        == 201


def test_damaged_cache_is_rebuilt_with_a_warning(tree, cache, monkeypatch):
    first = load_data(tree, val_size=6, cache_dir=cache)
    (cache_file,) = (cache / "decoded").iterdir()
    cache_file.write_bytes(cache_file.read_bytes()[:1000])  # as if cut off mid-write
    with pytest.warns(UserWarning, match="unreadable data cache"):
        second = load_data(tree, val_size=6, cache_dir=cache)
    assert torch.equal(first.train.images, second.train.images)
    monkeypatch.setattr(data, "_decode_file", _boom)
    load_data(tree, val_size=6, cache_dir=cache)  # the rebuilt cache is whole


def test_mean_and_std_come_from_training_pixels(tree, cache):
    s = load_data(tree, val_size=6, cache_dir=cache)
    pixels = s.full_train.images.double() / 255
    assert s.mean == pytest.approx(pixels.mean(dim=(0, 2, 3)).tolist(), abs=1e-6)
    assert s.std == pytest.approx(pixels.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-6)


# --- the split ---

def test_split_is_stratified_disjoint_and_complete(tree, cache):
    s = load_data(tree, val_size=6, cache_dir=cache)
    assert torch.bincount(s.val.labels).tolist() == [2, 2, 2]
    assert not _ids(s.train) & _ids(s.val)
    assert len(_ids(s.train) | _ids(s.val)) == 3 * N_TRAIN
    assert len(s.full_train) == 3 * N_TRAIN
    assert torch.equal(s.full_train.images, torch.cat([s.train.images, s.val.images]))
    assert s.full_train is s.full_train  # concatenated once


def test_split_depends_only_on_the_seed(tree, cache):
    vals = [frozenset(_ids(load_data(tree, val_size=6, seed=k, cache_dir=cache).val))
            for k in (1, 1, 2, 3, 4)]
    assert vals[0] == vals[1]
    assert len(set(vals)) > 1


def test_stratified_order_keeps_every_prefix_in_proportion():
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 30)
    order = stratified_order(labels, seed=3)
    assert sorted(order.tolist()) == list(range(60))
    assert torch.bincount(labels[order[:6]], minlength=3).tolist() == [1, 2, 3]
    assert torch.bincount(labels[order[:30]], minlength=3).tolist() == [5, 10, 15]


@pytest.mark.parametrize("val_size", [36, 100, -1, 2.5])
def test_val_size_must_leave_training_images(tree, cache, val_size):
    with pytest.raises(DataError, match=rf"val_size={re.escape(str(val_size))} .*< the 36"):
        load_data(tree, val_size=val_size, cache_dir=cache)


# --- bad sources: one line naming the path ---

def _missing(tmp_path):
    return tmp_path / "nowhere", tmp_path / "nowhere", "does not exist"


def _no_train(tmp_path):
    root = _write_tree(tmp_path / "t")
    (root / "train").rename(root / "training")
    return root, root, "no train/ folder"


def _no_test(tmp_path):
    root = _write_tree(tmp_path / "t")
    (root / "test").rename(root / "val")
    return root, root, "no test/ folder"


def _class_mismatch(tmp_path):
    root = _write_tree(tmp_path / "t")
    (root / "test" / "cat").rename(root / "test" / "cow")
    return root, root / "test", r"only in train: \['cat'\], only in test: \['cow'\]"


def _mixed_sizes(tmp_path):
    root = _write_tree(tmp_path / "t")
    odd = root / "train" / "bee" / "005.png"
    Image.new("RGB", (9, 7), (110, 5, 0)).save(odd)
    return root, odd, "image is 9x7"


def _test_size_differs(tmp_path):
    root = _write_tree(tmp_path / "t")
    odd = root / "test" / "ant" / "001.png"
    Image.new("RGB", (16, 16), (20, 1, 255)).save(odd)
    return root, odd, "image is 16x16"


def _empty_class(tmp_path):
    root = _write_tree(tmp_path / "t")
    for f in (root / "train" / "bee").iterdir():
        f.unlink()
    return root, root / "train" / "bee", "holds no images"


def _broken_image(tmp_path):
    root = _write_tree(tmp_path / "t")
    bad = root / "train" / "ant" / "003.png"
    bad.write_bytes(b"not a png at all")
    return root, bad, "cannot decode image"


def _not_an_archive(tmp_path):
    path = tmp_path / "data.zip"
    path.write_bytes(b"PK")
    return path, path, "is not a directory or archive"


def _broken_archive(tmp_path):
    path = tmp_path / "data.tar.gz"
    path.write_bytes(b"\x1f\x8b garbage")
    return path, path, "cannot read archive"


def _unsafe_archive(tmp_path):
    path = tmp_path / "evil.tar"
    src = tmp_path / "x.png"
    Image.new("RGB", (2, 2)).save(src)
    with tarfile.open(path, "w") as tar:
        tar.add(src, arcname="../escaped.png")
    return path, path, "cannot read archive"


def _archive_without_layout(tmp_path):
    flat = tmp_path / "flat"
    (flat / "ant").mkdir(parents=True)
    Image.new("RGB", (2, 2)).save(flat / "ant" / "0.png")
    return _tar(flat, tmp_path / "flat.tar.gz", arcname="a"), tmp_path / "flat.tar.gz", "no train/"


@pytest.mark.parametrize("make", [_missing, _no_train, _no_test, _class_mismatch, _mixed_sizes,
                                  _test_size_differs, _empty_class, _broken_image,
                                  _not_an_archive, _broken_archive, _unsafe_archive,
                                  _archive_without_layout])
def test_bad_sources_raise_one_line_naming_the_path(tmp_path, cache, make):
    source, named, why = make(tmp_path)
    with pytest.raises(DataError, match=why) as err:
        load_data(source, val_size=1, cache_dir=cache)
    assert str(named) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "escaped.png").exists() and not (cache.parent / "escaped.png").exists()


# --- torchvision CIFAR-10 and the default source ---

def test_offline_cifar10_points_to_the_data_option(monkeypatch, cache):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    for source in ("cifar10", None):  # None falls back to cifar10 when NAS_DATA is unset
        with pytest.raises(DataError, match="could not be downloaded") as err:
            load_data(source, cache_dir=cache)
        msg = str(err.value)
        assert "--data" in msg and str(cache / "cifar10") in msg and "\n" not in msg


def test_cifar10_from_torchvision_becomes_chw_tensors(monkeypatch, cache):
    rng = np.random.default_rng(0)
    made = {}

    class FakeCIFAR10:
        classes = [f"c{k}" for k in range(10)]

        def __init__(self, root, train, download):
            n = 40 if train else 20
            self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = [k % 10 for k in range(n)]
            made[train] = self.data

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    s = load_data("cifar10", val_size=10, cache_dir=cache)
    assert torch.equal(s.test.images, torch.from_numpy(made[False]).permute(0, 3, 1, 2))
    assert s.test.images.is_contiguous() and s.num_classes == 10
    assert torch.bincount(s.val.labels).tolist() == [1] * 10
    assert (s.mean, s.std, s.source) == (CIFAR10_MEAN, CIFAR10_STD, "cifar10")


def test_nas_data_sets_the_default_source(tree, cache, monkeypatch):
    assert default_data_source() is None
    monkeypatch.setenv("NAS_DATA", str(tree))
    assert default_data_source() == str(tree)
    assert load_data(None, val_size=3, cache_dir=cache).source == str(tree)


# --- augmentation ---

def _images(n=16, size=8, dtype=torch.uint8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).to(dtype)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_keeps_shape_and_dtype_and_follows_the_seed(dtype):
    x = _images(dtype=dtype)
    out = augment_batch(x, generator=_gen(1))
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(out, augment_batch(x, generator=_gen(1)))
    assert not torch.equal(out, augment_batch(x, generator=_gen(2)))


def test_flip_happens_and_is_a_true_mirror():
    x = _images()
    out = augment_batch(x, pad=0, generator=_gen(0))
    same = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    flipped = [torch.equal(o, torch.flip(i, dims=[-1])) for o, i in zip(out, x, strict=True)]
    assert all(s or f for s, f in zip(same, flipped, strict=True))
    assert any(flipped) and any(same)


def test_crop_is_a_window_of_the_reflect_padded_image():
    x, pad = _images(n=32), 2
    out = augment_batch(x, pad=pad, generator=_gen(0))
    padded = F.pad(x.float(), (pad,) * 4, mode="reflect").to(torch.uint8)
    shifts = set()
    for o, p in zip(out, padded, strict=True):
        windows = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   for w in (p[:, dy:dy + SIZE, dx:dx + SIZE],)
                   if torch.equal(o, w) or torch.equal(o, torch.flip(w, dims=[-1]))]
        assert windows, "output is no window of the padded image"
        shifts.update(windows)
    assert len(shifts) > 5  # content really moves, in many directions


@pytest.mark.parametrize("pad", [-1, 8, 1.5])
def test_augment_rejects_a_bad_pad(pad):
    with pytest.raises(DataError, match=rf"pad={re.escape(str(pad))}"):
        augment_batch(_images(), pad=pad, generator=None)


# --- batches ---

def _numbered(n=50, classes=5) -> ImageDataset:
    """Image k is filled with the value k, so a batch tells which examples it holds."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()
    return ImageDataset(images, torch.arange(n) % classes)


IDENTITY = {"mean": (0.0, 0.0, 0.0), "std": (1 / 255,) * 3}  # normalised value == pixel value


def _ids_of(x):
    return x[:, 0, 0, 0].round().long()


def test_an_epoch_covers_every_example_once():
    out = list(batches(_numbered(), batch_size=8, shuffle=True, augment=False, generator=_gen(0),
                       **IDENTITY))
    assert [len(y) for _, y in out] == [8] * 6 + [2]
    ids = torch.cat([_ids_of(x) for x, _ in out])
    assert sorted(ids.tolist()) == list(range(50)) and ids.tolist() != list(range(50))
    assert torch.equal(torch.cat([y for _, y in out]), ids % 5)  # labels travel with images


def test_drop_last_and_no_shuffle():
    out = list(batches(_numbered(), batch_size=8, shuffle=False, augment=False, drop_last=True,
                       **IDENTITY))
    assert torch.cat([_ids_of(x) for x, _ in out]).tolist() == list(range(48))


def test_channels_last_only_when_asked():
    x, _ = next(batches(_numbered(), batch_size=8, shuffle=False, augment=True))
    assert x.dtype == torch.float32 and x.shape == (8, 3, 8, 8)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    x, _ = next(batches(_numbered(), batch_size=8, shuffle=False, augment=True,
                        channels_last=False))
    assert x.is_contiguous()


def test_normalisation_uses_mean_and_std_in_unit_range():
    ds = ImageDataset(torch.full((4, 3, 8, 8), 128, dtype=torch.uint8), torch.zeros(4).long())
    x, _ = next(batches(ds, batch_size=4, shuffle=False, augment=True))
    expected = [(128 / 255 - m) / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD, strict=True)]
    assert x.mean(dim=(0, 2, 3)).tolist() == pytest.approx(expected, abs=1e-5)
    assert x.std(dim=(0, 2, 3)).max() < 1e-6  # a constant image stays constant per channel


def test_limit_is_a_fixed_balanced_subset():
    ds = _numbered()
    epochs = [torch.cat([_ids_of(x) for x, _ in batches(
        ds, batch_size=4, shuffle=True, augment=False, generator=_gen(k), limit=10, **IDENTITY)])
        for k in range(2)]
    assert len(epochs[0]) == 10 and set(epochs[0].tolist()) == set(epochs[1].tolist())
    assert epochs[0].tolist() != epochs[1].tolist()  # still shuffled per epoch
    assert torch.bincount(epochs[0] % 5).tolist() == [2] * 5
    assert sum(len(y) for _, y in batches(ds, batch_size=8, shuffle=False, augment=False,
                                          limit=500)) == 50


def test_seeded_batches_repeat_exactly():
    def run(seed):
        return [x for x, _ in batches(_numbered(), batch_size=16, shuffle=True, augment=True,
                                      generator=_gen(seed))]
    assert all(torch.equal(a, b) for a, b in zip(run(3), run(3), strict=True))


@pytest.mark.parametrize("kwargs, match", [({"batch_size": 0}, "batch_size=0"),
                                           ({"batch_size": 8, "limit": 0}, "limit=0"),
                                           ({"batch_size": 8, "std": (1, 0, 1)}, "std=")])
def test_batches_checks_its_options_at_the_call(kwargs, match):
    with pytest.raises(DataError, match=match):
        batches(_numbered(), shuffle=True, augment=False, **kwargs)


def test_image_dataset_checks_its_tensors():
    with pytest.raises(DataError, match="uint8"):
        ImageDataset(torch.zeros(2, 3, 4, 4), torch.zeros(2).long())
    with pytest.raises(DataError, match=r"labels .* must be int64 \[2\]"):
        ImageDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3).long())


def test_split_train_val_takes_any_dataset():
    train, val = split_train_val(_numbered(), val_size=10, seed=0)
    assert torch.bincount(val.labels).tolist() == [2] * 5
    train_ids, val_ids = (set(d.images[:, 0, 0, 0].tolist()) for d in (train, val))
    assert len(train_ids) == 40 and not train_ids & val_ids


# --- the real CIFAR-10 archive ---

@pytest.mark.integration
def test_real_cifar10_archive(tmp_path):
    if not CIFAR_ARCHIVE.is_file():
        pytest.skip(f"{CIFAR_ARCHIVE} not found")
    times = []
    for _ in range(2):  # cold (empty cache), then warm
        start = time.perf_counter()
        s = load_data(CIFAR_ARCHIVE, cache_dir=tmp_path)
        times.append(time.perf_counter() - start)
    print(f"\ncold load {times[0]:.2f} s, cached load {times[1]:.2f} s")
    assert (len(s.train), len(s.val), len(s.test)) == (45000, 5000, 10000)
    assert s.num_classes == 10 and s.classes[0] == "airplane"
    assert s.train.images.shape[1:] == (3, 32, 32)
    assert torch.bincount(s.val.labels).tolist() == [500] * 10
    assert s.mean == pytest.approx(CIFAR10_MEAN, abs=0.005)


def test_archive_fingerprint_is_its_content_not_its_path_or_mtime(tree, tmp_path, cache):
    """A study records the fingerprint: a copied or re-provisioned archive must still resume it,
    and a changed one must not."""
    archive = _tar(tree, tmp_path / "d.tar")
    first = load_data(archive, val_size=0, cache_dir=cache)
    copy = tmp_path / "elsewhere" / "d.tar"
    copy.parent.mkdir()
    copy.write_bytes(archive.read_bytes())
    _touch_later(copy)
    assert load_data(copy, val_size=0, cache_dir=cache).fingerprint == first.fingerprint
    Image.new("RGB", (SIZE, SIZE), (201, 0, 255)).save(tree / "test" / "cat" / "000.png")
    _tar(tree, copy)
    assert load_data(copy, val_size=0, cache_dir=cache).fingerprint != first.fingerprint
