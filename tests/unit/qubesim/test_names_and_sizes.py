from __future__ import annotations

import pytest

from qubesim.errors import UsageError
from qubesim.names import validate_label, validate_qube_name
from qubesim.sizes import parse_size


@pytest.mark.parametrize("name", ["a", "build-fedora", "keys_kernel-2", "A" * 31])
def test_valid_qube_names(name: str) -> None:
    assert validate_qube_name(name) == name


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("", "empty"),
        ("a" * 32, "shorter than 32"),
        ("1a", "illegal"),
        ("a b", "illegal"),
        ("a.b", "illegal"),
        ("a/b", "illegal"),
        ("é", "illegal"),
        ("sys-dm", "-dm"),
        ("none", "reserved"),
        ("default", "reserved"),
        ("dom0", "reserved"),
    ],
)
def test_invalid_qube_names_name_the_rule(name: str, rule: str) -> None:
    with pytest.raises(UsageError, match=rule):
        validate_qube_name(name)


def test_labels() -> None:
    assert validate_label("black") == "black"
    with pytest.raises(UsageError, match="no such label: 'pink'"):
        validate_label("pink")


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1024", 1024),
        ("20GiB", 20 * 1024**3),
        ("20Gi", 20 * 1024**3),
        ("20G", 20 * 10**9),
        ("512 MiB", 512 * 1024**2),
        ("1tb", 10**12),
        ("3k", 3000),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "-1G", "1.5G", "20 parsecs", "20GiBs"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(UsageError, match="invalid size"):
        parse_size(text)
