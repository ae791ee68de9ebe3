import pytest

from pocket.units import (format_address, format_size, parse_address, parse_duration, parse_rate,
                          parse_size)


@pytest.mark.parametrize("text, expected", [
    ("4GiB", 4 << 30), ("512MiB", 512 << 20), ("2GB", 2_000_000_000), ("100", 100),
    ("1.5KiB", 1536), (" 7 B ", 7), (1234, 1234), ("64kib", 65536),
])
def test_parse_size(text, expected) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "4 parsecs", "-1", "1..2GB"])
def test_parse_size_rejects(bad) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize("text, expected", [
    ("1GB/s", 1e9), ("10Gbps", 1.25e9), ("600Mb/s", 75e6), ("500MiB/s", 500 * 2**20),
    ("8Gbit/s", 1e9), (42, 42.0),
])
def test_parse_rate(text, expected) -> None:
    assert parse_rate(text) == pytest.approx(expected)


def test_durations_addresses_and_format() -> None:
    assert parse_duration("500ms") == 0.5 and parse_duration("2m") == 120 and parse_duration(3) == 3
    assert parse_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_address("localhost") == ("localhost", 7070)
    assert parse_address("[::1]:80") == ("::1", 80)
    assert format_address("::1", 80) == "[::1]:80"
    with pytest.raises(ValueError):
        parse_address("host:99999")
    assert format_size(1536) == "1.5 KiB" and format_size(10) == "10 B"
