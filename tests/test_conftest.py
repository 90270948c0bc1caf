"""The no-silent-skips rule of the repository's conftest.py: under E2EDIFF_NO_SKIPS=1 a skipped test, or a module whose
importorskip fails, is a failure that says why; without it, a skip is reported (pytest.ini's -rs)."""
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = (Path(__file__).resolve().parent.parent / "conftest.py").read_text()
SKIPPING = {
    "test_skips_a_test": "import pytest\ndef test_a():\n    pytest.skip('no GPU here')\ndef test_b():\n    pass\n",
    "test_skips_a_module": "import pytest\npytest.importorskip('no_such_module_e2ediff')\ndef test_c():\n    pass\n",
}


@pytest.mark.parametrize("no_skips", ["1", ""])
def test_a_skip_fails_under_the_ci_variable_and_is_reported_otherwise(pytester, monkeypatch, no_skips):
    pytester.makeconftest(CONFTEST.replace('pytest_plugins = ["pytester"]', ""))
    pytester.makepyfile(**SKIPPING)
    monkeypatch.setenv("E2EDIFF_NO_SKIPS", no_skips)
    result = pytester.runpytest("-rs", "-p", "no:cacheprovider", "--continue-on-collection-errors")
    if no_skips:
        result.assert_outcomes(passed=1, failed=1, errors=1)
        result.stdout.fnmatch_lines(["*E2EDIFF_NO_SKIPS=1 (CI) wants every test to run: *no_such_module_e2ediff*"])
        result.stdout.fnmatch_lines(["*E2EDIFF_NO_SKIPS=1 (CI) wants every test to run: *no GPU here*"])
    else:
        result.assert_outcomes(passed=1, skipped=2)
        result.stdout.fnmatch_lines(["SKIPPED*no GPU here*"])


@pytest.mark.parametrize("module", ["e2ediff", "toy_training", "t2i_training"])
def test_a_child_process_imports_this_checkouts_modules(module):
    """Scripts and torchrun ranks started by the tests import the checkout under test, not wherever the venv's editable
    install points (it points at one clone only)."""
    found = subprocess.run([sys.executable, "-c", f"import {module}; print({module}.__file__)"], cwd="/",
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(found).resolve() == Path(__file__).resolve().parent.parent / f"{module}.py"
