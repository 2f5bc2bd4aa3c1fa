"""Not code: this file makes `callbacks/` the package `vfusion3d_lightning.presets.callbacks`, so that
pyproject.toml ships its YAML inside the wheel and `vfusion3d_lightning.presets` reads it through
importlib.resources (editable installs included)."""
