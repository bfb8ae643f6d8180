"""The kopf operator: one module of handlers per kind, plus shared helpers.

Handlers are thin: parse the spec into its typed model, call pure builders, apply the
children by server-side apply, and report status. Importing this package registers the
handlers with kopf's default registry.
"""

from . import finetune, inference, quantize, settings  # noqa: F401  (registers handlers)
