"""Not code: this file makes `eval_sets/` the package `vfusion3d_lightning.presets.eval_sets`, so that
pyproject.toml ships its catalogue, object lists and bundled meshes inside the wheel and
`vfusion3d_lightning.data.eval_sets` reads them through importlib.resources (editable installs included)."""
