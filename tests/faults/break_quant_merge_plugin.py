"""pytest plugin: `run_quant_quality.py --merge` as it was before it kept each setting once (the parts' rows
concatenated), to watch `tests/test_quant_quality_report.py`'s merge checks fail. Not collected as a test;
run it by hand:

    PYTHONPATH=tests/faults python -m pytest -q -p break_quant_merge_plugin tests/test_quant_quality_report.py -k merge

2026-12-07, CPU: both merge tests failed (a setting twice in the merged rows; the differently measured
setting merged with exit 0), as they should.
"""
import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    outcome = yield
    if fixturedef.argname == "qq":
        outcome.get_result().merge_results = lambda parts: [r for p in parts for r in p["results"]]
