"""Calibration data: text files, folders, jsonl or strings -> token windows ``[n, seqlen]``.

The windows are cut at random offsets (a ``torch.Generator`` seeded with ``seed``; no global
RNG) out of the texts joined with blank lines and tokenized once without special tokens, the
way the GPTQ reference samples its calibration set. ``CalibrationData.description`` records
what was used; it goes into the checkpoint manifest.

Data-free calibration (``sample_from_model``) draws the windows from the full-precision model
itself: ancestral sampling at temperature 1 from the beginning-of-sequence token.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

from lowbit.errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".raw", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
DEFAULT_N_SAMPLES = 128  # the GPTQ reference: 128 windows of 2048 tokens, seed 0
DEFAULT_SEQLEN = 2048
DEFAULT_SEED = 0


@dataclass
class CalibrationData:
    """Token windows for calibration.

    ids:          int64 ``[n_samples, seqlen]``.
    description:  JSON-able record of where the windows came from (source, files, sizes, seed).
    """

    ids: torch.Tensor
    description: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.ids, torch.Tensor) or self.ids.dim() != 2 or self.ids.dtype != torch.long:
            got = (
                f"{self.ids.dtype} {tuple(self.ids.shape)}" if isinstance(self.ids, torch.Tensor) else type(self.ids).__name__
            )
            raise DataError(f"calibration ids must be an int64 tensor [n_samples, seqlen], got {got}")
        if self.ids.shape[0] == 0 or self.ids.shape[1] < 2:
            raise DataError(f"calibration needs at least one window of >= 2 tokens, got {tuple(self.ids.shape)}")
        self.description = {"n_samples": int(self.ids.shape[0]), "seqlen": int(self.ids.shape[1]), **self.description}

    @property
    def n_tokens(self) -> int:
        return self.ids.numel()


def _files_under(path: pathlib.Path) -> list[pathlib.Path]:
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
    )
    if not files:
        raise DataError(
            f"calibration folder {str(path)!r} holds no text files ({', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)})"
        )
    return files


def _read_jsonl(path: pathlib.Path, text_field: str) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or text_field not in row:
                fields = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(
                    f"{path}:{lineno} has no field {text_field!r} (it has {fields}); "
                    "name the text field with text_field=..."
                )
            if not isinstance(row[text_field], str):
                raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(row[text_field]).__name__}, not text")
            texts.append(row[text_field])
    return texts


def _read_text(path: pathlib.Path) -> tuple[str, str]:
    """UTF-8, else Latin-1 (older corpora such as the State of the Union speeches mix them)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"


