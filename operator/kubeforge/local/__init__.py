"""Run KubeForge resources on this machine, with no cluster (``kubeforge run``).

The same builders that render the cluster's pods render them here; :mod:`.pods` turns a
rendered pod into a local process (the config map written to a directory, volumes mapped to
local directories, the rendezvous host name mapped to the loopback address), and
:mod:`.runner` drives FineTuneJob → QuantizeJob → InferenceService in order.
"""
