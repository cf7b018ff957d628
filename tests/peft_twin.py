"""The model both PEFT parity files use (`test_corda`, `test_peft_init_parity`):
fc1 (8 → 16), a scanned stack of two 16 → 16 layers, head (16 → 6), and its torch
twin with the same weights."""

import flax.linen as nn
import jax
import numpy as np

N_LAYERS = 2


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.gelu(nn.Dense(16, name="layer")(x)), None


class Net(nn.Module):
    """fc1 (8 → 16), a scanned stack of two 16 → 16 layers, head (16 → 6)."""

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(16, name="fc1")(x))
        stack = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=N_LAYERS,
        )
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(6, name="head")(x)


def torch_twin(torch, params):
    """The torch twin of `Net` holding ``params`` (PEFT's orientation)."""
    p = jax.tree.map(np.asarray, params["params"])
    gelu = lambda t: torch.nn.functional.gelu(t, approximate="tanh")  # noqa: E731

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(8, 16)
            self.layers = torch.nn.ModuleList(
                [torch.nn.Linear(16, 16) for _ in range(N_LAYERS)]
            )
            self.head = torch.nn.Linear(16, 6)

        def forward(self, x):
            x = gelu(self.fc1(x))
            for layer in self.layers:
                x = gelu(layer(x))
            return self.head(x)

    net = Twin()
    with torch.no_grad():
        for name in ("fc1", "head"):
            getattr(net, name).weight.copy_(
                torch.from_numpy(p[name]["kernel"].T.copy())
            )
            getattr(net, name).bias.copy_(torch.from_numpy(p[name]["bias"].copy()))
        for i, layer in enumerate(net.layers):
            layer.weight.copy_(
                torch.from_numpy(p["layers"]["layer"]["kernel"][i].T.copy())
            )
            layer.bias.copy_(torch.from_numpy(p["layers"]["layer"]["bias"][i].copy()))
    return net
