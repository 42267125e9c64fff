"""The edge<->cloud contract.

Everything the edge node and the cloud AppStore agree on lives here: MQTT topic
names (:mod:`cloud_sync.topics`), versioned message schemas
(:mod:`cloud_sync.schemas`), the app package format (:mod:`cloud_sync.manifest`,
:mod:`cloud_sync.package`), the MQTT connection manager
(:mod:`cloud_sync.connection`), chunked resumable blob transfer
(:mod:`cloud_sync.blobs`) and the durable SQLite outbox (:mod:`cloud_sync.outbox`).

This package imports nothing of ours: ``edge_node`` and ``appstore`` meet only here.
"""

PROTOCOL_VERSION = 1
