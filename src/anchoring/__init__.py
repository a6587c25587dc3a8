"""anchoring: sparse concept anchoring for PyTorch models.

Train so that chosen concepts land at latent directions picked before training, then steer or
delete them. See README.md for the command line and docs/ for the method; `load_run` opens
any run directory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from anchoring.errors import AnchoringError, UnfinishedRunWarning

if TYPE_CHECKING:
    from anchoring.kinds.base import Run
    from anchoring.lifecycle import load_run

try:  # one version, pyproject.toml's: `--version` said 0.2.0 while pip said 0.1.0
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("anchoring")
except PackageNotFoundError:  # the source tree on sys.path, not installed
    __version__ = "0+unknown"
__all__ = ["AnchoringError", "Run", "UnfinishedRunWarning", "__version__", "load_run"]


def __getattr__(name: str) -> Any:
    # `Run` and `load_run` pull in torch: imported on first use, so that `import anchoring` (and the
    # command's entry point, which must be quick to catch a Ctrl-C) stays light
    if name == "load_run":
        from anchoring.lifecycle import load_run

        return load_run
    if name == "Run":
        from anchoring.kinds.base import Run

        return Run
    raise AttributeError(f"module 'anchoring' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "Run", "load_run"})
