"""Guest images: a local store with manifests, and the ways images get into it."""
