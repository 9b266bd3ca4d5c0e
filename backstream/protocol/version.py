"""The package's version, in one place (pyproject reads it from here too)."""

from __future__ import annotations

__all__ = ["VERSION"]

VERSION = "0.1.0"
