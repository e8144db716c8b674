"""The lowest layer: errors, file helpers, name registries, the config schema, images, backbones,
self-maps, metrics, threshold policies and pictures. It imports nothing else of redi."""
