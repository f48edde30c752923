import sys, torch, numpy as np
torch.set_num_threads(1)
side, ckpts = sys.argv[1], sys.argv[2:]
from delinea.datamodules import FolderDataModule
from delinea.tasks import MedDelineaTask
kw = dict(root="/work/exp/data/ct_pretrain", modality="ct", split="random", resolution=128, batch_size=8,
          num_workers=0, split_file="/work/exp/data/ct_pretrain_split.json", seed=0)
if side == "new":
    kw.update(spacing=3.0, augment=False, centre_short=True)
dm = FolderDataModule(**kw); dm.setup("fit")
batches = [b for _, b in zip(range(4), dm.train_dataloader())]
for path in ckpts:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    hp = dict(ck["hyper_parameters"]); hp.pop("latent_cache", None); [hp.pop(k) for k in list(hp) if k.startswith("_")]
    task = MedDelineaTask(**hp); task.configure_models(); task.on_load_checkpoint(ck); task.load_state_dict(ck["state_dict"]); task.eval()
    import os
    if os.environ.get("RESET_HEAD"): task.model.vae.reset_head()
    sched = getattr(task.model, "schedule", task.model)
    res = {}
    with torch.no_grad():
        for t_val in (100, 300, 500, 700):
            inter = np.zeros(9); tot = np.zeros(9); mse = []
            g = torch.Generator().manual_seed(0)
            for b in batches:
                zo, zm = task.model.vae.encode(b["image"]), task.model.vae.encode_mask(b["mask"])
                t = torch.full((len(zm),), t_val)
                eps = torch.randn(zm.shape, generator=g)
                zt = sched.add_noise(zm, eps, t)
                eh = task.model.predict_noise(zt, t, zo)
                mse.append(float(((eh - eps) ** 2).mean()))
                pred = task.model.vae.decode_logits(sched.tweedie(zt, eh, t)).argmax(1)
                for c in range(1, 9):
                    p, m = pred == c, b["mask"] == c
                    inter[c] += float((p & m).sum()); tot[c] += float(p.sum() + m.sum())
            dice = [2 * inter[c] / tot[c] for c in range(1, 9) if tot[c] > 0]
            res[t_val] = (round(float(np.mean(mse)), 4), round(float(np.mean(dice)), 3))
    print(side, path.split("/")[-5], path.split("=")[-1], res, flush=True)
