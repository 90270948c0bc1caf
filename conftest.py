"""Shared test setup (tests/ and related/tests/; the modules come from the in-place install, pip install -e .): no
network (hub calls fail fast), the checkout under test first on every child process's import path, session fixtures
for what is expensive to build, and no silent skips in CI: with E2EDIFF_NO_SKIPS=1 (set by .ci/run) a skipped test or
module fails, with its reason, so that a missing extra (diffusers, transformers, webdataset) cannot turn the strongest
tests into skips."""
import os

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The scripts, torchrun's ranks and the notebook's kernel that the tests start import this checkout's modules, even when
# the venv's editable install points at another clone (one venv shared by two checkouts would test the other's code).
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))

pytest_plugins = ["pytester"]  # tests/test_conftest.py runs pytest on small files to check the hooks below
NO_SKIPS = "E2EDIFF_NO_SKIPS"


def _fail_if_skipped(report):
    if os.environ.get(NO_SKIPS) == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but {NO_SKIPS}=1 (CI) wants every test to run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_if_skipped(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_if_skipped(outcome.get_result())


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """tiny_pipeline(name) -> the folder of a tiny random PixArt pipeline (tests/tiny_t2i.py), or of "images",
    an imagefolder; each written on first use, once per session. Pipelines: "delta", PixArt-delta's
    LCMScheduler (linear 1e-4 .. 0.02, epsilon); "delta_ms", the same with the 1024-MS resolution and
    aspect-ratio conditions (sample_size 128); "sd_lcm", Stable Diffusion's scaled_linear LCMScheduler."""
    import tiny_t2i

    root, written = tmp_path_factory.mktemp("tiny-pipelines"), {}
    options = {"delta": {}, "delta_ms": {"multi_scale": True}, "sd_lcm": {"scheduler": tiny_t2i.SD_LCM_SCHEDULER}}

    def get(name):
        if name not in written:
            if name == "images":
                tiny_t2i.write_image_folder(str(root / name))
            else:
                tiny_t2i.write_tiny_pipeline(str(root / name), **options[name])
            written[name] = root / name
        return written[name]
    return get


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 8x8 digits as the toy reads them (toy_data.ImageData), loaded once per test session."""
    import toy_data
    return toy_data.load_digits_data()
