"""The local backend: user-level operations on this host's instances, driving their supervisors."""
