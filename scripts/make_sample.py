"""Re-derive the bundled real sample (``delinea/sample``) from the TotalSegmentator 2.18.0 source distribution.

The sample is two scans that TotalSegmentator ships as test fixtures (Apache-2.0), each with the segmentation
TotalSegmentator itself predicted for it:

* CT: ``tests/reference_files/example_ct.nii.gz`` (122x101x112, 3 mm) with
  ``example_seg_fast_force_split.nii.gz`` (``--fast --ml -fs``, task ``total``: 117 classes, aorta = 52);
* MR: ``tests/reference_files/example_mr_sm.nii.gz`` (117x91x20, 3 mm) with
  ``example_seg_mr.nii.gz`` (``-ta total_mr --ml``, 50 classes, aorta = 23).

Labels are mapped to delinea's unified ids (``delinea.labels.TOTALSEG_CT`` / ``TOTALSEG_MR``; every other
TotalSegmentator class becomes background) and stored as uint8. Images keep their voxels, affine and header:
the CT (stored as int32 upstream) is rewritten as int16 only because the cast is checked to be lossless; the
MR file is copied byte for byte. Nothing is resampled or reoriented.

Usage (no network access here; fetch the sdist first)::

    pip download --no-deps --no-binary :all: totalsegmentator==2.18.0 -d /tmp/ts
    python scripts/make_sample.py /tmp/ts/totalsegmentator-2.18.0.tar.gz   # or the extracted folder
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import sys
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from delinea.datamodules.utils import LabelSpec
from delinea.labels import FOREGROUND, ORGAN_IDS, TOTALSEG_CT, TOTALSEG_MR

VERSION = "2.18.0"
PIP_COMMAND = f"pip download --no-deps --no-binary :all: totalsegmentator=={VERSION} -d /tmp/ts"
REF = "tests/reference_files"
OUT = Path(__file__).resolve().parents[1] / "delinea" / "sample"

# case -> (modality, image file, label file, TotalSegmentator task, id table)
CASES = {
    "ct": ("ct", "example_ct.nii.gz", "example_seg_fast_force_split.nii.gz", "total", TOTALSEG_CT),
    "mr": ("mr", "example_mr_sm.nii.gz", "example_seg_mr.nii.gz", "total_mr", TOTALSEG_MR),
}
# Names TotalSegmentator uses for delinea's organs (all identical except none; kept explicit for the check).
TS_NAMES = {organ: organ for organ in FOREGROUND}


class Source:
    """Read files of the sdist, from the tarball or from an extracted folder."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_dir():
            roots = [path, *sorted(p for p in path.iterdir() if p.is_dir())]
            self.root = next((r for r in roots if (r / "totalsegmentator" / "map_to_binary.py").is_file()), None)
            if self.root is None:
                raise SystemExit(f"{path} does not look like the extracted totalsegmentator-{VERSION} sdist")
            self.tar = None
        else:
            self.tar = tarfile.open(path, "r:*")
            self.members = {m.name.split("/", 1)[1]: m for m in self.tar.getmembers() if "/" in m.name}

    def read(self, rel: str) -> bytes:
        if self.tar is None:
            return (self.root / rel).read_bytes()
        if rel not in self.members:
            raise SystemExit(f"{rel} is missing from {self.path}")
        return self.tar.extractfile(self.members[rel]).read()


def load_nifti(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)


