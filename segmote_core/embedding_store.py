"""On-disk store of frozen-encoder outputs, so that training embeds each slice once.

The encoder is frozen, so a slice's embedding (256, 64, 64) and early feature (C, 64, 64) never change while the
adapters train. The store keeps them as ``.npy`` files read back memory-mapped (``np.load(mmap_mode="r")``): a
dataset larger than RAM trains from disk, and the OS page cache keeps the hot slices in memory.

Key of an entry (SHA-256 over): the backbone's name, input size and weights checksum
(``backbone.weights_sha256``; a random-init backbone is hashed from its tensors), the normalisation rule **and**
its resolved bounds (a percentile rule gives other bounds on another scan), and the raw slice content (shape,
dtype, bytes). A changed scan, window or backbone therefore never reuses a stale embedding.

Layout under ``root``: ``<key>.embedding.npy``, ``<key>.early.npy`` and ``<key>.json`` — the JSON holds the
BLAKE2b checksums of both arrays and is written last (each file atomically), so an entry without a complete JSON
does not exist. Every ``get`` verifies the entries it returns against their checksums; a missing, truncated or
corrupted entry is recomputed (counted in ``recomputed``) rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .devices import default_encoder_batch
from .files import atomic_write, atomic_write_text
from .normalize import Normalization

FORMAT_VERSION = 1


def backbone_checksum(backbone) -> str:
    """The weights checksum that loading recorded, or a hash of the tensors of a randomly initialised backbone."""
    recorded = getattr(backbone, "weights_sha256", None)
    if recorded:
        return str(recorded)
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return "tensors:" + digest.hexdigest()


def _array_checksum(array: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str((array.shape, array.dtype.str)).encode())
    digest.update(np.ascontiguousarray(array).view(np.uint8).reshape(-1))
    return digest.hexdigest()


class EmbeddingStore:
    """Embeddings of slices for one (backbone, normalisation) pair, on disk under ``root``.

    ``get(slices_raw, slices01)`` returns one (embedding, early) pair of read-only memory-mapped float32 arrays per
    slice, computing (batched) only the missing or damaged entries.
    """

    def __init__(self, root: str | Path, backbone, normalization: Normalization,
                 batch_size: int | None = None):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.backbone = backbone
        self.normalization = normalization
        self.batch_size = batch_size or default_encoder_batch(backbone.device)
        identity = {
            "version": FORMAT_VERSION, "backbone": backbone.name, "input_size": int(backbone.input_size),
            "weights": backbone_checksum(backbone), "rule": normalization.rule_dict(),
            "bounds": list(normalization.key()),
        }
        self._prefix = json.dumps(identity, sort_keys=True).encode()
        self.computed = 0  # entries embedded in this process
        self.recomputed = 0  # of which: entries that existed but were missing a file or failed their checksum

    def key(self, slice_raw: np.ndarray) -> str:
        """Store key of one raw (not normalised) slice under this store's backbone and normalisation."""
        digest = hashlib.sha256(self._prefix)
        array = np.ascontiguousarray(slice_raw)
        digest.update(str((array.shape, array.dtype.str)).encode())
        digest.update(array.view(np.uint8).reshape(-1))
        return digest.hexdigest()

    def paths(self, key: str) -> tuple[Path, Path, Path]:
        return (self.root / f"{key}.embedding.npy", self.root / f"{key}.early.npy", self.root / f"{key}.json")

    # ---- reading ------------------------------------------------------------------------------------------
    def _load(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The entry, memory-mapped, or None if absent or damaged (its checksums are verified on every call)."""
        embedding_path, early_path, meta_path = self.paths(key)
        try:
            meta = json.loads(meta_path.read_text())
            embedding = np.load(embedding_path, mmap_mode="r")
            early = np.load(early_path, mmap_mode="r")
        except (OSError, ValueError, json.JSONDecodeError):
            return None
        if (meta.get("version") != FORMAT_VERSION or meta.get("embedding") != _array_checksum(embedding)
                or meta.get("early") != _array_checksum(early)):
            return None
        return embedding, early

    def exists(self, key: str) -> bool:
        return any(path.exists() for path in self.paths(key))

    def get(self, slices_raw: Sequence[np.ndarray], slices01: Sequence[np.ndarray] | Callable[[int], np.ndarray],
            progress: Callable[[int, int], None] | None = None,
            only: Sequence[int] | None = None) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """(embedding (256, h, w), early (C, h, w)) per slice; missing ones are embedded in batches.

        slices_raw: the raw slices (they key the store); slices01: the same slices normalised to [0, 1] (a list, or
        a function index -> slice, called only for slices that must be embedded). only: compute just these indices
        (DDP ranks share the work); the others are returned if already stored, else None.
        """
        keys = [self.key(s) for s in slices_raw]
        results: list = [self._load(k) for k in keys]
        allowed = set(range(len(keys))) if only is None else set(only)
        missing = [i for i, value in enumerate(results) if value is None and i in allowed]
        done = len(keys) - len(missing)
        if progress:
            progress(done, len(keys))
        for start in range(0, len(missing), self.batch_size):
            batch = missing[start:start + self.batch_size]
            images = [slices01(i) if callable(slices01) else slices01[i] for i in batch]
            self._compute([keys[i] for i in batch], images)
            for i in batch:
                results[i] = self._load(keys[i])
                if results[i] is None:  # pragma: no cover - the disk lost what was just written
                    raise OSError(f"embedding store {self.root}: entry {keys[i]} unreadable right after writing")
            done += len(batch)
            if progress:
                progress(done, len(keys))
        return results

    # ---- writing ------------------------------------------------------------------------------------------
    def _compute(self, keys: Sequence[str], images01: Sequence[np.ndarray]) -> None:
        """Embed one batch of same-shape slices (grouped by shape otherwise) and write their entries."""
        groups: dict[tuple, list[int]] = {}
        for index, image in enumerate(images01):
            groups.setdefault(tuple(image.shape), []).append(index)
        for indices in groups.values():
            batch = torch.from_numpy(np.stack([np.asarray(images01[i], dtype=np.float32) for i in indices]))
            with torch.inference_mode():
                x = self.backbone.preprocess(batch.to(self.backbone.device))
                embedding, early = self.backbone.encode(x)
            embedding = embedding.float().cpu().numpy()
            early = early.float().cpu().numpy()
            for row, index in enumerate(indices):
                self._write(keys[index], embedding[row], early[row])

    def _write(self, key: str, embedding: np.ndarray, early: np.ndarray) -> None:
        embedding_path, early_path, meta_path = self.paths(key)
        if self.exists(key):
            self.recomputed += 1
        meta_path.unlink(missing_ok=True)  # the entry does not exist until its JSON is back
        embedding = np.ascontiguousarray(embedding, dtype=np.float32)
        early = np.ascontiguousarray(early, dtype=np.float32)

        def save_array(array: np.ndarray):
            def write(temporary: Path):
                with open(temporary, "wb") as handle:
                    np.save(handle, array)
            return write

        atomic_write(embedding_path, save_array(embedding))
        atomic_write(early_path, save_array(early))
        meta = {"version": FORMAT_VERSION, "embedding": _array_checksum(embedding), "early": _array_checksum(early),
                "embedding_shape": list(embedding.shape), "early_shape": list(early.shape)}
        atomic_write_text(meta_path, json.dumps(meta))
        self.computed += 1
