"""Evaluation text: WikiText-2 (raw) test split, found locally and checksummed.

The data lives in a ``shared/data`` directory next to (above) the repository,
laid out as::

    shared/data/SHA256SUMS                      # "<sha256 hex>  <relative path>" per line
    shared/data/wikitext-2-raw/wiki.test.raw

``LOWBIT_DATA_DIR`` (an environment variable naming the ``data`` directory
itself) overrides the search. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Optional

import torch

from lowbit.errors import DataError

DATA_DIR_ENV = "LOWBIT_DATA_DIR"
WIKITEXT2_TEST_RELPATH = "wikitext-2-raw/wiki.test.raw"
CHECKSUM_FILE = "SHA256SUMS"
WIKITEXT2_TEST_NAME = "WikiText-2 (raw) test"


def _clone_origin(start: pathlib.Path) -> Optional[pathlib.Path]:
    """The local directory this git checkout was cloned from, if it was cloned from a local path."""
    for ancestor in (start, *start.parents):
        config = ancestor / ".git" / "config"
        if config.is_file():
            in_origin = False
            for line in config.read_text(errors="replace").splitlines():
                line = line.strip()
                if line.startswith("["):
                    in_origin = line == '[remote "origin"]'
                elif in_origin and line.startswith("url"):
                    url = line.split("=", 1)[1].strip().removeprefix("file://")
                    path = pathlib.Path(url)
                    return path.resolve() if path.is_absolute() and path.is_dir() else None
            return None
    return None


def find_data_dir() -> pathlib.Path:
    """The directory holding evaluation data.

    ``$LOWBIT_DATA_DIR`` if set; otherwise the first ``<ancestor>/shared/data``
    found walking up from this file's directory, then from the current
    working directory, then (for a clone of a local checkout, as CI makes in a
    temporary directory) from the checkout it was cloned from. Raises DataError (with the fix) when none exists.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = pathlib.Path(env).expanduser()
        if not path.is_dir():
            raise DataError(
                f"${DATA_DIR_ENV} is set to {env!r}, which is not a directory; point it at the "
                f"directory that holds {CHECKSUM_FILE} and {WIKITEXT2_TEST_RELPATH}, or unset it"
            )
        return path
    starts = [pathlib.Path(__file__).resolve().parent, pathlib.Path.cwd().resolve()]
    origin = _clone_origin(pathlib.Path(__file__).resolve().parent)
    if origin is not None:  # a clone made elsewhere (CI's temporary checkout): its origin's neighbours
        starts.append(origin)
    for start in starts:
        for ancestor in (start, *start.parents):
            candidate = ancestor / "shared" / "data"
            if candidate.is_dir():
                return candidate
    raise DataError(
        f"no evaluation data directory found (looked for shared/data above {starts[0]} and "
        f"above {starts[1]}); set ${DATA_DIR_ENV} to the directory that holds {CHECKSUM_FILE} "
        f"and {WIKITEXT2_TEST_RELPATH}"
    )


def read_checksums(data_dir: pathlib.Path) -> dict[str, str]:
    """Parse ``SHA256SUMS`` (sha256sum format: ``<hex>  <path>``, ``*`` marks binary mode)."""
    sums_path = data_dir / CHECKSUM_FILE
    if not sums_path.is_file():
        raise DataError(
            f"{sums_path} is missing, so the evaluation data cannot be verified; restore it "
            f"(format: '<sha256>  <relative path>' per line, as written by sha256sum)"
        )
    sums: dict[str, str] = {}
    for lineno, line in enumerate(sums_path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise DataError(
                f"{sums_path}:{lineno} is not '<sha256>  <path>': {line!r}; fix or regenerate "
                f"the file with sha256sum"
            )
        digest, name = parts
        sums[name.lstrip("*").strip()] = digest.lower()
    return sums


def sha256_file(path: pathlib.Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verified_data_file(relpath: str, data_dir: pathlib.Path | None = None) -> pathlib.Path:
    """Path of ``data_dir/relpath`` after checking it against ``SHA256SUMS``.

    Raises DataError when the file is missing, not listed, or its hash differs.
    """
    data_dir = find_data_dir() if data_dir is None else pathlib.Path(data_dir)
    path = data_dir / relpath
    if not path.is_file():
        raise DataError(
            f"{path} is missing; put the file there (or set ${DATA_DIR_ENV} to a directory "
            f"that has {relpath} and {CHECKSUM_FILE})"
        )
    sums = read_checksums(data_dir)
    expected = sums.get(relpath)
    if expected is None:
        raise DataError(
            f"{data_dir / CHECKSUM_FILE} has no entry for {relpath}; add its sha256 line"
        )
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(
            f"{path} is corrupted or a different version: sha256 {actual}, expected {expected} "
            f"(from {CHECKSUM_FILE}); restore the original file"
        )
    return path


def wikitext2_test_path() -> pathlib.Path:
    """Path of WikiText-2 raw ``wiki.test.raw``, verified against ``SHA256SUMS``."""
    return verified_data_file(WIKITEXT2_TEST_RELPATH)


def load_wikitext2_test_text(path: str | pathlib.Path | None = None) -> str:
    """The WikiText-2 test text, joined exactly as the GPTQ reference does.

    Protocol: the GPTQ reference evaluates on
    ``"\\n\\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])``.
    The rows of that Hugging Face dataset are the lines of the raw file
    ``wiki.test.raw`` *with* their trailing newline (4358 rows), i.e.
    ``raw.splitlines(keepends=True)``. So the text is::

        "\\n\\n".join(raw.splitlines(keepends=True))

    (each original line, newline included, followed by two more newlines,
    except after the last). ``path=None`` uses ``wikitext2_test_path()``,
    which verifies the checksum; an explicit ``path`` is read as is.
    """
    if path is None:
        path = wikitext2_test_path()
    path = pathlib.Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataError(f"{path} does not exist; pass the path of wiki.test.raw") from exc
    if not raw:
        raise DataError(f"{path} is empty; restore the WikiText-2 raw test file")
    return "\n\n".join(raw.splitlines(keepends=True))


def tokenize_once(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D LongTensor ``[n_tokens]``.

    The whole text is tokenized in one call with ``add_special_tokens=False``
    (no BOS/EOS inserted), as in the GPTQ protocol.
    """
    if not text:
        raise DataError("cannot tokenize an empty text; check the evaluation data")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)
