"""Data-subject rights and data governance over built shard datasets.

- ``rewrite``   : the journaled, crash-safe rewrite of the shards that hold given samples
- ``erase``     : erasure / opposition applied to the shards (GDPR art. 17, 21)
- ``subject``   : access (art. 15) and rectification (art. 16)
- ``retention`` : retention deadline, check and purge
- ``projects``  : purpose limitation (projects approved to use a dataset)
- ``merge``     : several centres or ingest parts -> one manifest
- ``audit``     : the hash-chained audit log every action above appends to

Submodules are imported on use (``foundation.governance.erase``...), not here.
"""
