"""The public names of loralib resolve, lazily imported ones included, and the package is this checkout's."""

from pathlib import Path

import pytest

import loralib


@pytest.mark.parametrize("name", sorted(loralib.__all__))
def test_public_name_resolves(name):
    assert getattr(loralib, name) is not None


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        loralib.nope  # noqa: B018


def test_imported_from_this_repository():
    root = Path(__file__).resolve().parent.parent
    assert Path(loralib.__file__).resolve().is_relative_to(root)
