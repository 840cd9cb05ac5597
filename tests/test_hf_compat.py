"""retake_ops.hf._compat: the supported transformers range, and how the package says so."""
import subprocess
import sys
import textwrap
import warnings

import pytest

from retake_ops.hf import _compat


def test_newer_minor_release_warns_naming_the_tested_range():
    major, minor = (int(x) for x in _compat.TESTED_MAX.split(".")[:2])
    with pytest.warns(UserWarning, match=rf"tested with transformers {_compat.MIN_VERSION} to {_compat.TESTED_MAX}; "
                                         rf"found {major}.{minor + 1}.0"):
        _compat.check_version(f"{major}.{minor + 1}.0")


@pytest.mark.parametrize("version", ["5.17.0", "5.20.3"])
def test_tested_range_is_quiet(version):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _compat.check_version(version)
        _compat.check_version(_compat.TESTED_MAX.rsplit(".", 1)[0] + ".9")  # a patch release of the newest minor


def test_older_release_is_refused():
    with pytest.raises(ImportError, match=r"needs transformers >= 5.17.0, found 5.16.1: pip install 'retake-ops\[hf\]'"):
        _compat.check_version("5.16.1")


def test_import_without_transformers_names_the_extra():
    script = textwrap.dedent("""
        import sys
        sys.modules["transformers"] = None  # makes `import transformers` raise ImportError
        try:
            import retake_ops.hf
        except ImportError as err:
            print(err)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "retake_ops.hf needs transformers >= 5.17, which is not installed: pip install 'retake-ops[hf]'" in out.stdout


def _pin(path, name):
    for line in path.read_text().splitlines():
        if line.lower().startswith(name + "=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{path.name} pins no {name}")


def test_tested_range_is_what_ci_pins():
    """The range the import warning names is the one CI runs: the main pins and the oldest-version pins."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    assert _pin(root / "constraints.txt", "transformers") == _compat.TESTED_MAX
    assert _pin(root / "constraints-hf-min.txt", "transformers") == _compat.MIN_VERSION