def load_texts(
    source: Union[str, pathlib.Path, Sequence[str]], *, text_field: str = "text"
) -> tuple[list[str], list[str]]:
    """Texts from a file (plain text or jsonl), a folder of such files, or a list of strings.

    Returns ``(texts, origins)``; origins name the files read (or ``["<list of N strings>"]``).
    Plain text is read as UTF-8, or as Latin-1 where it is not valid UTF-8 (said in origins).
    Empty input is a DataError.
    """
    if isinstance(source, (str, pathlib.Path)):
        path = pathlib.Path(source).expanduser()
        if not path.exists():
            raise DataError(
                f"calibration source {str(path)!r} does not exist; pass a text/jsonl file or a folder of them"
            )
        files = _files_under(path) if path.is_dir() else [path]
        texts: list[str] = []
        origins = []
        for f in files:
            if f.suffix.lower() in JSONL_SUFFIXES:
                texts.extend(_read_jsonl(f, text_field))
                origins.append(str(f))
            else:
                text, encoding = _read_text(f)
                texts.append(text)
                origins.append(str(f) if encoding == "utf-8" else f"{f} (read as {encoding})")
    elif isinstance(source, Sequence) and all(isinstance(t, str) for t in source):
        texts = list(source)
        origins = [f"<list of {len(texts)} strings>"]
    else:
        raise DataError(f"calibration source must be a path or a list of strings, got {type(source).__name__}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        where = origins[0] if len(origins) == 1 else origins
        raise DataError(f"calibration source {where} holds no text (empty); give it some text")
    return texts, origins


def _check_sizes(n_samples: int, seqlen: int) -> None:
    for name, v, lo in (("n_samples", n_samples, 1), ("seqlen", seqlen, 2)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise DataError(f"{name} must be an integer >= {lo}, got {v!r}")


def sample_windows(token_ids: torch.Tensor, n_samples: int, seqlen: int, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """``n_samples`` windows of ``seqlen`` tokens at random offsets into 1-D ``token_ids``."""
    _check_sizes(n_samples, seqlen)
    total = int(token_ids.numel())
    if total < seqlen:
        raise DataError(
            f"the calibration text is {total} tokens, shorter than one window of {seqlen}; add text or lower seqlen"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen + 1, (n_samples,), generator=g)
    return torch.stack([token_ids[s : s + seqlen] for s in starts.tolist()])


def from_texts(
    source: Union[str, pathlib.Path, Sequence[str]],
    tokenizer,
    *,
    n_samples: int = DEFAULT_N_SAMPLES,
    seqlen: int = DEFAULT_SEQLEN,
    seed: int = DEFAULT_SEED,
    text_field: str = "text",
) -> CalibrationData:
    """Calibration windows from text: joined with blank lines, tokenized once, sampled."""
    _check_sizes(n_samples, seqlen)
    texts, origins = load_texts(source, text_field=text_field)
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    windows = sample_windows(ids.to(torch.long), n_samples, seqlen, seed)
    return CalibrationData(
        windows,
        {
            "source": "text",
            "files": origins[:20] + ([f"... and {len(origins) - 20} more"] if len(origins) > 20 else []),
            "n_texts": len(texts),
            "text_tokens": int(ids.numel()),
            "seed": seed,
            "windows_overlap": bool(n_samples * seqlen > ids.numel()),
        },
    )


@torch.no_grad()
def sample_from_model(
    model: torch.nn.Module,
    *,
    bos_token_id: Optional[int],
    n_samples: int = 32,
    seqlen: int = 512,
    seed: int = DEFAULT_SEED,
    batch_size: int = 16,
    temperature: float = 1.0,
) -> CalibrationData:
    """Data-free calibration: windows sampled from ``model`` itself (a causal LM with a KV cache).

    Each window starts with ``bos_token_id`` (a uniformly drawn token if None) and continues by
    sampling the model's next-token distribution at ``temperature``; end-of-text tokens are kept
    and sampling goes on, so every window is full length.
    """
    _check_sizes(n_samples, seqlen)
    if not temperature > 0:
        raise DataError(f"temperature must be > 0, got {temperature!r}")
    g = torch.Generator().manual_seed(seed)  # on the CPU: the same draws whatever the model's device
    vocab = model.get_input_embeddings().num_embeddings
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, n_samples, batch_size):
            b = min(batch_size, n_samples - start)
            if bos_token_id is None:
                first = torch.randint(0, vocab, (b, 1), generator=g)
            else:
                first = torch.full((b, 1), int(bos_token_id), dtype=torch.long)
            seq = [first]
            res = model(input_ids=first.to(device), use_cache=True)
            for _ in range(seqlen - 1):
                probs = torch.softmax(res.logits[:, -1, :].float() / temperature, dim=-1).cpu()
                nxt = torch.multinomial(probs, 1, generator=g)
                seq.append(nxt)
                res = model(input_ids=nxt.to(device), past_key_values=res.past_key_values, use_cache=True)
            out.append(torch.cat(seq, dim=1))
    finally:
        model.train(was_training)
    return CalibrationData(
        torch.cat(out),
        {"source": "data-free (sampled from the full-precision model)", "seed": seed, "temperature": temperature},
    )


def as_calibration(data: Any) -> CalibrationData:
    """Accept CalibrationData, or an int64 tensor ``[n, seqlen]`` of token ids."""
    if isinstance(data, CalibrationData):
        return data
    if isinstance(data, torch.Tensor):
        return CalibrationData(data, {"source": "token ids given by the caller"})
    raise DataError(
        "calibration must be CalibrationData (lowbit.calibration.from_texts / sample_from_model) "
        f"or an int64 tensor [n_samples, seqlen], got {type(data).__name__}"
    )
