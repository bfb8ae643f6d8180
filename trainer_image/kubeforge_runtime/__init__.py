"""kubeforge_runtime: the code that runs inside KubeForge's workload pods.

Entry points (each ``python -m kubeforge_runtime.<name> --config PATH``):

* ``train``    - distributed fine-tuning under torchrun (FineTuneJob)
* ``quantize`` - compression plus measured size/latency/quality (QuantizeJob)
* ``serve``    - the OpenAI-compatible server (InferenceService)

The runtime never imports kopf or the Kubernetes client: its contract with the operator is
the pod's command, arguments, environment and mounted config file (see ``contract.py`` and
``trainer_image/CONTRACT.md``).
"""

__version__ = "0.1.0"
