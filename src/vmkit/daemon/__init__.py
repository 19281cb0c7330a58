"""The supervisor: one process per running machine, serving the REST API on api.sock."""
