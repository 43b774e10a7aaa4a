"""MetaQuantNet: a small hyper-network that generates each quantizable layer's weights for a bit policy.

One block per layer. A block reads a bit encoding of its layer (one-hot of its own weight width plus, as
context, the widths of its neighbours) and emits two per-output-channel vectors: a weight gain and a
clipping-scale multiplier. The generated weight is

    W(b) = W0 * (1 + gain(b))          per output channel
    s(b) = s_mse(W0, b) * exp(clip(b))  per output channel, then k-bit fake quantization with s(b)

The last layer of every block is zero-initialised, so at initialisation the generated weights are exactly
the pretrained ones and the scales are the MSE-optimal post-training ones.

Why so little capacity (no full weight delta): MetaQuantNet is used as a *ranking* proxy. A prototype with a
full per-element delta compensated every policy so well that all looked alike (Kendall tau 0.33 against the
loss after finetuning), while per-channel corrections keep the differences that finetuning cannot remove.
The parameter count is O(hidden x channels) per layer, never O(weights): a 25M-parameter ResNet-50 gets a
MetaQuantNet of well under 1% of its size.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mqtool import numerics
from mqtool.backend.fake_quant import fake_quantize
from mqtool.policy import FLOAT


def weight_quant_ste(
    w: torch.Tensor, scale: torch.Tensor, bits: int, axis: int, stored: int | None = None
) -> torch.Tensor:
    """k-bit symmetric per-channel fake quantization of `w` with the numerics' definition (STE).

    `stored` (default `bits`): the bits emission stores the integers at. An 8-bit layer on ONNX Runtime's
    integer kernels is stored at 7 bits with the same clipping range (`passes.qdq_plan.stored_weight_bits`:
    the scale doubles), so the simulation quantizes it exactly that way."""
    stored = bits if stored is None else stored
    if stored != bits:
        scale = scale * float(2.0 ** (bits - stored))
    qmin, qmax = numerics.int_range(stored, signed=True)
    return fake_quantize(w, scale, 0, qmin, qmax, axis)  # symmetric: one zero point, 0


def stored_bits(
    wbits: list[int], abits: list[int] | tuple[int, ...] | None, reduce8: list[bool]
) -> list[int]:
    """Per layer, the bits emission stores: 7 for an 8-bit layer on integer kernels (`reduce8`: its format
    is int8 when its input is quantized) whose input is quantized (`abits` not float), else the policy's."""
    out = []
    for i, b in enumerate(wbits):
        quantized_input = abits is None or abits[i] != FLOAT
        out.append(7 if b == 8 and reduce8[i] and quantized_input else b)
    return out


