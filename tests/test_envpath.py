"""ganlib/envpath.py: matrices name their files through environment variables, expanded where opened."""

from __future__ import annotations

from pathlib import Path

import pytest

from ganlib.envpath import expand_path, unset_variables
from ganlib.errors import UserError


def test_both_forms_and_the_home_are_expanded(monkeypatch):
    monkeypatch.setenv("GB_ROOT", "/data/fewshot")
    monkeypatch.setenv("GB_NAME", "babies")
    assert expand_path("$GB_ROOT/${GB_NAME}/train", "folder") == Path("/data/fewshot/babies/train")
    assert expand_path("~/x", "folder") == Path.home() / "x"
    assert expand_path("plain/path", "folder") == Path("plain/path")


def test_an_unset_or_empty_variable_is_named_not_dropped(monkeypatch):
    monkeypatch.delenv("GB_UNSET", raising=False)
    monkeypatch.setenv("GB_EMPTY", "")
    monkeypatch.setenv("GB_SET", "/d")
    assert unset_variables("$GB_SET/$GB_UNSET/${GB_EMPTY}/$GB_UNSET") == ["GB_UNSET", "GB_EMPTY"]
    with pytest.raises(UserError, match=r"source checkpoint '\$GB_UNSET/x.pt' names \$GB_UNSET, which is not set"):
        expand_path("$GB_UNSET/x.pt", "source checkpoint")
