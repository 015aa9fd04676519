"""Meshes, logical-axis sharding rules and multi-host start-up."""
