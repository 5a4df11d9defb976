"""Text as sequence-as-task: each line is a task; x = character position, y = byte.

A line of UTF-8 text becomes its bytes followed by an end token (NUL, byte 0); sequences
are cut to ``max_len`` (end token included) and padded with a mask, so padding adds no
loss and takes no SGD step. The lines come from a UTF-8 file (``task.path``) or from a
named offline corpus (``task.corpus``, :mod:`reptile_gen.data.corpora`: ``pydoc``, the
default, CPython's ``pydoc_data.topics``; ``listing``, ``ls -l`` lines of CPython's
standard library), split deterministically into train/val/test by a hash of each line.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from reptile_gen.data.base import TaskDataModule, check_count, check_flag
from reptile_gen.data.corpora import CORPORA, corpus_texts
from reptile_gen.data.streams import FixedTaskBatches
from reptile_gen.data.task_batch import TaskBatch
from reptile_gen.data.task_spec import TaskSpec

__all__ = [
    "END_TOKEN",
    "TextDataModule",
    "decode_text",
    "encode_lines",
    "encode_text",
    "load_lines",
    "split_of",
]

END_TOKEN = 0
SPLITS = ("train", "val", "test")


def load_lines(path: str | Path | None, corpus: str = "pydoc") -> tuple[list[str], str]:
    """Non-empty stripped lines of a UTF-8 file (``None``: the named offline ``corpus``)
    and a label."""
    if path is None:
        texts, source = corpus_texts(corpus)
    else:
        path = Path(str(path)).expanduser()
        if not path.is_file():
            what = "a directory, not a text file" if path.is_dir() else "no such text file"
            raise FileNotFoundError(f"task.path={str(path)!r}: {what}; allowed: a UTF-8 file")
        raw = path.read_bytes()
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise ValueError(
                f"task.path={str(path)!r} is UTF-16 text; allowed: UTF-8 (convert it: "
                "iconv -f UTF-16 -t UTF-8)"
            )
        if b"\x00" in raw:
            raise ValueError(
                f"task.path={str(path)!r} contains NUL bytes: not a text file "
                "(NUL is the end token; give a UTF-8 text file, one sequence per line)"
            )
        try:
            texts = [raw.decode("utf-8")]
        except UnicodeDecodeError as err:
            raise ValueError(
                f"task.path={str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})"
            ) from None
        source = str(path)
    lines = [line.strip() for text in texts for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"task.path={source!r} holds no non-empty line of text")
    return lines, source


def split_of(line: str, val_percent: int, test_percent: int) -> str:
    """Deterministic split of a line by a hash of its text (stable across machines)."""
    bucket = int.from_bytes(hashlib.sha1(line.encode("utf-8")).digest()[:4], "big") % 100
    if bucket < test_percent:
        return "test"
    if bucket < test_percent + val_percent:
        return "val"
    return "train"


def encode_text(text: str) -> list[int]:
    """The codes of ``text``: its UTF-8 bytes (the end token is added by the caller)."""
    return list(str(text).encode("utf-8"))


def decode_text(codes) -> str:
    """Codes up to the first end token, decoded as UTF-8 (invalid bytes replaced)."""
    codes = [int(c) for c in codes]
    if END_TOKEN in codes:
        codes = codes[: codes.index(END_TOKEN)]
    return bytes(codes).decode("utf-8", errors="replace")


def encode_lines(lines: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, max_len]`` bytes (end token appended, cut to max_len) and the ``[N, max_len]``
    mask of real positions (the end token is real, padding is not)."""
    data = torch.zeros(len(lines), max_len, dtype=torch.long)
    mask = torch.zeros(len(lines), max_len, dtype=torch.bool)
    for i, line in enumerate(lines):
        encoded = encode_text(line)[: max_len - 1] + [END_TOKEN]
        data[i, : len(encoded)] = torch.tensor(encoded)
        mask[i, : len(encoded)] = True
    return data, mask


