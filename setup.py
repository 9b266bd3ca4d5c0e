"""Puts the JavaScript client into the wheel.

Its one source is ``clients/js/src``; a wheel serves it at ``/client/`` from
``backstream/web/client``, which exists only inside the built package (MANIFEST.in brings
``clients/js/src`` into the sdist, so a wheel built from the sdist gets it too). An
editable install copies nothing: ``web_assets`` reads ``clients/js/src`` in place.
Everything else is declared in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

JS_CLIENT_SOURCE = Path(__file__).resolve().parent / "clients" / "js" / "src"
JS_CLIENT_TARGET = Path("backstream", "web", "client")


class build_py_with_js_client(build_py):
    """``build_py``, then the JavaScript client's modules copied into ``backstream/web/client``."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # served from clients/js/src in place
        for target in self._js_client_files():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(JS_CLIENT_SOURCE / target.name, target)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs += [str(target) for target in self._js_client_files()]
        return outputs

    def _js_client_files(self) -> list[Path]:
        sources = sorted(JS_CLIENT_SOURCE.glob("*.js"))
        if not sources:
            raise SystemExit(f"no JavaScript client to package: {JS_CLIENT_SOURCE} holds no *.js")
        return [Path(self.build_lib) / JS_CLIENT_TARGET / source.name for source in sources]


setup(cmdclass={"build_py": build_py_with_js_client})
