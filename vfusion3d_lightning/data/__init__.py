"""Multi-view data: the shard schema, the asset renderer, procedural assets and the DataModules."""
