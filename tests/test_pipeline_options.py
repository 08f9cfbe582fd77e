"""The load keywords every pipeline entry point takes: ``device`` and ``dtype`` load a model
given by name (defaults: the GPU when there is one, float32 on the CPU), and a model object is
checked against them rather than silently moved."""

from __future__ import annotations

import pytest
import torch

import loopscope
from loopscope.core.errors import LoopscopeError
from loopscope.pipeline import load_keywords


def test_a_name_gets_the_defaults_or_what_was_given() -> None:
    defaults = load_keywords("demo", None, None, None)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert defaults["device"] == expected
    if expected == "cpu":
        assert defaults["dtype"] == torch.float32  # CPU kernels run float32
    given = load_keywords("demo", {"loop": (1, 2)}, "cpu", "bfloat16")
    assert given == {"loop": (1, 2), "device": "cpu", "dtype": torch.bfloat16}
    cli = load_keywords("demo", {"device": "cpu", "dtype": torch.float16}, None, None)
    assert cli["dtype"] == torch.float16  # load options (what the CLI passes) win
    with pytest.raises(LoopscopeError, match="dtype must be one of"):
        load_keywords("demo", None, "cpu", "int8")


def test_a_model_object_is_used_where_it_is_or_refused() -> None:
    model = loopscope.load("demo")
    assert load_keywords(model, None, None, None) == {}
    assert load_keywords(model, None, "cpu", "float32") == {}
    with pytest.raises(LoopscopeError, match=r"in torch.float32, not on cpu in torch.bfloat16"):
        load_keywords(model, None, "cpu", "bfloat16")
