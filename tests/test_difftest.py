"""The differential scenario harness for the virtual sync (``virtual/scenarios.py``,
``tools/difftest.py``).

A fixed-seed subset of what ``tools/difftest.py`` runs: Dovecot against Dovecot must give
zero differences (the harness's determinism self-check), in snapshot mode (open-time sync)
and replica mode (a long-lived IMAP session). The masks and the reproduction printer are
checked on their own, including on a deliberately altered dump, and an engine that does
nothing must be caught.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from virtual.scenarios import (
    MASKS,
    Capture,
    DovecotOpenEngine,
    Failure,
    MaskState,
    ScenarioGenerator,
    Store,
    SyncEngine,
    capture,
    compare_captures,
    extension_names,
    format_failure,
    make_engine,
    mask_dump,
    new_store,
    register_engine,
    run_scenario,
    snapshot,
)

# Seeds chosen (by their generated operations) to cover both storages, a virtual index
# created by the engine (3, 10) or already there (12, 47) at round 0, and among them
# config edits, deletes, recreates, renames, uid validity changes, changes through the
# virtual mailbox and pending virtual changes.
SNAPSHOT_SEEDS = [(3, "sdbox"), (10, "maildir"), (12, "maildir"), (47, "sdbox")]
SESSION_SEEDS = [(21, "sdbox"), (44, "maildir")]


def _check(result) -> None:  # type: ignore[no-untyped-def]
    assert result.ok, format_failure(result.failure)


@pytest.mark.live
@pytest.mark.parametrize(("seed", "storage"), SNAPSHOT_SEEDS)
def test_dovecot_open_vs_dovecot_open(seed: int, storage: str) -> None:
    result = run_scenario(seed, rounds=4, storage=storage)
    _check(result)
    assert result.mode == "snapshot" and result.rounds_run == 5
    assert result.workdir is None  # cleaned up


@pytest.mark.live
@pytest.mark.parametrize(("seed", "storage"), SESSION_SEEDS)
def test_dovecot_session_vs_dovecot_session(seed: int, storage: str) -> None:
    result = run_scenario(seed, rounds=4, storage=storage, engine_a="dovecot-session",
                          engine_b="dovecot-session")
    _check(result)
    assert result.mode == "replica" and result.rounds_run == 5


class NullEngine(SyncEngine):
    """A broken engine: never syncs anything."""

    name = "null"

    def sync(self, store: Store) -> None:
        return None


@pytest.mark.live
def test_an_engine_that_does_nothing_is_caught() -> None:
    register_engine("null", NullEngine)
    result = run_scenario(3, rounds=3, storage="sdbox", engine_b="null")
    assert not result.ok
    failure = result.failure
    assert failure is not None
    kinds = {d.kind for d in failure.differences}
    assert "virtual index" in kinds, format_failure(failure)
    text = format_failure(failure)
    assert "--engine-b null" in text and f"round {failure.round}" in text


# --------------------------------------------------------------------------- printer


@pytest.fixture(scope="module")
def synced():  # type: ignore[no-untyped-def]
    """A small real store (set-up of seed 3), synced by Dovecot in a copy; returns
    (the captured input, the capture after the sync, the set-up's operation lines)."""
    from dovecot_index.live import available

    if not available():
        pytest.skip("Dovecot not installed")
    # under /tmp: every parent must be traversable by Dovecot's mail uid
    base = Path(tempfile.mkdtemp(prefix="difftest-printer-", dir="/tmp"))
    base.chmod(0o755)
    gen = ScenarioGenerator(3, "sdbox")
    src = new_store(gen.storage, base / "src", gen.vname,
                    force_index_write=gen.force_index_write)
    try:
        lines = [op.line(op.apply(src)) for op in gen.setup()]
        before = capture(src)
        copy = snapshot(src, base / "A", "A")
        t0 = time.time()
        DovecotOpenEngine().sync(copy)
        after = capture(copy, (t0, time.time()))
        copy.close()
    finally:
        src.close()
        shutil.rmtree(base, ignore_errors=True)
    return before, after, lines


def _altered(cap: Capture) -> Capture:
    lines = cap.index_dump.splitlines(True)
    for i, line in enumerate(lines):
        if line.startswith("messages count ..........."):
            lines[i] = "messages count ........... = 999\n"
            break
    else:  # pragma: no cover - every index dump has the line
        raise AssertionError("no messages count line")
    return Capture("B (altered)", "".join(lines), cap.log_dump, cap.backends, cap.window)


@pytest.mark.live
def test_reproduction_printer_on_an_altered_dump(synced) -> None:  # type: ignore[no-untyped-def]
    before, after, lines = synced
    assert compare_captures(after, after, input_a=before, input_b=before) == []
    diffs = compare_captures(after, _altered(after), input_a=before, input_b=before)
    assert [d.kind for d in diffs] == ["virtual index"]
    failure = Failure(seed=3, storage="sdbox", round=0, rounds=4, engine_a="dovecot-open",
                      engine_b="ours", mode="snapshot", ops=lines, differences=diffs)
    text = format_failure(failure)
    assert text.startswith("FAILED seed 3 (sdbox, snapshot mode), round 0 ")
    assert ("reproduce: python tools/difftest.py --seeds 1 --start 3 --storage sdbox "
            "--rounds 0 --engine-a dovecot-open --engine-b ours --mode snapshot -v") in text
    assert "operations of round 0:" in text
    for line in lines:
        assert f"  {line}\n" in text
    assert any(line.startswith("  create INBOX guid=") for line in text.splitlines())
    assert "+messages count ........... = 999" in text
    assert "virtual index: virtual index dump differs after sync (masked)" in text


@pytest.mark.live
def test_masks_hide_only_what_the_sync_created(synced) -> None:  # type: ignore[no-untyped-def]
    before, after, _ = synced
    # the set-up of seed 3 does not open the virtual mailbox: the engine created it,
    # so its index id, uid validity, log create stamp and GUID are masked
    assert "(no virtual index)" in before.index_dump
    masked = mask_dump(after.index_dump, "index", before=before, window=after.window)
    assert "index id ................. = <new index id #1>" in masked
    assert "uid validity ............. = <new uid validity #1>" in masked
    assert "header ........ = <new virtual GUID #1>" in masked
    log = mask_dump(after.log_dump, "log", before=before, window=after.window,
                    ext_names=extension_names(after.index_dump))
    assert "create stamp = <new log create stamp #1>" in log
    assert "<new virtual GUID #" in log
    # the same values seen in the input are facts, not run-dependent: never masked
    assert mask_dump(after.index_dump, "index", before=after,
                     window=after.window) == after.index_dump
    # a clock value outside the sync's window is not Dovecot's clock at the sync
    assert "<new index id" not in mask_dump(after.index_dump, "index", before=before,
                                            window=(1.0, 2.0))
    # a store's placeholders persist: the same value gets the same name later
    state = MaskState()
    first = mask_dump(after.index_dump, "index", before=before, window=after.window,
                      state=state)
    again = mask_dump(after.index_dump, "index", before=after, window=(1.0, 2.0),
                      state=state)
    assert first == again
    assert {m.name for m in MASKS} == {"index id", "log create stamp", "uid validity",
                                       "virtual GUID", "day stamp"}


def test_generator_is_a_function_of_the_seed() -> None:
    def ops(storage: str | None) -> list[str]:
        gen = ScenarioGenerator(41, storage)
        out = [op.describe() for op in gen.setup()]
        for _ in range(5):
            out += [op.describe() for op in gen.round()]
        return out

    assert ops(None) == ops("both")
    assert ops("sdbox") == ops("maildir")  # storage fixed or not: the same operations
    assert ScenarioGenerator(41).storage == ScenarioGenerator(41, "both").storage
    assert ops(None) != [op.describe() for op in ScenarioGenerator(42).setup()]


def test_engine_specs() -> None:
    assert make_engine("dovecot-open").name == "dovecot-open"
    engine = make_engine("dovecot-session")
    assert engine.long_lived and not engine.open_stable
    assert make_engine("tests.test_difftest:NullEngine").name == "null"
    with pytest.raises(ValueError, match="unknown engine"):
        make_engine("nope")
