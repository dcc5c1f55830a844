"""``python -m ema_fused.demo``: train a small model on generated data and compare the
held-out loss of the raw weights with that of the EMA weights as training goes.

With a large, noisy learning rate the raw weights jitter around the optimum; their
average sits closer to it, so the EMA loss ends lower.  Nothing is downloaded.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from . import EMA, schedules


def make_data(n: int, dim: int, gen: torch.Generator, device: torch.device):
    """A fixed random teacher network plus label noise."""
    teacher = torch.randn(dim, 1, generator=gen) / dim ** 0.5
    x = torch.randn(n, dim, generator=gen)
    y = torch.tanh(x @ teacher) + 0.3 * torch.randn(n, 1, generator=gen)
    return x.to(device), y.to(device)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--decay", type=float, default=0.99)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    x_train, y_train = make_data(4096, 32, gen, device)
    x_test, y_test = make_data(2048, 32, gen.manual_seed(args.seed), device)
    model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 1)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    ema = EMA(model, schedule=schedules.num_updates_warmup(args.decay))
    loss_fn = nn.MSELoss()

    def test_loss() -> float:
        with torch.no_grad():
            return loss_fn(model(x_test), y_test).item()

    print(f"device {device}, {args.steps} steps, decay {args.decay} (num_updates warm-up)")
    print(f"{'step':>6} {'raw loss':>10} {'EMA loss':>10} {'decay':>8}  backend")
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, x_train.shape[0], (32,), generator=gen).to(device)
        loss = loss_fn(model(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update()
        if step % (args.steps // 6) == 0 or step == args.steps:
            raw = test_loss()
            with ema.average_parameters():
                averaged = test_loss()
            print(f"{step:>6} {raw:>10.4f} {averaged:>10.4f} {ema.decay:>8.4f}  {ema.backend}")
    return {"raw": raw, "ema": averaged}


if __name__ == "__main__":
    main()
