"""Made tests/data/cond_embedding_golden.pt with the nets of commit f9df013 (before `Condition`): tiny nets with
perturbed weights in that commit's state-dict format, fixed inputs and their outputs. All tensors of a case are
packed into one: torch.save's per-tensor zip entries would otherwise be most of the file."""
import sys, torch
sys.path.insert(0, "/work/main")
from lightning_modules.nets import MLP, ConditionalUnet1D, TransformerForDiffusion1D
from lightning_modules.nets.param_groups import weight_matrix_groups

CASES = {  # name: (class, data_shape, kwargs, shape the cond is also given in)
    "mlp": (MLP, (2,), dict(cond_dim=3, hidden=4, depth=1, emb_dim=4), (1, 3)),
    "unet1d": (ConditionalUnet1D, (2, 2), dict(cond_dim=4, down_dims=(2,), kernel_size=3, n_groups=1, step_embed_dim=2), (2, 2)),
    "transformer1d": (TransformerForDiffusion1D, (2, 2), dict(cond_dim=4, n_obs_steps=2, n_layer=1, n_head=1, n_emb=4,
                                                            p_drop_emb=0.0, p_drop_attn=0.0), (2, 2)),
}
out = {}
for name, (cls, shape, kwargs, cond_3d) in CASES.items():
    torch.manual_seed(0)
    net = cls(shape, **kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    net.eval()
    x, t, cond = torch.randn(2, *shape), torch.tensor([3.0, 500.0]), torch.randn(2, kwargs["cond_dim"])
    with torch.no_grad():
        tensors = {**{"state." + k: v for k, v in net.state_dict().items()}, "x": x, "noise_level": t, "cond": cond,
                   "out": net(x, t, cond), "out_3d": net(x, t, cond.reshape(2, *cond_3d))}
    index = {p.data_ptr(): i for i, p in enumerate(net.state_dict(keep_vars=True).values())}
    out[name] = {
        "cls": cls.__name__, "kwargs": {"data_shape": shape, **kwargs}, "cond_3d": cond_3d,
        "layout": [(k, tuple(v.shape)) for k, v in tensors.items()],
        "flat": torch.cat([v.reshape(-1).float() for v in tensors.values()]),
        # the optimizer's parameter order as positions in layout: optimizer state in checkpoints is matched by position
        "groups": [[index[p.data_ptr()] for p in g["params"]] for g in weight_matrix_groups(net)] if hasattr(net, "optim_groups") else None,
    }
torch.save(out, sys.argv[1])
