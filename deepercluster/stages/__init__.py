"""The pipeline's stages as objects: what each reads (config fields, earlier stages' outputs), its steps of units,
how to discard it, and the fingerprints that say when it must be recomputed.

``base``: the :class:`Stage` and :class:`Step` types and the registry (:func:`get_stage`); ``lineage``:
fingerprints and staleness; ``runner``: running a stage or a whole run in this process. One module per stage,
named by the stage: ``shard``, ``extract``, ``cluster``, ``train``, ``evaluate``.
"""

from deepercluster.stages.base import LogReporter, Reporter, Stage, Step, get_stage, register, stage_names
from deepercluster.stages.runner import begin, run_all, run_framed, run_plan, run_sequence, run_stage

__all__ = ["LogReporter", "Reporter", "Stage", "Step", "begin", "get_stage", "register", "run_all",
           "run_framed", "run_plan", "run_sequence", "run_stage", "stage_names"]