def write_nifti(img: nib.Nifti1Image, path: Path) -> None:
    """Deterministic .nii.gz (fixed gzip mtime, maximum compression)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=9, mtime=0))


def class_map(src: Source) -> dict[str, dict[int, str]]:
    """The ``class_map`` literal of ``totalsegmentator/map_to_binary.py``, parsed without importing it."""
    tree = ast.parse(src.read("totalsegmentator/map_to_binary.py"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "class_map" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit("class_map not found in totalsegmentator/map_to_binary.py")


def check_table(table: dict[int, int], names: dict[int, str], task: str) -> None:
    """Every unified organ must come from exactly the TotalSegmentator id that carries its name."""
    for organ in FOREGROUND:
        sources = [s for s, u in table.items() if u == ORGAN_IDS[organ]]
        if len(sources) != 1 or names.get(sources[0]) != TS_NAMES[organ]:
            got = {s: names.get(s) for s in sources}
            raise SystemExit(f"delinea.labels table for {task!r} maps {got} to {organ!r}; expected {TS_NAMES[organ]!r}")


def counts(array: np.ndarray) -> dict[int, int]:
    ids, n = np.unique(array, return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sdist", type=Path, help=f"totalsegmentator-{VERSION}.tar.gz or its extracted folder")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default: delinea/sample)")
    args = parser.parse_args()
    if not args.sdist.exists():
        raise SystemExit(f"{args.sdist} not found; download the sdist first:\n    {PIP_COMMAND}")
    src = Source(args.sdist)
    maps = class_map(src)

    manifest = {
        "source": {
            "package": f"TotalSegmentator {VERSION} (sdist from PyPI)",
            "license": "Apache-2.0",
            "command": PIP_COMMAND,
        },
        "organs": {organ: ORGAN_IDS[organ] for organ in FOREGROUND},
        "cases": {},
    }
    for case, (modality, image_name, label_name, task, table) in CASES.items():
        check_table(table, maps[task], task)
        image_bytes, label_bytes = src.read(f"{REF}/{image_name}"), src.read(f"{REF}/{label_name}")
        image, label = load_nifti(image_bytes), load_nifti(label_bytes)
        if image.shape != label.shape or not np.array_equal(image.affine, label.affine):
            raise SystemExit(
                f"{image_name} {image.shape} and {label_name} {label.shape} differ in shape or affine:\n"
                f"{image.affine}\n{label.affine}"
            )
        source_ids = np.asanyarray(label.dataobj)
        mapped = LabelSpec(table).map(source_ids, label_name)  # ids outside the table become background

        # Image: MR verbatim; CT cast to int16 when lossless, otherwise kept in its own dtype.
        image_out = args.out / "images" / f"{case}.nii.gz"
        if modality == "mr":
            image_out.parent.mkdir(parents=True, exist_ok=True)
            image_out.write_bytes(image_bytes)
        else:
            voxels = np.asanyarray(image.dataobj)
            header = image.header.copy()
            if np.issubdtype(voxels.dtype, np.integer) and np.array_equal(voxels.astype(np.int16), voxels):
                voxels = voxels.astype(np.int16)
                header.set_data_dtype(np.int16)
            write_nifti(nib.Nifti1Image(voxels, image.affine, header), image_out)

        header = label.header.copy()
        header.set_data_dtype(np.uint8)
        write_nifti(
            nib.Nifti1Image(mapped.astype(np.uint8), label.affine, header), args.out / "labels" / f"{case}.nii.gz"
        )

        unified = counts(mapped)
        manifest["cases"][case] = {
            "modality": modality,
            "image": f"images/{case}.nii.gz",
            "label": f"labels/{case}.nii.gz",
            "source_image": f"{REF}/{image_name}",
            "source_label": f"{REF}/{label_name}",
            "source_sha256": {
                image_name: hashlib.sha256(image_bytes).hexdigest(),
                label_name: hashlib.sha256(label_bytes).hexdigest(),
            },
            "totalsegmentator_task": task,
            "label_map": {
                maps[task][s]: {"source_id": s, "unified_id": u} for s, u in sorted(table.items(), key=lambda x: x[1])
            },
            "shape": list(image.shape),
            "spacing": [float(z) for z in image.header.get_zooms()[:3]],
            "axcodes": "".join(nib.aff2axcodes(image.affine)),
            "affine": image.affine.tolist(),
            "image_dtype": str(np.asanyarray(nib.load(image_out).dataobj).dtype),
            "unified_voxels": {organ: unified.get(ORGAN_IDS[organ], 0) for organ in FOREGROUND},
            "source_voxels": {str(i): n for i, n in counts(source_ids).items()},
            "slices_with_organs": int(np.count_nonzero(mapped.reshape(-1, mapped.shape[2]).any(0))),
        }
    # Apache-2.0 section 4(a): ship the licence with the derived files.
    (args.out / "LICENSE").write_bytes(src.read("LICENSE"))
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for case, info in manifest["cases"].items():
        print(case, info["shape"], info["spacing"], info["axcodes"], info["unified_voxels"])
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
