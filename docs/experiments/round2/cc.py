import nibabel as nib, numpy as np, sys
from scipy import ndimage
ref=nib.load(sys.argv[1])
R=np.asarray(ref.dataobj).astype(int)
names=['bg','aorta','gb','kL','kR','liver','panc','spleen','stom']
def dice(a,b):
    s=a.sum()+b.sum(); return 2*(a&b).sum()/s if s else np.nan
for m in sys.argv[2:]:
    P=np.asarray(nib.load(m).dataobj).astype(int)
    rows=[]
    for c in range(1,9):
        p=P==c; g=R==c
        lab,n=ndimage.label(p, structure=np.ones((3,3,3)))
        sizes=np.bincount(lab.ravel())[1:]
        lcc = lab==(np.argmax(sizes)+1) if n else p
        rows.append((names[c], int(g.sum()), int(p.sum()), n, [int(x) for x in sorted(sizes)[::-1][:4]], round(dice(p,g),3), round(dice(lcc,g),3)))
    print(m)
    for r in rows: print('  ',r)
    raw=np.nanmean([r[5] for r in rows]); l=np.nanmean([r[6] for r in rows])
    print('  mean raw', round(raw,3), 'lcc', round(l,3))
