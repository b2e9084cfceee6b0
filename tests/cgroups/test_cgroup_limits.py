"""Limits and sizes: parsing, validation, the JSON round trip (no cgroups needed)."""

from __future__ import annotations

import pytest

from cgroups import Limits, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (4096, 4096),
        ("1024", 1024),
        ("512M", 512 << 20),
        ("512m", 512 << 20),
        ("2G", 2 << 30),
        ("2GiB", 2 << 30),
        ("1.5G", 3 << 29),
        ("10k", 10240),
        ("7B", 7),
        (" 1T ", 1 << 40),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "12X", "-1", -1, "1.5", "1e9", "iB", True, 1.5, None])
def test_parse_size_rejects(text: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_limits_normalise_and_round_trip() -> None:
    limits = Limits(memory="512M", cpus=1.5, pids=64, io_weight=200, timeout=2)
    assert limits.memory == 512 << 20
    d = limits.to_dict()
    assert d == {"memory": 512 << 20, "cpus": 1.5, "pids": 64, "io_weight": 200, "timeout": 2}
    assert Limits.from_dict(d) == limits
    assert Limits().to_dict() == {}
    assert Limits.from_dict({}) == Limits()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory": "100k"},
        {"memory": "lots"},
        {"cpus": 0},
        {"cpus": -1},
        {"pids": 0},
        {"io_weight": 0},
        {"io_weight": 10001},
        {"timeout": 0},
        {"timeout": float("inf")},
        {"pids": True},
        {"pids": 1.5},
        {"cpus": "many"},
    ],
)
def test_limits_reject(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Limits(**kwargs)  # type: ignore[arg-type]


def test_limits_normalise_number_types() -> None:
    limits = Limits(cpus="0.5", pids="64", io_weight=200.0, timeout=3)  # type: ignore[arg-type]
    assert limits == Limits(cpus=0.5, pids=64, io_weight=200, timeout=3.0)
    assert isinstance(limits.pids, int) and isinstance(limits.timeout, float)


def test_limits_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown limit.*swap"):
        Limits.from_dict({"memory": 1 << 30, "swap": 0})
