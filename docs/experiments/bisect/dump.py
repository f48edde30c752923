import sys, numpy as np, torch, json
side = sys.argv[1]
from delinea.datamodules import FolderDataModule
kw = dict(root="/work/exp/data/ct_pretrain", modality="ct", split="random", resolution=128, batch_size=8,
          num_workers=0, split_file="/work/exp/data/ct_pretrain_split.json", seed=0)
if side == "new":
    kw.update(spacing=3.0, augment=False, centre_short=True)
dm = FolderDataModule(**kw)
dm.setup("fit")
loader = dm.train_dataloader()
batches = []
for i, b in enumerate(loader):
    batches.append(b)
    if i == 3: break
b = batches[0]
out = {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in b.items()}
print({k: (v.shape, v.dtype) if hasattr(v, 'shape') else type(v) for k, v in out.items()})
img, mask = b["image"], b["mask"]
print("image range", float(img.min()), float(img.max()), "mean", float(img.mean()))
print("mask classes", torch.unique(mask).tolist(), "fg frac", float((mask > 0).float().mean()))
print("labelled", b.get("labelled")[0].tolist() if "labelled" in b else None)
for k in ("case_id", "slice_index", "cache_key", "seed", "region", "box"):
    if k in b: print(k, b[k] if not torch.is_tensor(b[k]) else b[k].tolist()[:8])
np.savez(f"/work/exp/batch/{side}.npz", image=img.numpy(), mask=mask.numpy())
# all masks of an epoch: per-class pixel counts
allm = torch.cat([x["mask"] for x in batches])
print("class pixel counts over 4 batches", torch.bincount(allm.flatten(), minlength=9).tolist())
