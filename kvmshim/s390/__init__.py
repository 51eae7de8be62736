"""The s390 side of the seed commit: bit layouts, the per-page reference, the vectorised MMU."""
