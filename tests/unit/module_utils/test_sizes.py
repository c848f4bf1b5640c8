"""Sizes as the qube module's volume_size and the environments' volume_size take them."""

from __future__ import annotations

import pytest
from ansible_collections.qubes_infra.build.plugins.module_utils.sizes import SizeError, parse_size


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("20GiB", 20 * 1024**3),
        ("512 MiB", 512 * 1024**2),
        ("10G", 10 * 1000**3),
        ("1tb", 1000**4),
        ("4096", 4096),
        (4096, 4096),
        (" 7KiB ", 7 * 1024),
    ],
)
def test_sizes_with_and_without_a_unit(value: object, size: int) -> None:
    assert parse_size(value, "volume_size") == size


@pytest.mark.parametrize("value", ["0", 0, "20 parsecs", "-1G", "1.5GiB", "", None, True, [20]])
def test_other_values_are_refused_naming_where(value: object) -> None:
    with pytest.raises(SizeError, match=r"^volume_size: size .* must be a positive number"):
        parse_size(value, "volume_size")
