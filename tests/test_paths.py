"""Where a run starts: the caller's place in the workspace, relative to its root."""

from __future__ import annotations

from branching.paths import relative_cwd


def test_a_directory_whose_name_starts_with_a_dot_keeps_its_name() -> None:
    assert relative_cwd("/ws/.venv/bin", "/ws", "/mnt/ws/b") == ".venv/bin"
    assert relative_cwd("/mnt/ws/b/.config", "/ws", "/mnt/ws/b") == ".config"
    assert relative_cwd(".github/workflows", "/ws", "/mnt/ws/b") == ".github/workflows"


def test_the_root_and_places_outside_are_the_root() -> None:
    assert relative_cwd("/ws", "/ws", "/mnt/ws/b") == ""
    assert relative_cwd(".", "/ws", "/mnt/ws/b") == ""
    assert relative_cwd("/elsewhere", "/ws", "/mnt/ws/b") == ""
    assert relative_cwd("/ws/src", "/ws", "/mnt/ws/b") == "src"
