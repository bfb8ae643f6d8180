"""Test support: the local Kubernetes control plane and helpers shared by test suites."""
