"""KubeForge control plane: API models, CRD generation, reconcilers, CLI, SDK, local runner.

This package never imports torch (a test enforces it): everything that needs torch lives in
``kubeforge_runtime`` and runs in the workload pods, or in local processes started by
``kubeforge run``.
"""

__version__ = "0.1.0"
