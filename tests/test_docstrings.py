"""The `Example:` sections of the public docstrings run and print what they
say."""

import doctest

import pytest

import moe.experts
import moe.gating_network
import moe.layer_experts
import moe.moe_layer
import moe.routers.router
import moe.transformer


@pytest.mark.parametrize(
    "module",
    [
        moe.experts,
        moe.gating_network,
        moe.layer_experts,
        moe.moe_layer,
        moe.routers.router,
        moe.transformer,
    ],
)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
