"""TOML to graph: the loader, variant expansion and the graph cache of the no-op build."""
