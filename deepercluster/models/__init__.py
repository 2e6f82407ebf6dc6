"""Network bodies (feature extractors), the Sobel front-end, the hierarchical heads and a batch norm over the
distributed batch."""

from deepercluster.models.bodies import ARCHS, Body, build_body, load_body
from deepercluster.models.heads import HierarchicalHeads, SubHeads, super_head
from deepercluster.models.sync_bn import GlobalBatchNorm, convert_global_batchnorm

__all__ = ["ARCHS", "Body", "GlobalBatchNorm", "HierarchicalHeads", "SubHeads", "build_body",
           "convert_global_batchnorm", "load_body", "super_head"]
