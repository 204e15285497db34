from __future__ import annotations

import pytest

from search._helpers import UsageError, format_count, parse_macs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12M", 12e6),
        ("12m", 12e6),
        ("800k", 8e5),
        ("800K", 8e5),
        ("1.5G", 1.5e9),
        ("1.5g", 1.5e9),
        ("12000000", 12e6),
        ("1.2e7", 1.2e7),
        ("1.2E7", 1.2e7),
        ("1e3K", 1e6),
        ("2e+3", 2e3),
        (".5M", 5e5),
        ("0", 0.0),
        ("3 M", 3e6),
        (" 3 M", 3e6),
        (" 12M ", 12e6),
        ("12M\n", 12e6),
    ],
)
def test_parse_macs(text: str, expected: float) -> None:
    assert parse_macs(text) == pytest.approx(expected)


def test_parse_macs_returns_float() -> None:
    assert isinstance(parse_macs("12"), float)


@pytest.mark.parametrize(
    "text",
    ["twelve", "12X", "", " ", "-5M", "+5M", "12MB", "M", "1,000", "12.", "1 2M", "12 M M", "1e", "12T", "nan", "inf"],
)
def test_parse_macs_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="--max-macs") as info:
        parse_macs(text)
    assert repr(text) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (12_345_678, "12.35M"),
        (999, "999"),
        (0, "0"),
        (1000, "1.00K"),
        (1500, "1.50K"),
        (1_000_000, "1.00M"),
        (2.5e9, "2.50G"),
        (1e12, "1000.00G"),
        (-1500, "-1.50K"),
        (12.4, "12"),
    ],
)
def test_format_count(value: float, expected: str) -> None:
    assert format_count(value) == expected


@pytest.mark.parametrize("text", ["12M", "800K", "1.5G", "999"])
def test_format_count_inverts_parse_macs(text: str) -> None:
    assert parse_macs(format_count(parse_macs(text))) == pytest.approx(parse_macs(text), rel=1e-2)
