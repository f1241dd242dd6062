"""Moving bytes: staging (snapshot), encode + write, read + decode + place."""
