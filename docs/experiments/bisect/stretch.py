import json, shutil, numpy as np, nibabel as nib, torch, torch.nn.functional as F
from pathlib import Path
src, dst = Path("/work/exp/data/ct_pretrain"), Path("/work/exp/data/ct_stretch")
for kind in ("images", "labels"): (dst / kind).mkdir(parents=True, exist_ok=True)
for f in sorted((src / "images").glob("*.nii.gz")):
    img = nib.as_closest_canonical(nib.load(f)); lab = nib.as_closest_canonical(nib.load(src / "labels" / f.name))
    a = np.asarray(img.dataobj, dtype=np.float32); l = np.asarray(lab.dataobj).astype(np.int16)
    v = np.clip((a + 175.0) / 425.0 * 2 - 1, -1, 1)
    t = torch.from_numpy(v).permute(2, 0, 1)[:, None]  # (Z,1,X,Y)
    s = F.interpolate(t, size=(128, 128), mode="bilinear", align_corners=False, antialias=True)[:, 0].permute(1, 2, 0).numpy()
    hu = (s + 1) / 2 * 425.0 - 175.0
    rows = np.minimum(((np.arange(128) + 0.5) * (l.shape[0] / 128)).astype(np.int64), l.shape[0] - 1)
    cols = np.minimum(((np.arange(128) + 0.5) * (l.shape[1] / 128)).astype(np.int64), l.shape[1] - 1)
    ls = l[rows[:, None], cols[None, :], :]
    aff = np.diag([3.0, 3.0, 3.0, 1.0]); aff[:3, 3] = [1.5, 1.5, img.affine[2, 3]]
    nib.save(nib.Nifti1Image(hu.astype(np.float32), aff), dst / "images" / f.name)
    nib.save(nib.Nifti1Image(ls.astype(np.int16), aff), dst / "labels" / f.name)
    print(f.name, a.shape, "->", hu.shape)
