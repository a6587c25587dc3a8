"""anchoring: sparse concept anchoring for PyTorch models.

Train so that chosen concepts land at latent directions picked before training, then steer or
delete them. See README.md for the command line and docs/ for the method; `load_run` opens
any run directory.
"""

from anchoring.errors import AnchoringError
from anchoring.kinds.base import Run
from anchoring.lifecycle import load_run

__version__ = "0.2.0"
__all__ = ["AnchoringError", "Run", "__version__", "load_run"]
