"""Device meshes, logical-axis sharding rules, multi-process initialisation and launchers."""
