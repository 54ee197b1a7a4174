import io

import torch

import torch_bridge

torch.manual_seed(0)
x = torch.randn(512, 16)
y = x[:, :4].argmax(dim=1)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))

# Same signature as torch.optim.AdamW; param groups work as in torch (no decay on biases here).
decay = [p for p in model.parameters() if p.dim() > 1]
no_decay = [p for p in model.parameters() if p.dim() <= 1]
opt = torch_bridge.AdamW([{"params": decay, "weight_decay": 1e-2},
                          {"params": no_decay, "weight_decay": 0.0}], lr=3e-3)
# Any torch scheduler: the new lr reaches the compiled step as a traced argument (no recompiles).
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=300)


def loss_on(batch):
    return torch.nn.functional.cross_entropy(model(x[batch]), y[batch])


first = float(loss_on(slice(None)))
for i in range(300):
    batch = slice((i * 64) % 512, (i * 64) % 512 + 64)
    opt.zero_grad()
    loss = loss_on(batch)
    loss.backward()
    opt.step()
    sched.step()
last = float(loss_on(slice(None)))
print(f"AdamW through the bridge: train loss {first:.3f} -> {last:.3f}")
assert last < 0.5 * first

# Checkpoints are torch's format: torch.save / torch.load / load_state_dict as usual.
buffer = io.BytesIO()
torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
buffer.seek(0)
checkpoint = torch.load(buffer)
print("state keys of one parameter:", sorted(checkpoint["opt"]["state"][0]))
opt.load_state_dict(checkpoint["opt"])

# Optimizers that need the loss (ELRA, and EnhancedSGD's controller) take it from a closure.
opt = torch_bridge.ELRA(model.parameters(), lr=1e-5, classes=4, batch_size=64)
for i in range(100):
    batch = slice((i * 64) % 512, (i * 64) % 512 + 64)

    def closure():
        opt.zero_grad()
        loss = loss_on(batch)
        loss.backward()
        return loss

    opt.step(closure)
print(f"ELRA: train loss {float(loss_on(slice(None))):.3f}")
