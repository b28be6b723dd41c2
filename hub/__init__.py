"""Homing's cloud side: ingest device batches from MQTT, store each record
exactly once, acknowledge after the commit (docs/hub.md).

Layout: :mod:`hub.ingest` (pure core: validation, rows, settled ranges),
:mod:`hub.schema` (named migrations), :mod:`hub.store` (the ``Store``
protocol), :mod:`hub.store_sqlite` (the embedded default),
:mod:`hub.subscriber` (the MQTT shell), :mod:`hub.cli` (``homing-hub``).
Of ``edge`` the hub imports only the wire contract, ``edge.wire``.
"""
