"""Geometry: isosurface extraction and meshes."""
