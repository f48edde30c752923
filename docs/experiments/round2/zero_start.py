"""delinea's CLI with the sampler's initial noise scaled by DELINEA_NOISE_SCALE (0: start from the prior's mean)."""
import os, sys, torch
import delinea.models.diffusion as D
scale = float(os.environ.get("DELINEA_NOISE_SCALE", "1"))
_randn = torch.randn
def randn(*a, **k):
    return _randn(*a, **k) * scale
D.torch = type(sys)("torch_proxy"); D.torch.__dict__.update(torch.__dict__); D.torch.randn = randn
from delinea.main import main
sys.argv = ["delinea", *sys.argv[1:]]
main()
