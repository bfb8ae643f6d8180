"""Pure builders: typed spec -> child manifests. No I/O, no clients; tested without a cluster."""
