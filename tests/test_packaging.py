"""The installed layout: fastattn's kernels/ folder never hides an installed package named ``kernels``, and
the transformers integration names the real cause when it cannot load."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_kernels_from(cwd: str, extra_path: str | None = None) -> str:
    """`import kernels` in a fresh interpreter started in ``cwd`` (which Python puts first on sys.path, as
    `python -m pytest` does), optionally with ``extra_path`` on PYTHONPATH; returns what it found."""
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = extra_path + os.pathsep + env.get("PYTHONPATH", "")
    code = "import kernels; print(getattr(kernels, '__file__', None) or list(kernels.__path__))"
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.parametrize("cwd", ["repo-root", "elsewhere"])
def test_import_kernels_gets_the_installed_package(tmp_path, cwd):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("INSTALLED = True\n")
    found = _import_kernels_from(REPO if cwd == "repo-root" else str(tmp_path), str(site))
    assert found == str(site / "kernels" / "__init__.py")


def test_import_kernels_from_root_gets_huggingface_kernels_when_installed():
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("no package named kernels is installed here (the test above covers the rule with a stand-in)")
    found = _import_kernels_from(REPO)
    assert not found.startswith(os.path.join(REPO, "kernels")), found
    assert os.path.realpath(found).startswith(os.path.realpath(str(dist.locate_file("kernels")))), found


def test_fastattn_kernels_is_the_kernels_folder():
    code = ("import os, fastattn.kernels as k, fastattn.kernels.attention as a; "
            "print(os.path.realpath(os.path.dirname(a.__file__)))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == os.path.realpath(os.path.join(REPO, "kernels"))


def test_register_names_the_real_import_error(monkeypatch):
    pytest.importorskip("transformers")
    import fastattn.integrations.transformers as fa_hf

    monkeypatch.setitem(sys.modules, "transformers.masking_utils", None)  # any import failure inside transformers
    with pytest.raises(ImportError) as info:
        fa_hf.register()
    msg = str(info.value)
    assert "is installed, but importing its attention registries failed" in msg
    assert "transformers.masking_utils" in msg
    assert "needs transformers >= 5" not in msg


def test_register_says_when_transformers_is_missing(monkeypatch):
    import fastattn.integrations.transformers as fa_hf

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"needs transformers >= 5 .*importing transformers failed"):
        fa_hf.register()
