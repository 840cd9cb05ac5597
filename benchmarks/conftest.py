import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collect_file(file_path, parent):
    """The benchmark files are bench_*.py, which pytest's default test_*.py pattern misses;
    only runs that reach this folder (`make bench`, `pytest benchmarks`) see this hook."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


REPORT = pytest.StashKey[list]()


@pytest.fixture
def report(pytestconfig):
    """Text a benchmark wants printed at the end of the run, after pytest-benchmark's table."""
    return pytestconfig.stash.setdefault(REPORT, [])


def pytest_terminal_summary(terminalreporter, config):
    for text in config.stash.get(REPORT, []):
        terminalreporter.write_line("")
        terminalreporter.write_line(text)
