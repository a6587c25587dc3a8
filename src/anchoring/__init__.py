"""anchoring: sparse concept anchoring for PyTorch models.

Train so that chosen concepts land at latent directions picked before training, then
steer or delete them. See README.md for the command line; `load_run` opens a run.
"""

from anchoring.errors import AnchoringError
from anchoring.runs import Run, load_run

__version__ = "0.1.0"
__all__ = ["AnchoringError", "Run", "__version__", "load_run"]
