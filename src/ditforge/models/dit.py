"""Class-conditional Diffusion Transformer (DiT), Peebles & Xie 2022, "Scalable Diffusion
Models with Transformers" (https://arxiv.org/abs/2212.09748).

Architecture only: no diffusion process, no training loop, no classifier-free guidance.
This module holds the network and the registry of names; its parts live beside it:
models/layers.py (norms, embedders), models/blocks.py (attention, MLPs, block, final layer),
models/attention.py (the attention kernels), models/positions.py (sin-cos and rotary
position embeddings), models/recompute.py (what blocks keep for backward).

Two times (MeanFlow, Geng et al. 2025, arXiv 2505.13447: ``meanflow/``; of the time conditionings
the paper compares, (t, t - r) is its default): with ``interval_embedding=True`` the network also takes an interval
h = t - r >= 0 through a second timestep embedder, ``h_embedder``, whose output is added to the
conditioning, c = t_emb + y_emb + h_emb. Its last linear layer starts at zero, so at
initialisation h_emb = 0 for every h and the network is exactly the DiT it would be without it
(the flow model a MeanFlow fine-tune starts from). Without the option (the default) the module
tree, the state-dict keys and ``repr`` are the official ones. ``forward(..., tangents=...)`` also
returns the network's Jacobian-vector product along (dx, dt, dh) (``forward_with_tangents``; each
module's ``jvp`` method, models/tangents.py).

The guidance scale as an input (improved MeanFlow, Geng et al. 2025, arXiv 2512.02012, Sec. 5:
"guidance as explicit conditioning"): with ``guidance_embedding=True`` a third embedder,
``w_embedder``, embeds the scale omega (N,) and adds it to the label's embedding, c = t_emb +
y_emb + h_emb + w_emb, so one network serves every scale it was trained on. Its output layer
starts at zero too (w_emb = 0 for every omega: the same network as without it), and omega is
constant along a JVP, as the label is.

The module tree, parameter names and shapes follow the official checkpoints exactly
(``DiT-XL-2-256x256.pt`` and friends load with ``strict=True``), and ``repr(model)`` matches
the print of the reference implementation (which builds its attention and MLP from timm;
here they are written out so that timm/torchvision are not needed).

Notation used in the shape comments:
    N  batch size            C  input channels        H, W  input height and width
    p  patch size            D  hidden size           T  tokens = (H / p) * (W / p)
    h  heads                 d  head dim = D / h      C' out channels (2C with learned sigma)
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn as nn

from ditforge.errors import UserError
from ditforge.models.blocks import MLPS, BlockOptions, DiTBlock, FinalLayer
from ditforge.models.layers import NORMS, LabelEmbedder, PatchEmbed, TimestepEmbedder
from ditforge.models.positions import RotaryEmbedding2D, get_2d_sincos_pos_embed
from ditforge.models.recompute import HALF_MODES, block_groups, normalize_spec, run_blocks

__all__ = [
    "DiT",
    "NORMS",
    "MLPS",
    "MODEL_SIZES",
    "MODEL_PATCH_SIZES",
    "MODEL_NAMES",
    "create_model",
    "count_parameters",
]


# ----------------------------------------------------------------------------------------
# DiT
# ----------------------------------------------------------------------------------------


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone (class-conditional, adaLN-Zero).

    ``norm``, ``mlp``, ``rope`` and ``qk_norm`` are the block options of LightningDiT (see
    `BlockOptions`); their defaults give the paper's DiT with the official state-dict keys.
    ``interval_embedding`` adds MeanFlow's second time, the interval h, and ``guidance_embedding``
    iMF's guidance-scale input (module docstring).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        norm: str = "layer",
        mlp: str = "gelu",
        rope: bool = False,
        qk_norm: bool = False,
        interval_embedding: bool = False,
        guidance_embedding: bool = False,
    ):
        super().__init__()
        for name, value in (
            ("input_size", input_size),
            ("patch_size", patch_size),
            ("in_channels", in_channels),
            ("hidden_size", hidden_size),
            ("depth", depth),
            ("num_heads", num_heads),
            ("num_classes", num_classes),
        ):
            _check_positive_int(name, value)
        if input_size % patch_size != 0:
            raise ValueError(
                f"input_size ({input_size}) must be divisible by patch_size ({patch_size})"
            )
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if hidden_size % 4 != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by 4 for the 2-D sin-cos position embedding"
            )
        if not (isinstance(mlp_ratio, (int, float)) and mlp_ratio > 0 and int(hidden_size * mlp_ratio) > 0):
            raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
        if not (isinstance(class_dropout_prob, (int, float)) and 0.0 <= class_dropout_prob <= 1.0):
            raise ValueError(f"class_dropout_prob must be in [0, 1], got {class_dropout_prob!r}")
        for name, value in (("interval_embedding", interval_embedding), ("guidance_embedding", guidance_embedding)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        self.options = BlockOptions(norm=norm, mlp=mlp, rope=rope, qk_norm=qk_norm)
        if rope and (hidden_size // num_heads) % 4 != 0:
            raise ValueError(
                f"rope needs a head dim (hidden_size / num_heads = {hidden_size // num_heads}) divisible by 4"
            )

        self.learn_sigma = bool(learn_sigma)
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.class_dropout_prob = class_dropout_prob
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # MeanFlow's interval h = t - r (None: a one-time DiT, the official module tree and keys)
        self.h_embedder = TimestepEmbedder(hidden_size) if interval_embedding else None
        # iMF's guidance scale omega as an input (None: no such input, the keys as before)
        self.w_embedder = TimestepEmbedder(hidden_size) if guidance_embedding else None
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding: a parameter (so it is in the state dict, as in the official
        # checkpoints) that is never trained.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        # 2-D RoPE: one module shared by the attention of every block (tables only, no weights).
        self.rope = RotaryEmbedding2D(hidden_size // num_heads, input_size // patch_size) if rope else None
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio, self.options, self.rope) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm=norm)
        self.grad_checkpointing = "none"  # training memory option: what blocks keep for backward
        self.initialize_weights()

    @property
    def grad_checkpointing(self) -> str:
        """What each block keeps for backward in training: a spec of models/recompute.py
        ("none", "ops", "mlp", "attn", "full", or MODE:FRACTION; True means "full")."""
        return self._grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, spec: str | bool) -> None:
        self._grad_checkpointing = normalize_spec(spec)
        self._block_groups = block_groups(spec, len(self.blocks))  # [(block indices, mode)]
        for indices, mode in self._block_groups:
            for i in indices:
                self.blocks[i].recompute = mode if mode in HALF_MODES else "none"
        self.final_layer.recompute = "none" if self._grad_checkpointing == "none" else "ops"

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """All of DiT's initialisation (works on the ``meta`` device too)."""

        # Transformer layers: xavier-uniform weights, zero biases.
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        # Fixed 2-D sin-cos position embedding, computed in float64 then cast (as the reference).
        grid = self.input_size // self.patch_size
        pos = get_2d_sincos_pos_embed(self.hidden_size, grid, device=self.pos_embed.device)  # (T, D)
        self.pos_embed.copy_(pos.to(self.pos_embed.dtype).unsqueeze(0))  # (1, T, D)
        if self.rope is not None:
            self.rope.reset()  # the rotary tables (RMSNorm gains start at 1 in their constructor)

        # Patch embedding like nn.Linear (xavier on the flattened (D, C*p*p) view), not Conv2d's default.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        # Label embedding table.
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

        # Timestep embedding MLP.
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # Interval embedding MLP: its first layer as the timestep MLP's, its output layer zero, so
        # that h_emb = 0 for every interval h at initialisation: the network is then exactly the
        # one-time DiT with the same other weights (a flow model that a MeanFlow fine-tune starts from).
        # The guidance-scale MLP the same way: w_emb = 0 for every omega at initialisation.
        for extra in (self.h_embedder, self.w_embedder):
            if extra is not None:
                nn.init.normal_(extra.mlp[0].weight, std=0.02)
                nn.init.constant_(extra.mlp[2].weight, 0)
                nn.init.constant_(extra.mlp[2].bias, 0)

        # adaLN-Zero: zero the modulation layers of every block, so each block starts as the
        # identity (all gates are 0).
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        # Zero the output layers: the model predicts exactly 0 at initialisation.
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C') -> (N, C', H, W), element order as the reference
        (``einsum('nhwpqc->nchpwq')``: per token the channel index varies fastest)."""
        c = self.out_channels
        p = self.patch_size
        h = w = self.input_size // p
        if x.shape[1] != h * w:
            raise ValueError(f"expected {h * w} tokens, got {x.shape[1]}")
        x = x.reshape(x.shape[0], h, w, p, p, c)  # (N, H/p, W/p, p, p, C')
        x = x.permute(0, 5, 1, 3, 2, 4)  # (N, C', H/p, p, W/p, p) == einsum 'nhwpqc->nchpwq'
        return x.reshape(x.shape[0], c, h * p, w * p)  # (N, C', H, W)

    @property
    def interval_embedding(self) -> bool:
        """Whether the network takes MeanFlow's interval h (module docstring)."""
        return self.h_embedder is not None

    @property
    def guidance_embedding(self) -> bool:
        """Whether the network takes iMF's guidance scale omega as an input (module docstring)."""
        return self.w_embedder is not None

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: Optional[torch.Tensor] = None,
        return_hidden: int = 0,
        interval: Optional[torch.Tensor] = None,
        tangents: Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = None,
        tangent_rows: Optional[torch.Tensor] = None,
        guidance: Optional[torch.Tensor] = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (N, C, H, W) noisy inputs, t (N,) timesteps (float or int), y (N,) class ids in
        [0, num_classes) (``num_classes`` itself is the null class when it exists);
        force_drop_ids (N,) optional, 1 = use the null class. Returns (N, C', H, W).

        ``return_hidden`` k in [1, depth] also returns the tokens (N, T, D) after block k (the
        input of block k + 1), for representation alignment (REPA, ``ditforge/repa``): the
        output is then ``(out, hidden)``; 0 (the default) computes exactly what it did before.

        ``interval`` (N,) or 0-d: MeanFlow's h = t - r, for a model built with
        ``interval_embedding`` (None there: h = 0, the instantaneous velocity). ``tangents``
        (dx, dt, dh), shaped like (x, t, h) (dh None without an interval): the output is then
        ``(out, d out)``, the network and its derivative along them, for the rows where
        ``tangent_rows`` (N,) bool is set (None: all; elsewhere d out is 0 and the row costs a
        plain forward: `forward_with_tangents`).

        ``guidance`` (N,) or 0-d: the guidance scale omega, for a model built with
        ``guidance_embedding`` (None there: 1, no guidance); constant along the tangents."""
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected x of shape (N, {self.in_channels}, {self.input_size}, {self.input_size}), "
                f"got {tuple(x.shape)}"
            )
        if t.ndim == 0:
            t = t.expand(x.shape[0])  # (N,)
        h = self._interval(interval, t)  # (N,) or None
        y = self.y_embedder(y, self.training, force_drop_ids)  # (N, D), label drops drawn once
        y = self._with_guidance(y, guidance, t)  # (N, D): + omega's embedding (iMF; 0 at initialisation)
        if tangents is not None:
            if return_hidden:
                raise ValueError("tangents and return_hidden cannot be combined")
            return self.forward_with_tangents(x, t, h, y, tangents, tangent_rows)  # (N, C', H, W) twice
        return self._network(x, t, h, y, return_hidden)

    def _interval(self, interval: Optional[torch.Tensor], t: torch.Tensor) -> Optional[torch.Tensor]:
        """The interval input (N,): as given, 0 where None; None for a one-time DiT."""
        if self.h_embedder is None:
            if interval is not None:
                raise ValueError("this DiT takes no interval (built without interval_embedding)")
            return None
        if interval is None:
            return torch.zeros_like(t, dtype=t.dtype if t.is_floating_point() else torch.float32)  # (N,)
        return interval.expand(t.shape[0]) if interval.ndim == 0 else interval  # (N,)

    def _with_guidance(self, y_emb: torch.Tensor, guidance: Optional[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        """The label embedding (N, D) plus the guidance scale's (a model with ``guidance_embedding``;
        omega = 1 where None), which the JVP then holds fixed with it."""
        if self.w_embedder is None:
            if guidance is not None:
                raise ValueError("this DiT takes no guidance scale (built without guidance_embedding)")
            return y_emb
        if guidance is None:
            guidance = torch.ones(t.shape[0], device=y_emb.device)
        w = guidance.expand(t.shape[0]) if guidance.ndim == 0 else guidance  # (N,)
        return y_emb + self.w_embedder(w).to(y_emb.dtype)  # (N, D)

    def _network(self, x, t, h, y_emb, return_hidden: int = 0):
        """The network from the label embedding y_emb (N, D) on: x (N, C, H, W), t (N,), h (N,) or None."""
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = H*W / p**2
        c = self.t_embedder(t) + y_emb  # (N, D)
        if self.h_embedder is not None:
            c = c + self.h_embedder(h)  # (N, D): + the interval's embedding (0 at initialisation)
        hidden = None
        for indices, mode in self._groups_split_at(return_hidden):
            x = run_blocks([self.blocks[i] for i in indices], x, c, mode if self.training else "none")  # (N, T, D)
            if indices[-1] == return_hidden - 1:
                hidden = x  # (N, T, D) after block `return_hidden`
        x = self.final_layer(x, c)  # (N, T, p*p*C')
        x = self.unpatchify(x)  # (N, C', H, W)
        return x if not return_hidden else (x, hidden)  # (N, C', H, W) [, (N, T, D)]

    def forward_with_tangents(self, x, t, h, y_emb, tangents, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(F, dF), each (N, C', H, W): the network F(x, t, h) (label embedding y_emb (N, D) fixed)
        and its Jacobian-vector product dF = dF/dx dx + dF/dt dt + dF/dh dh along ``tangents``
        (dx, dt, dh) (dh None without an interval).

        F is the plain forward of the whole batch (any attention kernel, grad checkpointing as
        set), with its autograd graph to the weights, so a loss on it trains them and a DDP
        wrapper around this module synchronises their gradients as for any forward. dF is the
        written-out forward-mode pass (`network_jvp`), without gradient: a target. ``rows`` (N,)
        bool: only those rows get it, the others dF = 0 (MeanFlow at r = t needs none); selecting
        them reads the mask on the host (one sync on a GPU)."""
        if len(tangents) != 3 or (h is None) != (tangents[2] is None):
            raise ValueError("tangents must be (dx, dt, dh), dh None exactly when the DiT takes no interval")
        out = self._network(x, t, h, y_emb)  # (N, C', H, W)
        picked = None if rows is None else rows.nonzero().squeeze(1)  # (J,) the rows with a JVP (a host sync)
        with torch.no_grad():
            if picked is None or picked.numel() == x.shape[0]:
                return out, self.network_jvp(x, t, h, y_emb, *tangents)[1]
            d_out = torch.zeros_like(out)  # (N, C', H, W)
            if picked.numel():
                def take(v):
                    return None if v is None else v[picked]

                d_picked = self.network_jvp(x[picked], t[picked], take(h), y_emb[picked], *(take(v) for v in tangents))[1]
                d_out.index_copy_(0, picked, d_picked.to(d_out.dtype))
        return out, d_out

    def network_jvp(self, x, t, h, y_emb, dx, dt, dh) -> tuple[torch.Tensor, torch.Tensor]:
        """(F, dF) of `_network` for inputs x (N, C, H, W), t (N,), h (N,) or None moving at dx,
        dt, dh (None with h), label embedding y_emb (N, D) fixed: each module's own ``jvp``
        (models/tangents.py). Meant without gradient; eval-mode arithmetic (no dropout, no
        recomputation: DiT has no dropout, and the pass keeps nothing for backward)."""
        tokens, d_tokens = self.x_embedder.jvp(x, dx)  # (N, T, D) each
        tokens = tokens + self.pos_embed
        c, dc = self.t_embedder.jvp(t, dt)  # (N, D) each
        c = c + y_emb
        if self.h_embedder is not None:
            ch, dch = self.h_embedder.jvp(h, dh)
            c, dc = c + ch, dc + dch
        for block in self.blocks:
            tokens, d_tokens = block(tokens, c, tangents=(d_tokens, dc))  # (N, T, D) each: its jvp, through forward (FSDP2)
        out, d_out = self.final_layer.jvp(tokens, d_tokens, c, dc)  # (N, T, p*p*C') each
        return self.unpatchify(out), self.unpatchify(d_out)  # (N, C', H, W) each

    def _groups_split_at(self, k: int) -> list[tuple[tuple[int, ...], str]]:
        """The block groups of `grad_checkpointing`, a group that holds blocks k - 1 and k cut in
        two so that the tokens after block k exist (k = 0: the groups unchanged)."""
        if not k:
            return self._block_groups
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(self.blocks):
            raise ValueError(f"return_hidden must be a block count in [1, {len(self.blocks)}], got {k!r}")
        groups = []
        for indices, mode in self._block_groups:
            if indices[0] < k <= indices[-1]:
                cut = k - indices[0]
                groups += [(indices[:cut], mode), (indices[cut:], mode)]
            else:
                groups.append((indices, mode))
        return groups


