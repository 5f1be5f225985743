"""Run by tests/test_fp8.py under torchrun (2 CPU ranks, gloo): the same tiny FP8 LightningDiT trained under
FSDP2 with its FP8 linears' weights all-gathered in bf16 and in FP8 (fae_fast/fp8_fsdp.py), then a DCP
checkpoint of the FP8 one saved, the weights wiped, and loaded. Rank 0 writes what it saw as JSON to argv[1]."""
import json
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from fae_fast.config import generator_config
from fae_fast.fp8 import use_fp8
from fae_fast.fp8_fsdp import Float8AllGatherWeight, wrap_for_fp8_all_gather
from fae_fast.generators import Generator
from fae_fast.train.parallelize import parallelize

STEPS = 4


def build(fp8_all_gather: bool):
    cfg = generator_config("LightningDiT-tiny/1", width=96, heads=4, depth=2, grid=4, in_channels=8, num_classes=10)
    torch.manual_seed(0)
    model = Generator(cfg, impl="torch")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)  # past adaLN-Zero's start: every linear works
    use_fp8(model, torch.device("cpu"))
    wrapped = wrap_for_fp8_all_gather(model, dist.get_world_size()) if fp8_all_gather else []
    parallelize(model, model.blocks, precision="fp8", compile=False, shard=True)
    return model, wrapped


def train(model, record_first_step: dict):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    g = torch.Generator().manual_seed(1 + dist.get_rank())
    losses = []
    for step in range(STEPS):
        x, t, y = torch.randn(4, 16, 8, generator=g), torch.rand(4, generator=g), torch.randint(0, 10, (4,), generator=g)
        out = model(x, t, y)
        loss = out.float().square().mean()
        loss.backward()
        if step == 0:
            record_first_step["out"] = out.detach().float()
            record_first_step["grads"] = {n: p.grad.full_tensor().float() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return optimizer, losses


def main(result_path: str):
    dist.init_process_group("gloo")
    gathers = []
    pre = Float8AllGatherWeight.fsdp_pre_all_gather

    def counted(self, mesh, outer_size, outer_stride, module, mp_policy):
        inputs, metadata = pre(self, mesh, outer_size, outer_stride, module, mp_policy)
        gathers.append([str(t.dtype) for t in inputs])
        return inputs, metadata

    Float8AllGatherWeight.fsdp_pre_all_gather = counted
    plain_model, _ = build(False)
    plain_first, fp8_first = {}, {}
    _, plain_losses = train(plain_model, plain_first)
    model, wrapped = build(True)
    optimizer, losses = train(model, fp8_first)
    params = dict(model.named_parameters())
    result = {
        "wrapped": wrapped,
        "local_types": sorted({type(params[n].to_local()).__name__ for n in wrapped}),
        "gathers": len(gathers), "gather_dtypes": sorted({tuple(d) for d in gathers}),
        "forward_equal": torch.equal(plain_first["out"], fp8_first["out"]),
        "gradient_relative": max(((fp8_first["grads"][n] - g).norm() / g.norm().clamp_min(1e-30)).item()
                                 for n, g in plain_first["grads"].items()),
        "losses": losses, "plain_losses": plain_losses,
    }
    model_state, optim_state = get_state_dict(model, optimizer)
    result["state_types"] = sorted({type(getattr(v, "_local_tensor", v)).__name__ for v in model_state.values()})
    saved = {k: v.full_tensor().clone() for k, v in model_state.items()}
    folder = tempfile.mkdtemp() if dist.get_rank() == 0 else None
    box = [folder]
    dist.broadcast_object_list(box)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=box[0])
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=box[0])
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    live = {n: p.full_tensor() for n, p in model.named_parameters()}
    result["restored"] = all(torch.equal(saved[k], live[k]) for k in live)
    result["still_wrapped"] = all(type(params[n].to_local()) is Float8AllGatherWeight for n in wrapped)
    if dist.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
