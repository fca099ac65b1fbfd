"""The artifact caches: the local store, the tiers, the S3 remote and minimal download."""
