"""On-disk store of frozen-encoder outputs, so that training embeds each slice once.

A backend, not an encoder: ``Engine.store_embeddings`` embeds what is missing with the engine's one encoder loop and
writes it here; training then reads every slice from the store.

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
from typing import Sequence

import numpy as np
from .files import atomic_write, atomic_write_text, output_lock
from .normalize import Normalization
from .toolbox import content_hash

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


class EmbeddingStore:
    """Embeddings of slices for one (backbone, normalisation) pair, on disk under ``root``.

    ``get(slices_raw)`` returns one (embedding, early) pair of read-only memory-mapped float32 arrays per slice, or
    None for a missing or damaged entry; ``Engine.store_embeddings`` fills them.
    """

    def __init__(self, root: str | Path, backbone, normalization: Normalization):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.normalization = normalization
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
    def load(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The entry, memory-mapped, or None if absent or damaged (its checksums are verified on every call)."""
        embedding_path, early_path, meta_path = self.paths(key)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            embedding = np.load(embedding_path, mmap_mode="r")
            early = np.load(early_path, mmap_mode="r")
        except (OSError, ValueError, json.JSONDecodeError):
            return None
        if (meta.get("version") != FORMAT_VERSION or meta.get("embedding") != content_hash(embedding)
                or meta.get("early") != content_hash(early)):
            return None
        return embedding, early

    def exists(self, key: str) -> bool:
        return any(path.exists() for path in self.paths(key))

    def get(self, slices_raw: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """(embedding (256, h, w), early (C, h, w)) per raw slice, read-only and memory-mapped; None where the store
        has no intact entry."""
        return [self.load(self.key(s)) for s in slices_raw]

    # ---- writing ------------------------------------------------------------------------------------------
    def write(self, key: str, embedding: np.ndarray, early: np.ndarray) -> None:
        """Write one entry atomically, its JSON (with the checksums) last, under the store's lock: two trainings
        sharing a store never interleave the three files of one entry."""
        embedding_path, early_path, meta_path = self.paths(key)
        embedding = np.ascontiguousarray(embedding, dtype=np.float32)
        early = np.ascontiguousarray(early, dtype=np.float32)

        def save_array(array: np.ndarray):
            def write(temporary: Path):
                with open(temporary, "wb") as handle:
                    np.save(handle, array)
            return write

        meta = {"version": FORMAT_VERSION, "embedding": content_hash(embedding), "early": content_hash(early),
                "embedding_shape": list(embedding.shape), "early_shape": list(early.shape)}
        with output_lock(meta_path):
            if self.exists(key):
                self.recomputed += 1
            meta_path.unlink(missing_ok=True)  # the entry does not exist until its JSON is back
            atomic_write(embedding_path, save_array(embedding))
            atomic_write(early_path, save_array(early))
            atomic_write_text(meta_path, json.dumps(meta))
        self.computed += 1
