"""A command's CPU seconds from a shell's ``times`` (the netns driver's wrapper prints it)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.orchestrator.drivers.cpu_times import children_cpu_s


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0m0.001000s 0m0.002000s\n0m0.310000s 0m0.020000s\n", 0.33),  # dash
        ("0m0.001s 0m0.002s\n1m2.500s 0m0.500s\n", 63.0),  # bash
        ("0m 0.00s 0m 0.00s\n0m 0.25s 0m 0.05s\n", 0.30),  # busybox ash pads
        ("0m0,001s 0m0,002s\n0m0,300s 0m0,000s\n", 0.30),  # a decimal comma
        ("\n0m0.000000s 0m0.000000s\n0m0.000000s 0m0.000000s\n\n", 0.0),
    ],
)
def test_the_childrens_line_is_summed(text: str, seconds: float) -> None:
    assert children_cpu_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "",  # the wrapper was killed before it could say (a timeout)
        "0m0.001s 0m0.002s\n",  # cut short
        "0m0.001s 0m0.002s\n0m0.300s\n",
        "0m0.001s 0m0.002s\n0m0.300s 0m0.000s extra\n",
        "0m0.001s 0m0.002s\n0m0.300s 0m0.000s\n0m0.300s 0m0.000s\n",
        "sh: times: not found\n",
    ],
)
def test_anything_else_is_unknown_not_zero(text: str) -> None:
    assert children_cpu_s(text) is None


@given(st.text(max_size=200))
def test_never_raises(text: str) -> None:
    result = children_cpu_s(text)
    assert result is None or result >= 0
