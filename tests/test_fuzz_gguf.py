"""Seeded fuzzing of ``import_gguf`` (the engine is tests/gguf_fuzz.py; benchmarks/fuzz_gguf.py
runs the same cases at scale).

Every case must raise a ``LowbitError`` with a one-line message or load a model whose logits
equal the unmutated file's exactly, within a time and memory limit; only the documented
``KNOWN_UNDETECTABLE`` classes may load silently different models (GGUF has no checksums).
"""

from __future__ import annotations

import pytest

import gguf_fuzz as fz

N_CASES = 300  # 15 per mutation class
SEED = 20240616


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return fz.make_bases(tmp_path_factory.mktemp("fuzz-bases"))


def test_every_class_has_a_mutator_and_known_classes_are_documented():
    assert set(fz.KNOWN_UNDETECTABLE) <= set(fz.CLASSES)
    assert all(len(why) > 20 for why in fz.KNOWN_UNDETECTABLE.values())


def test_harness_flags_silent_differences_outside_known_classes(bases):
    """The classifier itself: a silently different load fails the check unless its class is known."""
    case = next(fz.generate(bases, 1, SEED))
    for cls, failed in (("kv_bitflip", True), ("data_bitflip", False)):
        case.cls = cls
        assert fz.Result(case, "silently-different", "", 0.0).failed is failed
    assert fz.Result(case, "typed-error", "multi\nline", 0.0, one_line=False).failed


def test_harness_limits(bases, tmp_path):
    """The unmutated file loads identically; under a 4 MiB memory budget or a 50 ms time limit the
    same case counts as a memory blow-up or a hang."""
    case = next(fz.generate(bases, 1, SEED))
    case.data = case.base.data
    assert fz.run_case(case, tmp_path).outcome == "identical"
    assert fz.run_case(case, tmp_path, mem_bytes=4 << 20).outcome == "memory-blow-up"
    assert fz.run_case(case, tmp_path, time_limit=0.05).outcome == "hang"


def test_fuzz_import_gguf(bases, tmp_path):
    cases = list(fz.generate(bases, N_CASES, SEED))
    results = fz.run_cases(cases, tmp_path, time_limit=30.0, mem_bytes=1 << 30)
    table = fz.markdown_table(results)
    failed = [r for r in results if r.failed]
    assert not failed, table + "\n" + "\n".join(r.describe() for r in failed[:20])
    seen = {r.case.cls for r in results}
    assert seen == set(fz.CLASSES), f"classes never generated: {set(fz.CLASSES) - seen}"
    # the refusals are the point: every must-detect class is refused at least once
    refused = {r.case.cls for r in results if r.outcome == "typed-error"}
    assert set(fz.CLASSES) - set(fz.KNOWN_UNDETECTABLE) <= refused, table
