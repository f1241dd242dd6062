"""Pure planning: box geometry, who writes what on save, which blocks each rank reads on load."""