# ----------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------

#: size name -> (depth, hidden_size, num_heads). "Ti" is ditforge's tiny size for CPU work.
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "Ti": (6, 192, 3),
}

#: size name -> allowed patch sizes (the paper's 12 models, plus the tiny ones).
MODEL_PATCH_SIZES: dict[str, tuple[int, ...]] = {
    "XL": (2, 4, 8),
    "L": (2, 4, 8),
    "B": (2, 4, 8),
    "S": (2, 4, 8),
    "Ti": (1, 2, 4),
}

MODEL_NAMES: list[str] = [
    f"DiT-{size}/{patch}" for size, patches in MODEL_PATCH_SIZES.items() for patch in patches
]

_MODEL_CONFIGS: dict[str, dict[str, int]] = {}
for _size, _patches in MODEL_PATCH_SIZES.items():
    _depth, _hidden, _heads = MODEL_SIZES[_size]
    for _patch in _patches:
        _MODEL_CONFIGS[f"DiT-{_size}/{_patch}"] = dict(
            depth=_depth, hidden_size=_hidden, num_heads=_heads, patch_size=_patch
        )


def create_model(name: str, **kwargs) -> DiT:
    """Build a named DiT, e.g. ``create_model("DiT-XL/2")`` or
    ``create_model("DiT-Ti/2", input_size=8, in_channels=1, num_classes=10)``.

    ``kwargs`` go to :class:`DiT` (input_size, in_channels, num_classes, learn_sigma,
    class_dropout_prob, mlp_ratio, the block options norm, mlp, rope, qk_norm, MeanFlow's
    interval_embedding and iMF's guidance_embedding); depth, hidden_size, num_heads and patch_size are fixed
    by the name.
    """
    if name not in _MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    config = _MODEL_CONFIGS[name]
    clash = sorted(set(config) & set(kwargs))
    if clash:
        raise TypeError(f"{', '.join(clash)} is fixed by the model name {name!r} and cannot be overridden")
    takes = [p for p in inspect.signature(DiT.__init__).parameters if p != "self" and p not in config]
    unknown = sorted(set(kwargs) - set(takes))
    if unknown:  # model_args of a checkpoint or hub folder written by a newer version
        raise UserError(f"model settings: {', '.join(map(repr, unknown))} is not an option of this version's DiT (it "
                        f"takes {', '.join(takes)}); a model that records it was written by a newer version of "
                        "ditforge: read it with that version")
    return DiT(**config, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter values, trainable or not (includes the fixed pos_embed)."""
    return sum(p.numel() for p in model.parameters())
