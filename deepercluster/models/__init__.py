"""Network bodies (feature extractors), the Sobel front-end and the hierarchical heads."""

from deepercluster.models.bodies import ARCHS, Body, build_body, load_body
from deepercluster.models.heads import HierarchicalHeads

__all__ = ["ARCHS", "Body", "HierarchicalHeads", "build_body", "load_body"]
