"""The method: regularizers, concepts and terms, and activation capture at named sites."""

from anchoring.anchor import regularizers
from anchoring.anchor.capture import Capture, resolve_site
from anchoring.anchor.terms import KINDS, Concept, Term, build_term

__all__ = ["KINDS", "Capture", "Concept", "Term", "build_term", "regularizers", "resolve_site"]
