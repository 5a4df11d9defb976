"""Read an offline W&B run back: the records of ``run-<id>.wandb``.

An offline run keeps its config, history, summary, artifacts and exit code only in this
binary transaction log. wandb 0.31 has no Python reader for it any more (its own reader,
``wandb leet inspect --json``, is in the Go ``wandb-core`` binary), so the framing is
read here and each record parsed with wandb's own protobuf type
(``wandb.proto.wandb_internal_pb2.Record``). The framing is LevelDB's log format: a
7-byte file header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each
with a 7-byte header (CRC-32 of type byte + payload, length, type: full, first, middle or
last); a block's tail shorter than a chunk header is zero padding. The tests compare this
reader with ``wandb leet inspect`` on a real run.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from conftest import REPO_ROOT
from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[pb.Record]:
    """Every record of a ``.wandb`` file, in order (checksums verified)."""
    data = Path(path).read_bytes()
    ident, magic, version = HEADER.unpack_from(data)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B log"
    payloads: list[bytes] = []
    pending: bytes | None = None
    pos = HEADER.size
    while pos + CHUNK.size <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK.size:
            pos += left_in_block
            continue
        checksum, length, kind = CHUNK.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += left_in_block
            continue
        chunk = data[pos + CHUNK.size : pos + CHUNK.size + length]
        assert len(chunk) == length, f"{path}: truncated chunk at byte {pos}"
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum, (
            f"{path}: bad checksum at byte {pos}"
        )
        pos += CHUNK.size + length
        if kind == FULL:
            payloads.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            payloads.append(pending + chunk)
            pending = None
        else:
            raise AssertionError(f"{path}: unknown chunk type {kind} at byte {pos}")
    return [pb.Record.FromString(p) for p in payloads]


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


@dataclass
class OfflineRun:
    """What an offline run logged, from its records and its files/ folder."""

    dir: Path
    records: list = field(repr=False)
    run_id: str = ""
    group: str = ""
    name: str = ""
    config: dict = field(default_factory=dict, repr=False)
    history: list[dict] = field(default_factory=list, repr=False)
    summary: dict = field(default_factory=dict, repr=False)
    artifacts: list = field(default_factory=list, repr=False)
    exit_code: int | None = None

    @property
    def history_keys(self) -> set[str]:
        return {k for row in self.history for k in row}

    def media(self, kind: str) -> list[Path]:
        """Files under ``files/media/<kind>/`` (``images``, ``table``)."""
        return sorted(p for p in (self.dir / "files" / "media" / kind).rglob("*") if p.is_file())


def load_offline_run(run_dir: str | Path) -> OfflineRun:
    """The one ``offline-run-*`` dir of a W&B offline run dir, or ``run_dir`` itself."""
    run_dir = Path(run_dir)
    (log_file,) = run_dir.glob("run-*.wandb")
    records = read_records(log_file)
    run = OfflineRun(run_dir, records)
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id = record.run.run_id
            run.group = record.run.run_group
            run.name = record.run.display_name
            run.config |= {i.key: json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "config":
            run.config |= {i.key: json.loads(i.value_json) for i in record.config.update}
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run.summary |= {_key(i): json.loads(i.value_json) for i in record.summary.update}
        elif kind == "artifact":
            run.artifacts.append(record.artifact)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def offline_runs(run_dir: str | Path) -> list[OfflineRun]:
    """Every offline W&B run under ``<run dir>/wandb/``, oldest first."""
    return [load_offline_run(d) for d in sorted(Path(run_dir).glob("wandb/offline-run-*"))]


def run_train(args, home, timeout=300) -> subprocess.CompletedProcess:
    """``python -m reptile_gen.train <args>`` offline, with every W&B folder (staged
    artifacts, cache, settings) inside ``home`` and no API key."""
    env = dict(
        os.environ,
        WANDB_MODE="offline",
        WANDB_DIR=str(home / "wandb_dir"),
        WANDB_DATA_DIR=str(home / "wandb_data"),
        WANDB_CACHE_DIR=str(home / "wandb_cache"),
        WANDB_CONFIG_DIR=str(home / "wandb_config"),
        PROJECT_ROOT=str(home),
        OMP_NUM_THREADS="1",
    )
    for key in ("WANDB_API_KEY", "HYDRA_FULL_ERROR", "WANDB_RUN_ID", "WANDB_RESUME"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "reptile_gen.train", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
