"""Seeded fuzzing of ``lowbit.io.checkpoint.load_checkpoint`` (tests/checkpoint_fuzz.py).

Every (mutation class, mode) pair of ``checkpoint_fuzz.CLASSES`` runs ``PER_CLASS`` cases on
tiny Llama checkpoints (W4 g32 sym / asym, W8 per channel, NF4); each case must raise a
``LowbitError`` or load a model whose logits equal the original's exactly, within
``TIME_LIMIT`` seconds (a hang fails) and 2 GiB of extra address space. About 15 s on 2 cores;
``benchmarks/fuzz_checkpoint.py`` runs ten thousand and more.
"""

from __future__ import annotations

import os

import pytest

import checkpoint_fuzz as cf

PER_CLASS = 12
SEED = 20240616
TIME_LIMIT = 30.0

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the fuzzer forks a child per case")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    bases = cf.make_bases(tmp_path_factory.mktemp("bases"))
    return cf.run_cases(cf.generate(bases, PER_CLASS * len(cf.CLASSES), SEED), time_limit=TIME_LIMIT)


def test_every_case_is_refused_or_identical(results):
    bad = [r.line() for r in results if r.failed]
    assert not bad, f"{len(bad)} of {len(results)} cases:\n" + "\n".join(bad[:20]) + "\n\n" + cf.markdown_table(results)


def test_every_class_and_mode_is_exercised(results):
    table = cf.counts(results)
    assert set(table) == set(cf.CLASSES)
    assert all(sum(c.values()) == PER_CLASS for c in table.values())
    # the control loads; every class that breaks the file is refused at least once
    for (cls, mode), c in table.items():
        if cls == "unmodified":
            assert c["identical"] == PER_CLASS
        else:
            assert c["typed-error"] > 0, (cls, mode)
