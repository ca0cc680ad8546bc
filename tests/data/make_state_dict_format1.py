"""Writes state_dict_format1.pt: per method, a state dict of format 1 (a top-level "lrfree" entry) after two
steps, and the parameters and scalars after the third. Run once with the lrfree of commit f897154 (the last
to save format 1) first on the path, from tests/:

    git archive f897154 python | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old/python:. TRITON_INTERPRET=1 python data/make_state_dict_format1.py
"""
import copy, torch, lrfree
from optimizer_db import OPTIMIZERS
out = {}
for info in OPTIMIZERS:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    opt = info.make([{"params": [model[0].weight, model[2].weight]}, {"params": [model[0].bias, model[2].bias]}])
    def step():
        opt.zero_grad(); loss = ((model(x) - y) ** 2).mean(); loss.backward()
        opt.step(loss=loss) if info.needs_loss else opt.step()
    for _ in range(2): step()
    entry = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "optimizer": copy.deepcopy(opt.state_dict()), "x": x, "y": y}
    step()
    entry["next_params"] = [p.detach().clone() for p in model.parameters()]
    entry["next_scalars"] = opt.scalars()
    out[info.name] = entry
torch.save(out, "data/state_dict_format1.pt")
