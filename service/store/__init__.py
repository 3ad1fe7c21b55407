"""The factor store: device cache → Redis (or the embedded directory store)."""
