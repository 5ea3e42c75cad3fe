"""Evaluation: perplexity (one documented protocol), KL / top-1 against a reference, speed, memory."""

from lowbit.eval.compare import ComparisonResult, compare_many, compare_models
from lowbit.eval.data import load_wikitext2_test_text, tokenize_once, wikitext2_test_path
from lowbit.eval.memory import current_rss_bytes, file_size_bytes, model_bytes, peak_rss_bytes
from lowbit.eval.perplexity import PerplexityResult, make_windows, perplexity
from lowbit.eval.speed import DecodeResult, PrefillResult, measure_decode, measure_prefill, time_fn

__all__ = [
    "ComparisonResult",
    "DecodeResult",
    "PerplexityResult",
    "PrefillResult",
    "compare_many",
    "compare_models",
    "current_rss_bytes",
    "file_size_bytes",
    "load_wikitext2_test_text",
    "make_windows",
    "measure_decode",
    "measure_prefill",
    "model_bytes",
    "peak_rss_bytes",
    "perplexity",
    "time_fn",
    "tokenize_once",
    "wikitext2_test_path",
]
