"""The core: the project model, settings, the action key and the stamp, freshness (status), digests, gates, CPU numerics."""
