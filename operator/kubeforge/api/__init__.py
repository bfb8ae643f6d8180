"""The KubeForge API: group ``kubeforge.io``, version ``v1alpha1``, three kinds.

Each kind is a pydantic v2 model pair (spec, status). The CRDs in ``crds/`` are generated
from these models by :mod:`kubeforge.api.crd`; a test regenerates them and fails on drift.
The group, version and plurals are written down here and in the ``Kind`` classes only:
everything else (API paths, kopf handlers, the SDK, the webhook routes) reads them from here.
"""

from .base import (
    API_VERSION, CATEGORY, GROUP, VERSION, InvalidSpec, Kind, describe_validation_error, spec_problem,
)
from .finetune import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from .inference import InferenceService, InferenceServiceSpec, InferenceServiceStatus
from .quantize import QuantizeJob, QuantizeJobSpec, QuantizeJobStatus

KINDS: tuple[type[Kind], ...] = (FineTuneJob, QuantizeJob, InferenceService)
KIND_BY_NAME: dict[str, type[Kind]] = {k.kind: k for k in KINDS}
"""``{"FineTuneJob": FineTuneJob, ...}``: the kind classes by their ``kind`` string."""

__all__ = [
    "API_VERSION", "CATEGORY", "GROUP", "VERSION", "KINDS", "KIND_BY_NAME", "Kind",
    "InvalidSpec", "describe_validation_error", "spec_problem",
    "FineTuneJob", "FineTuneJobSpec", "FineTuneJobStatus",
    "QuantizeJob", "QuantizeJobSpec", "QuantizeJobStatus",
    "InferenceService", "InferenceServiceSpec", "InferenceServiceStatus",
]
