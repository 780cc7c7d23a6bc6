"""The kernel cases through pytest-benchmark: `pytest bench/ --benchmark-enable`.

Without --benchmark-enable (the project default) every case still runs once, which checks that
each kernel works on the benchmark's inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bench.kernel_case import Case
from bench.kernels import load_cases

# Collected by name only: the cases themselves hold native streams, built once per module below
# and released when it finishes rather than at interpreter exit.
CASE_IDS = [f"{c.group} | {c.name}" for c in load_cases()[0]]


@pytest.fixture(scope="module")
def cases() -> Iterator[dict[str, Case]]:
    built = {f"{c.group} | {c.name}": c for c in load_cases()[0]}
    yield built
    built.clear()


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_kernel(benchmark: Any, cases: dict[str, Case], case_id: str) -> None:
    case = cases[case_id]
    benchmark.group = case.group
    benchmark.extra_info.update(baseline=case.baseline, target=case.target)
    benchmark(case.func)
