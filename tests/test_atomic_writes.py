"""Atomic writes (``lowbit.io.atomic``) clean up after themselves, whoever killed the writer.

Pinned here:

* a writer killed with SIGKILL in the middle of ``lowbit.save`` or of
  ``lowbit.io.gguf.export_gguf`` (a child process, stopped at a known point) leaves the old
  file byte-identical; the next save of the same target removes the temporary it left, and
  leaves no temporary of its own;
* a temporary whose writer is still running (a concurrent save) is never removed;
* written files get ``0o666 & ~umask`` whatever the writer (safetensors itself makes 0o600).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from gguf_helpers import write_tokenizer_gguf
from tiny_models import random_ids, tiny_llama

import lowbit
from lowbit.io.atomic import stale_temporaries, temporary_name, write_atomically
from lowbit.io.checkpoint import load_checkpoint
from lowbit.scheme import QuantScheme

TESTS = Path(__file__).resolve().parent
W4 = QuantScheme(bits=4, group_size=32, scale_dtype="float16")  # a scheme GGUF export copies as Q4_0


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@torch.no_grad()
def logits(model):
    return model(random_ids(1, 8, seed=3)).logits


# A child that starts a write and stops for good at `stage` ("writing": halfway through the
# safetensors bytes; "renaming": the temporary complete, just before the rename), after
# touching `ready`. The parent then kills it with SIGKILL.
CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import lowbit, lowbit.io.atomic as atomic, lowbit.io.checkpoint as ckpt
    from tiny_models import tiny_llama
    from lowbit.scheme import QuantScheme

    kind, target, ready, stage = sys.argv[1:5]

    def stop():
        Path(ready).touch()
        time.sleep(600)

    if stage == "writing":
        def half_written(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"\\0" * 4096)
            stop()
        ckpt.save_file = half_written
    else:
        real = atomic._restore_mode
        def before_rename(tmp, mode):
            real(tmp, mode)
            stop()
        atomic._restore_mode = before_rename
    model = tiny_llama(7)
    lowbit.quantize(model, QuantScheme(bits=4, group_size=32, scale_dtype="float16"), progress=False)
    if kind == "save":
        lowbit.save(model, target)
    else:
        from lowbit.io.gguf import export_gguf
        export_gguf(model, target, "Q4_0", source_gguf=sys.argv[5])
    """
)


def kill_writer_midway(tmp_path: Path, kind: str, target: Path, stage: str, *extra: str) -> None:
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, kind, str(target), str(ready), stage, *extra], env=env)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert child.poll() is None, f"the writer exited ({child.returncode}) before reaching {stage!r}"
            assert time.monotonic() < deadline, "the writer never reached the kill point"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    ready.unlink()
    assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize("stage", ["writing", "renaming"])
def test_kill_9_during_save_keeps_the_old_file_and_the_next_save_cleans_up(tmp_path, stage):
    target = tmp_path / "m.safetensors"
    first = tiny_llama(0)
    lowbit.quantize(first, W4, progress=False)
    lowbit.save(first, target)
    before = target.read_bytes()

    kill_writer_midway(tmp_path, "save", target, stage)
    assert target.read_bytes() == before  # the old file survived, byte for byte
    left = temporaries(tmp_path)
    assert len(left) == 1 and left[0].startswith(".m.safetensors.")  # the killed writer's
    assert torch.equal(logits(load_checkpoint(target)), logits(first))

    second = tiny_llama(1)
    lowbit.quantize(second, W4, progress=False)
    lowbit.save(second, target)
    assert temporaries(tmp_path) == []
    assert torch.equal(logits(load_checkpoint(target)), logits(second))


def test_kill_9_during_gguf_export_keeps_the_old_file_and_the_next_export_cleans_up(tmp_path):
    from lowbit.io.gguf import export_gguf

    tok = write_tokenizer_gguf(tmp_path / "tok.gguf")
    target = tmp_path / "m.gguf"
    model = tiny_llama(0)
    lowbit.quantize(model, W4, progress=False)
    export_gguf(model, target, "Q4_0", source_gguf=tok)
    before = target.read_bytes()

    kill_writer_midway(tmp_path, "gguf", target, "renaming", str(tok))
    assert target.read_bytes() == before
    assert len(temporaries(tmp_path)) == 1

    export_gguf(model, target, "Q4_0", source_gguf=tok)
    assert temporaries(tmp_path) == []
    assert target.read_bytes() == before  # the same model exports to the same bytes


def test_temporaries_of_live_writers_are_left_alone(tmp_path):
    target = tmp_path / "m.bin"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        live = tmp_path / temporary_name(target, sleeper.pid, "0123abcd")
        mine = tmp_path / temporary_name(target, os.getpid(), "4567cdef")
        other_target = tmp_path / temporary_name(tmp_path / "other.bin", 2**22 + 12345, "89abcdef")
        for p in (live, mine, other_target):
            p.write_bytes(b"partial")
        write_atomically(target, lambda tmp: tmp.write_bytes(b"new"))
        assert target.read_bytes() == b"new"
        assert live.exists() and mine.exists() and other_target.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert stale_temporaries(target) == [live]  # its writer is gone now
    write_atomically(target, lambda tmp: tmp.write_bytes(b"newer"))
    assert not live.exists() and mine.exists()


def test_a_dead_writers_temporary_is_removed(tmp_path):
    target = tmp_path / "m.bin"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale = tmp_path / temporary_name(target, int(done.stdout), "deadbeef")
    stale.write_bytes(b"partial")
    write_atomically(target, lambda tmp: tmp.write_bytes(b"new"))
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_written_files_get_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        model = tiny_llama(0)
        lowbit.quantize(model, W4, progress=False)
        lowbit.save(model, tmp_path / "m.safetensors")
        write_atomically(tmp_path / "x.bin", lambda tmp: tmp.write_bytes(b"x"))
    finally:
        os.umask(old)
    for name in ("m.safetensors", "x.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