class LayerBlock(nn.Module):
    """Generates one layer's weight and quantization scale for a given encoding."""

    def __init__(
        self,
        weight: torch.Tensor,
        axis: int,
        widths: list[int],
        enc_dim: int,
        hidden: int = 16,
    ):
        super().__init__()
        self.axis = axis
        self.widths = list(widths)
        channels = weight.shape[axis]
        self.channels = channels
        self.register_buffer("w0", weight.detach().clone())
        w_np = weight.detach().cpu().numpy()
        scales = np.stack([numerics.weight_scale(w_np, b, axis, "mse") for b in self.widths])
        self.register_buffer("s0", torch.from_numpy(scales))  # [widths, C]
        self.net = nn.Sequential(nn.Linear(enc_dim, hidden), nn.Tanh(), nn.Linear(hidden, 2 * channels))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def _chan(self, v: torch.Tensor) -> torch.Tensor:
        shape = [1] * self.w0.dim()
        shape[self.axis] = -1
        return v.reshape(shape)

    def forward(self, enc: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(float weight, per-channel scale) for width `bits`."""
        out = self.net(enc)
        c = self.channels
        w = self.w0 * (1.0 + self._chan(out[:c]))
        scale = self.s0[self.widths.index(bits)] * torch.exp(out[c:])
        return w, scale


class MetaQuantNet(nn.Module):
    """One `LayerBlock` per quantizable layer; `generate(wbits)` gives every layer's quantized weight."""

    def __init__(
        self,
        layers: dict[str, tuple[torch.Tensor, int]],
        widths: list[int],
        hidden: int = 16,
        reduce8: list[bool] | None = None,
    ):
        """`reduce8[i]`: layer i's 8-bit weights are stored at 7 bits when its input is quantized
        (`stored_bits`)."""
        super().__init__()
        self.reduce8 = list(reduce8) if reduce8 is not None else [False] * len(layers)
        self.names = list(layers)
        self.widths = sorted(widths)
        self._span = max(self.widths) - min(self.widths) or 1
        enc_dim = len(self.widths) + 3
        self.blocks = nn.ModuleList(
            LayerBlock(w, axis, self.widths, enc_dim, hidden) for (w, axis) in layers.values()
        )

    def encode(self, wbits: list[int]) -> torch.Tensor:
        """[L, enc_dim]: one-hot of each layer's width, its normalised width and its neighbours'."""
        # NumPy, not per-element torch calls: the GA encodes ~1000 policies per budget.
        b = np.asarray(wbits, dtype=np.int64)
        lo = min(self.widths)
        # A float layer (32) reads as one step above the widest width.
        eff = np.where(b == FLOAT, max(self.widths) + 1, b)
        norm = ((eff - lo) / self._span).astype(np.float32)
        onehot = (b[:, None] == np.asarray(self.widths)[None, :]).astype(np.float32)
        prev = np.concatenate([norm[:1], norm[:-1]])
        nxt = np.concatenate([norm[1:], norm[-1:]])
        return torch.from_numpy(np.concatenate([onehot, norm[:, None], prev[:, None], nxt[:, None]], axis=1))

    def generate(
        self, wbits: list[int], quantize: bool = True, abits: list[int] | tuple[int, ...] | None = None
    ) -> dict[str, torch.Tensor]:
        """Layer name -> the weight fed to the layer under the policy `wbits` (layer order), quantized at the
        bits emission stores (`stored_bits`, with the activation bits `abits`; default: inputs quantized)."""
        enc = self.encode(wbits)
        stored = stored_bits(wbits, abits, self.reduce8)
        if quantize and not torch.is_grad_enabled():
            return self._generate_flat(wbits, enc, stored)
        out = {}
        for i, (name, block) in enumerate(zip(self.names, self.blocks)):
            if wbits[i] == FLOAT:  # a layer pinned to float keeps its pretrained weights
                out[name] = block.w0
                continue
            w, scale = block(enc[i], wbits[i])
            out[name] = weight_quant_ste(w, scale, wbits[i], block.axis, stored[i]) if quantize else w
        return out

    def _layout(self, device: torch.device) -> dict:
        """Every layer's weights in one channel-major buffer, with per-channel bookkeeping (built once:
        the pretrained weights and their scales never change)."""
        lay = getattr(self, "_flat_layout", None)
        if lay is not None and lay["w0"].device == device:
            return lay
        blocks = list(self.blocks)
        width = max(2 * b.channels for b in blocks)
        chans = torch.tensor([b.channels for b in blocks], device=device)
        layer_of = torch.repeat_interleave(torch.arange(len(blocks), device=device), chans)
        first = torch.cumsum(chans, 0) - chans
        in_layer = torch.arange(int(chans.sum()), device=device) - first[layer_of]
        per_chan = [b.w0.numel() // b.channels for b in blocks]
        lay = {
            "w0": torch.cat([b.w0.movedim(b.axis, 0).reshape(-1).to(device) for b in blocks]),
            "s0": torch.cat([b.s0.to(device) for b in blocks], dim=1),  # [widths, all channels]
            "gain": layer_of * width + in_layer,  # where each channel's gain sits in the flat heads
            "clip": layer_of * width + chans[layer_of] + in_layer,
            "layer_of": layer_of,
            # each element's channel (int32: half the memory of int64; 4 bytes per weight)
            "elem": torch.repeat_interleave(
                torch.arange(int(chans.sum()), device=device, dtype=torch.int32),
                torch.repeat_interleave(torch.tensor(per_chan, device=device), chans),
            ),
            "numel": [b.w0.numel() for b in blocks],
        }
        self._flat_layout = lay
        return lay

    def _generate_flat(
        self, wbits: list[int], enc: torch.Tensor, stored: list[int]
    ) -> dict[str, torch.Tensor]:
        """`generate` at inference as ~15 operations on one buffer holding every layer's weights instead of
        ~12 small operations per layer (the GA scores ~1000 policies per budget). The same float32
        operations element by element as `weight_quant_ste`; a NaN becomes 0 and +-inf the ends of the
        range, as there."""
        lay = self._layout(self.blocks[0].w0.device)
        dev = lay["w0"].device
        heads = self._all_heads(enc).reshape(-1)
        # width index and integer range per layer (a float layer computes at 8 bits and is dropped below)
        eff = [b if b != FLOAT else max(self.widths) for b in wbits]
        keep = [s if b != FLOAT else e for b, s, e in zip(wbits, stored, eff)]
        widx = torch.tensor([self.widths.index(b) for b in eff], device=dev)[lay["layer_of"]]
        hi = torch.tensor([float(2 ** (b - 1) - 1) for b in keep], device=dev)[lay["layer_of"]]
        grow = torch.tensor([float(2.0 ** (e - k)) for e, k in zip(eff, keep)], device=dev)[lay["layer_of"]]
        s0 = lay["s0"].gather(0, widx[None])[0]
        scale = s0 * torch.exp(heads[lay["clip"]]) * grow
        elem = lay["elem"]
        w = lay["w0"] * (1.0 + heads[lay["gain"]]).index_select(0, elem)
        scale_e = scale.index_select(0, elem)
        hi_e = hi.index_select(0, elem)
        q = torch.div(w, scale_e).round_().nan_to_num_(nan=0.0)
        q = torch.minimum(torch.maximum(q, -hi_e - 1.0), hi_e).mul_(scale_e)
        out = {}
        for name, block, b, part in zip(self.names, self.blocks, wbits, torch.split(q, lay["numel"])):
            if b == FLOAT:
                out[name] = block.w0
                continue
            moved = list(block.w0.shape)
            moved.insert(0, moved.pop(block.axis))
            out[name] = part.view(moved).movedim(0, block.axis)
        return out

    def _all_heads(self, enc: torch.Tensor) -> torch.Tensor:
        """Every block's head output at once ([L, 2 x max channels], zero-padded): two batched matrix
        products instead of 2L small ones. Inference only (the GA scores ~1000 policies per budget); the
        stacked parameters are rebuilt when training has changed them."""
        params = self.__dict__.get("_param_list")
        if params is None:  # walking the module tree on every call cost ~1 ms per GA candidate
            params = self._param_list = list(self.parameters())
        version = tuple(p._version for p in params)
        if getattr(self, "_stacked_version", None) != version or self._stacked[0].device != enc.device:
            width = max(2 * b.channels for b in self.blocks)
            w1 = torch.stack([b.net[0].weight.t() for b in self.blocks])  # [L, enc, hidden]
            b1 = torch.stack([b.net[0].bias for b in self.blocks])[:, None, :]
            w2 = torch.zeros(len(self.blocks), w1.shape[2], width, device=w1.device)
            b2 = torch.zeros(len(self.blocks), 1, width, device=w1.device)
            for i, b in enumerate(self.blocks):
                w2[i, :, : 2 * b.channels] = b.net[2].weight.t()
                b2[i, 0, : 2 * b.channels] = b.net[2].bias
            self._stacked = (w1, b1, w2, b2)
            self._stacked_version = version
        w1, b1, w2, b2 = self._stacked
        hidden = torch.tanh(torch.baddbmm(b1, enc.to(w1.device)[:, None, :], w1))
        return torch.baddbmm(b2, hidden, w2)[:, 0, :]

    def forward(self, wbits: list[int]) -> dict[str, torch.Tensor]:
        # `generate` as the module's call, so DistributedDataParallel can wrap MetaQuantNet.
        return self.generate(wbits)

    def generate_float(self, wbits: list[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Layer name -> (float weight, per-channel scale): the starting point of finetuning."""
        enc = self.encode(wbits)
        return {
            name: block(enc[i], wbits[i])
            for i, (name, block) in enumerate(zip(self.names, self.blocks))
            if wbits[i] != FLOAT
        }

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
