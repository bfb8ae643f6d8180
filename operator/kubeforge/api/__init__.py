"""The KubeForge API: group ``kubeforge.io``, version ``v1alpha1``, three kinds.

Each kind is a pydantic v2 model pair (spec, status). The CRDs in ``crds/`` are generated
from these models by :mod:`kubeforge.api.crd`; a test regenerates them and fails on drift.
"""

from .base import GROUP, VERSION, API_VERSION, CATEGORY
from .finetune import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from .inference import InferenceService, InferenceServiceSpec, InferenceServiceStatus
from .quantize import QuantizeJob, QuantizeJobSpec, QuantizeJobStatus

KINDS = (FineTuneJob, QuantizeJob, InferenceService)

__all__ = [
    "API_VERSION", "CATEGORY", "GROUP", "VERSION", "KINDS",
    "FineTuneJob", "FineTuneJobSpec", "FineTuneJobStatus",
    "QuantizeJob", "QuantizeJobSpec", "QuantizeJobStatus",
    "InferenceService", "InferenceServiceSpec", "InferenceServiceStatus",
]
