"""The central cloud AppStore: signed app catalog, fleet registry, desired state,
feedback datasets, REST API and CLI.

``appstore`` imports ``cloud_sync`` and never ``edge_node``: the two meet only
through the contracts in :mod:`cloud_sync`.
"""

__version__ = "0.1.0"