class TextDataModule(TaskDataModule):
    """Lines of text as tasks (``task=text``).

    Args:
        path: a UTF-8 text file, one sequence per line; ``null`` for the offline corpus.
        corpus: the offline corpus when ``path`` is null: ``pydoc`` | ``listing``.
        max_len: positions per sequence including the end token (>= 2).
        meta_batch_size: lines per meta-step.
        val_percent, test_percent: share of lines (by hash) held out.
        num_val_tasks: validation lines used per validation (a fixed subset).
        num_test_tasks: test lines scored (null: the whole test split).
        eval_batch_size: lines per validation/test batch.
        seed: seed of the training stream.
        prev_input: the input of position ``i`` is ``(i, byte_{i-1})`` (a start token at
            position 0) instead of ``i`` alone (:attr:`TaskSpec.prev_input`).
    """

    def __init__(
        self,
        path: str | None = None,
        max_len: int = 128,
        meta_batch_size: int = 8,
        val_percent: int = 5,
        test_percent: int = 5,
        num_val_tasks: int = 64,
        num_test_tasks: int | None = None,
        eval_batch_size: int = 32,
        seed: int = 0,
        corpus: str = "pydoc",
        prev_input: bool = False,
    ) -> None:
        super().__init__()
        if corpus not in CORPORA:
            raise ValueError(
                f"task.corpus={corpus!r}: no such corpus; allowed: {' | '.join(CORPORA)} "
                "(or a file with task.path=<UTF-8 file>)"
            )
        if path is not None and corpus != "pydoc":
            raise ValueError(
                f"task.corpus={corpus!r} with task.path={str(path)!r}: give one of them "
                "(task.path=null for a named corpus)"
            )
        self.corpus = corpus
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
            raise ValueError(
                f"task.max_len={max_len!r}; must be an integer >= 2 (one byte + the end token)"
            )
        for name, value in (("val_percent", val_percent), ("test_percent", test_percent)):
            if not 0 < value < 50:
                raise ValueError(f"task.{name}={value!r}; must be in 1..49")
        self.path = path
        self.max_len = max_len
        self.meta_batch_size = check_count("meta_batch_size", meta_batch_size)
        self.val_percent, self.test_percent = val_percent, test_percent
        self.num_val_tasks = check_count("num_val_tasks", num_val_tasks)
        self.num_test_tasks = (
            None if num_test_tasks is None else check_count("num_test_tasks", num_test_tasks)
        )
        self.eval_batch_size = check_count("eval_batch_size", eval_batch_size)
        self.seed = seed
        self.spec = TaskSpec(
            "discrete",
            "classes",
            input_sizes=(max_len,),
            output_dim=256,
            name="text",
            sequential=True,
            sequence_name="line",
            token_name="char",
            kind="text",
            prev_input=check_flag("prev_input", prev_input),
        )
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        lines, self.source = load_lines(self.path, self.corpus)
        self.corpus_sha256 = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
        by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
        for line in lines:
            by_split[split_of(line, self.val_percent, self.test_percent)].append(line)
        for split in SPLITS:
            if not by_split[split]:
                raise ValueError(
                    f"task.path={self.source!r} has {len(lines)} line(s): too few to fill "
                    f"the {split} split; give a larger corpus"
                )
        self.lines = by_split
        self.encoded = {s: encode_lines(by_split[s], self.max_len) for s in SPLITS}
        self._loaded = True

    # ------------------------------------------------------------------ sampling
    def _batch(self, data: torch.Tensor, mask: torch.Tensor) -> TaskBatch:
        n = data.shape[0]
        positions = torch.arange(self.max_len).expand(n, -1)
        inputs = self.spec.model_inputs(positions, data)
        return TaskBatch(support_x=inputs, support_y=data, support_mask=mask)

    def sample(self, generator: torch.Generator, num_tasks: int | None = None) -> TaskBatch:
        """``num_tasks`` training lines drawn uniformly (with replacement)."""
        self._load()
        data, mask = self.encoded["train"]
        index = torch.randint(
            0, data.shape[0], (num_tasks or self.meta_batch_size,), generator=generator
        )
        return self._batch(data[index], mask[index])

    def _fixed(self, split: str, count: int | None) -> FixedTaskBatches:
        data, mask = self.encoded[split]
        if count is not None:
            data, mask = data[:count], mask[:count]
        return FixedTaskBatches(
            [
                self._batch(data[s : s + self.eval_batch_size], mask[s : s + self.eval_batch_size])
                for s in range(0, data.shape[0], self.eval_batch_size)
            ]
        )

    # ------------------------------------------------------------------ loaders
    def setup(self, stage: str | None = None) -> None:
        self._load()
        self.val_set = self._fixed("val", self.num_val_tasks)
        self.test_set = self._fixed("test", self.num_test_tasks)

    def metrics_extra(self) -> dict:
        """Provenance recorded in ``metrics.json``."""
        self._load()
        return {
            "data/corpus_sha256": self.corpus_sha256,
            "data/source": self.source,
            "test/unigram/nll_bits_per_char": round(self.unigram_bits_per_char(), 4),
        }

    def output_prior(self) -> torch.Tensor:
        """``[256]`` log-frequencies of the training lines' bytes (end token counted,
        add-one smoothed): the head bias that makes an untrained model a unigram model
        (``model.head_bias=prior``)."""
        return self._byte_log_prior().float()

    def _byte_log_prior(self) -> torch.Tensor:
        self._load()
        train_y, train_mask = self.encoded["train"]
        counts = torch.bincount(train_y[train_mask], minlength=256).double() + 1.0
        return (counts / counts.sum()).log()

    def unigram_bits_per_char(self) -> float:
        """A reference point for the test bits/char: a byte-frequency (unigram) model of
        the training lines (add-one smoothed over 256 values, the end token counted),
        scored on the same test lines as the model. A sequence model that does not beat
        it has learned only how often each byte occurs."""
        log2p = self._byte_log_prior() / math.log(2.0)
        test_y, test_mask = self.encoded["test"]
        if self.num_test_tasks is not None:
            test_y, test_mask = test_y[: self.num_test_tasks], test_mask[: self.num_test_tasks]
        return float(-log2p[test_y[test_mask]].mean())
