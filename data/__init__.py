"""Image/caption data pipeline: sources, aspect-ratio buckets, transforms, caches, loaders."""
