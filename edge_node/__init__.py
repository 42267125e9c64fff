"""The site box: management plane (agent) and data plane (model workers).

``edge_node`` imports ``cloud_sync`` and never ``appstore``.
"""

__version__ = "0.1.0"
