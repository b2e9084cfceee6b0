"""The suite's check of daemon logs (tests/conftest.py) tells an error entry from the rest."""

from __future__ import annotations

from tests.conftest import _bad, _entries

LOG = """\
2026-12-03 06:04:40,100 INFO daemon.service: ready
2026-12-03 06:04:40,200 ERROR daemon.server: internal error
Traceback (most recent call last):
  File "x.py", line 1, in f
OSError: boom
2026-12-03 06:04:40,300 WARNING daemon.store: a warning, never a failure
2026-12-03 06:04:40,400 CRITICAL daemon.main: dying
"""


def test_entries_keep_a_traceback_with_its_line() -> None:
    entries = _entries(LOG)
    assert len(entries) == 4
    assert entries[1].endswith("OSError: boom") and "Traceback" in entries[1]
    assert [_bad(e) for e in entries] == [False, True, False, True]


def test_a_bare_traceback_is_an_error_and_a_mention_of_error_is_not() -> None:
    [bare] = _entries("Traceback (most recent call last):\n  File ...\nValueError\n")
    assert _bad(bare)
    assert not _bad("2026-12-03 06:04:40,100 INFO x: the word ERROR in a message")
