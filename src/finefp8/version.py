"""The package version, in a module of its own so that any layer can import it.

``finefp8.__version__`` re-exports it; modules below the package root (the CLI, the
checkpoint writer, the eval runner) import it from here instead of from ``finefp8``.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
