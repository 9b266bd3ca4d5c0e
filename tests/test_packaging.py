"""The JavaScript client has one source, ``clients/js/src``: the sdist carries it, a wheel built
from that sdist holds it under ``backstream/web/client/`` and serves it from there, and an
editable install serves it in place (real builds with ``python -m build``, offline)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from backstream.runtime.server.web_assets import client_folder, find_asset

REPO = Path(__file__).resolve().parent.parent
JS_SOURCE = REPO / "clients" / "js" / "src"
# What an sdist is built from: the build files, the package, and the client's source.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "backstream", "clients/js/src")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An sdist built from a copy of the checkout, and the wheel built from that sdist."""
    work = tmp_path_factory.mktemp("packaging")
    checkout = work / "checkout"
    for name in BUILD_INPUTS:
        source = REPO / name
        if source.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
            shutil.copytree(source, checkout / name, ignore=ignore)
        else:
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, checkout / name)
    dist = work / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(checkout)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    return sdist, wheel


def _client_sources() -> dict[str, bytes]:
    sources = {path.name: path.read_bytes() for path in JS_SOURCE.glob("*.js")}
    assert "backstream-client.js" in sources
    return sources


def test_the_wheel_holds_every_client_module_byte_equal(built: tuple[Path, Path]) -> None:
    _, wheel = built
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        packaged = {
            name.rsplit("/", 1)[1]: archive.read(name)
            for name in names
            if name.startswith("backstream/web/client/")
        }
        assert "backstream/web/demo/index.html" in names
    assert packaged == _client_sources()
    assert not any(name.startswith("clients/") for name in names)


def test_the_sdist_carries_the_client_source(built: tuple[Path, Path]) -> None:
    sdist, _ = built
    with tarfile.open(sdist) as archive:
        carried = {
            Path(member.name).name
            for member in archive.getmembers()
            if Path(member.name).parent.as_posix().endswith("clients/js/src")
        }
    assert carried == set(_client_sources())


def test_an_installed_wheel_serves_its_own_copy_and_names_both_places_without_it(
    built: tuple[Path, Path], tmp_path: Path
) -> None:
    _, wheel = built
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)  # what installing a wheel puts in site-packages
    probe = (
        "import backstream.web\n"
        "from backstream.runtime.server.web_assets import client_folder\n"
        "print(backstream.web.__file__)\n"
        "print(client_folder())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    imported, folder = done.stdout.split()
    assert Path(imported).is_relative_to(site)
    assert Path(folder) == site / "backstream" / "web" / "client"

    shutil.rmtree(site / "backstream" / "web" / "client")
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("FileNotFoundError: the JavaScript client is missing")
    assert str(site / "backstream" / "web" / "client") in last
    assert str(site / "clients" / "js" / "src") in last  # where a checkout would have it


def test_a_source_checkout_serves_the_client_source_in_place() -> None:
    """The suite runs on an editable install: no copy in the package, ``clients/js/src`` served."""
    assert not (REPO / "backstream" / "web" / "client").exists()
    assert Path(str(client_folder())) == JS_SOURCE
    for name, body in _client_sources().items():
        served = find_asset(f"/client/{name}", web=False)
        assert served is not None and served.body == body
