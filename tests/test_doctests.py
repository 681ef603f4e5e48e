"""The examples in the docstrings run and print what they say.

Every public module is searched, the layers included: a module without examples passes,
a wrong example fails, and the modules that carry examples must keep some.
"""

from __future__ import annotations

import doctest
import functools
import importlib
import pkgutil
import types

import numpy as np
import pytest

import streamnorm.layers

# modules whose docstrings must carry examples
WITH_EXAMPLES = ["streamnorm.stats", "streamnorm.scaler", "streamnorm.tta", "streamnorm.comm"]
# every other public module is checked too, whether or not it has examples yet
OTHERS = ["streamnorm", "streamnorm.functional", "streamnorm.layers"] + sorted(
    f"streamnorm.layers.{m.name}" for m in pkgutil.iter_modules(streamnorm.layers.__path__) if not m.name.startswith("_")
)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def run_examples(module: types.ModuleType) -> tuple[doctest.TestResults, str]:
    """Run every docstring example of ``module``; returns (failed, attempted) and the report."""
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS, verbose=False)
    # NumPy's default print options, whatever another test may have set
    with np.printoptions(precision=8, threshold=1000, edgeitems=3, linewidth=75, suppress=False,
                         floatmode="maxprec", sign="-", legacy=False):
        for test in doctest.DocTestFinder(exclude_empty=True).find(module, module.__name__):
            runner.run(test, out=report.append)
    return doctest.TestResults(runner.failures, runner.tries), "".join(report)


@functools.lru_cache(maxsize=None)
def results_of(name: str) -> tuple[doctest.TestResults, str]:
    return run_examples(importlib.import_module(name))


@pytest.mark.parametrize("name", WITH_EXAMPLES + OTHERS)
def test_docstring_examples_pass(name):
    results, report = results_of(name)
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples failed in {name}:\n{report}"


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_modules_keep_their_examples(name):
    results, _ = results_of(name)
    assert results.attempted >= 5, f"{name} has only {results.attempted} docstring examples"


def test_examples_ran_in_total():
    total = sum(results_of(name)[0].attempted for name in WITH_EXAMPLES + OTHERS)
    assert total >= 80, total


def test_a_wrong_example_fails():
    """The machinery above reports a failure when an output is wrong."""
    mod = types.ModuleType("fake_module")
    exec(
        "def f():\n"
        "    '''\n"
        "    >>> 1 + 1\n"
        "    3\n"
        "    >>> 2 * 2\n"
        "    4\n"
        "    '''\n",
        mod.__dict__,
    )
    mod.f.__module__ = "fake_module"
    results, report = run_examples(mod)
    assert results == (1, 2)
    assert "Expected:\n    3\nGot:\n    2" in report
