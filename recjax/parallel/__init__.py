"""Device meshes, logical-axis sharding rules and (later) distributed initialisation."""
