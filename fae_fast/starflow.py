"""STARFlow-style normalizing flow on FAE latents: exact-likelihood training, KV-cached sampling, guidance.

The flow maps latents x (B, T, C) to Gaussian noise z through blocks. Block k sees its tokens in its own
order (raster, or flipped for every other block) and gives token i the affine map

    z_i = (x_i - mu_i) / sigma_i,    (mu_i, sigma_i) = f(x_0 .. x_{i-1})

with f a causal transformer whose position i reads x_{i-1} (position 0 reads a learned start vector), so
the Jacobian is triangular and log|det| = -sum log sigma. The last block (nearest the noise, the first to
run when sampling) is the deep one; it alone sees the class, through adaLN of the class embedding. Training
maximises the likelihood of noise-augmented latents x + noise_std * e (STARFlow, arXiv 2506.06276); the
sampler inverts block by block, one token at a time with a KV cache, then denoises with the flow's score.

Guidance in the deep block: the conditional and null-class Gaussians of each token, N(mu_c, sigma_c^2) and
N(mu_u, sigma_u^2), are combined as p_c^(1+w) / p_u^w, a Gaussian with precision ((1+w) - w s) / sigma_c^2,
s = min(1, sigma_c^2 / sigma_u^2) (clipped so that the precision stays positive), and mean
((1+w) mu_c - w s mu_u) / ((1+w) - w s). Its scale w + 1 and interval come from SamplerConfig.cfg, whose t
runs over the deep block's tokens: token i is guided when t_start <= i / T < t_end.

The layers are the flow transformer's (fae_fast/generators.Block: fused modulated norm, gated residual,
SwiGLU, RoPE + QK-norm), with causal attention through fae_fast.attention.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fae_fast.attention import attention_tokens, choose_backend
from fae_fast.conditioning import ClassLabels, draw_dropped, replace_dropped
from fae_fast.config import GeneratorConfig, SamplerConfig, StarFlowConfig, validate_starflow
from fae_fast.generators import Block
from fae_fast.layers import LabelEmbedder, ModulatedNorm, Ops, rope_angles_2d, sincos_pos_embed_2d
from fae_fast.transport import cfg_scale, validate_cfg_intervals

SIGMA_OFFSET = math.log(math.e - 1)
"""softplus(0 + SIGMA_OFFSET) = 1: a zero output layer starts every block as the identity map."""
HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """The flow's affine maps and log-determinants run in fp32 (fp64 stays fp64, for exact tests)."""
    return x if x.dtype == torch.float64 else x.float()


def layer_config(cfg: StarFlowConfig) -> GeneratorConfig:
    """The options of the flow's transformer layers, in the form generators.Block takes (LightningDiT's; the
    flow applies its own RoPE table, in each block's token order)."""
    return GeneratorConfig(depth=1, width=cfg.width, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
                           in_channels=cfg.in_channels, grid=cfg.grid, norm="rms", mlp="swiglu", rope=False,
                           qk_norm=True)


class TokenStep:
    """Where the cached sampler is: the token `position` (a (1,) int64 tensor, so that one captured CUDA graph
    serves every token) and the mask of the keys it sees (those at positions <= it)."""

    def __init__(self, tokens: int, device):
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.all_positions = torch.arange(tokens, device=device)

    def visible(self) -> torch.Tensor:
        return (self.all_positions <= self.position)[None, None, None, :]  # (1, 1, 1, T) for SDPA


class KVCache:
    """Keys and values of one transformer layer at every token position, (B, H, T, Dh) buffers allocated at
    the first token and written at the step's position; the adaLN output is kept too (one condition for every
    token of a sample)."""

    def __init__(self, step: TokenStep):
        self.step, self.k, self.v, self.modulation = step, None, None, None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this token's keys and values, then attend its query (B, H, 1, Dh) to every stored one."""
        if self.k is None:
            B, H, _, Dh = k.shape
            T = self.step.all_positions.numel()
            self.k, self.v = k.new_zeros(B, H, T, Dh), v.new_zeros(B, H, T, Dh)
        self.k.index_copy_(2, self.step.position, k)
        self.v.index_copy_(2, self.step.position, v)
        return F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=self.step.visible())


class CausalLayer(Block):
    """generators.Block with causal attention at given RoPE angles; with a KVCache, the next token only."""

    def forward(self, x, c, angles, cache: KVCache | None = None):  # x (B, T, D), c (B, D), angles (T, Dh/2)
        if cache is not None:
            return self.next_token(x, c, angles, cache)
        return self.layer(x, c, angles, self.adaLN(c).chunk(6, dim=-1), None)

    @torch.compiler.disable
    def next_token(self, x, c, angles, cache: KVCache):
        """The cached step runs eagerly: under per-layer compile its growing cache would recompile each token."""
        if cache.modulation is None:
            cache.modulation = self.adaLN(c).chunk(6, dim=-1)
        return self.layer(x, c, angles, cache.modulation, cache)

    def layer(self, x, c, angles, modulation, cache):
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation
        h = self.norm1(x, scale1, shift1)
        x, h = self.ops.gated_residual_modulated_norm(
            x, gate1, self.attend(h, angles, cache), scale2, shift2, self.norm2.weight, norm=self.norm_kind)
        return self.ops.gated_residual(x, gate2, self.mlp(h))

    def attend(self, h, angles, cache):
        attn = self.attn
        B, T, _ = h.shape
        qkv = attn.qkv(h).view(B, T, 3, attn.heads, attn.head_dim)
        q, k, v = self.ops.rope_qkv(qkv, angles, attn.q_norm, attn.k_norm)  # (B, H, T, Dh)
        if cache is None:
            return attn.proj(attention_tokens(q, k, v, causal=True))
        return attn.proj(cache.attend(q, k, v).transpose(1, 2).reshape(B, T, -1))


class FlowBlock(nn.Module):
    """One TARFlow block: (x, c) -> (z, log|det| per sample), and its inverse one token at a time."""

    def __init__(self, cfg: StarFlowConfig, layers: int, flipped: bool, conditioned: bool, ops: Ops):
        super().__init__()
        D, C, T = cfg.width, cfg.in_channels, cfg.grid ** 2
        self.flipped, self.conditioned = flipped, conditioned
        self.proj_in = nn.Linear(C, D)
        self.start = nn.Parameter(torch.zeros(1, 1, D))
        self.context = None if conditioned else nn.Parameter(torch.zeros(1, D))  # adaLN input when unconditioned
        self.layers = nn.ModuleList(CausalLayer(layer_config(cfg), ops) for _ in range(layers))
        self.norm = ModulatedNorm(D, norm="rms", ops=ops)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.proj_out = nn.Linear(D, 2 * C)
        order = torch.arange(T).flip(0) if flipped else torch.arange(T)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.grid, D)[order][None], persistent=False)
        self.register_buffer("angles", rope_angles_2d(cfg.grid, D // cfg.heads)[order], persistent=False)

    def in_order(self, x):
        return x.flip(1) if self.flipped else x

    def adaln_input(self, c, batch: int):
        return c if self.conditioned else self.context.expand(batch, -1)

    def transform(self, h, c):
        """(mu, log sigma) from the final layer's output h (B, n, D), in fp32 or wider."""
        shift, scale = self.final_adaLN(c).chunk(2, dim=-1)
        mu, a = at_least_fp32(self.proj_out(self.norm(h, scale, shift))).chunk(2, dim=-1)
        return mu, F.softplus(a + SIGMA_OFFSET).log()

    def forward(self, x, c):  # x (B, T, C) in raster order, c (B, D) -> z (B, T, C) raster, log|det| (B,)
        xs = self.in_order(x)
        mu, log_sigma = self.sequence_params(xs[:, :-1], c)
        z = (at_least_fp32(xs) - mu) * torch.exp(-log_sigma)
        return self.in_order(z), -log_sigma.sum(dim=(1, 2))

    def sequence_params(self, prefix, c):
        """(mu, log sigma), each (B, n + 1, C), of tokens 0..n (in this block's order) from the n tokens before
        the last, `prefix` (B, n, C): the forward's pass, and the uncached sampler's (the reference the cached
        one is checked against)."""
        B, n = c.shape[0], prefix.shape[1]
        c = self.adaln_input(c, B)
        inputs = torch.cat([self.start.expand(B, -1, -1), self.proj_in(prefix.to(self.proj_in.weight.dtype))], 1)
        h = inputs + self.pos_embed[:, :n + 1].to(inputs.dtype)
        for layer in self.layers:
            h = layer(h, c, self.angles[:n + 1])
        return self.transform(h, c)

    def cached_params(self, previous, c, step: TokenStep, caches: list[KVCache], first: bool = False):
        """(mu, log sigma) of the token at step.position from the token before it (`previous` (B, 1, C); the
        start vector when `first`) and the caches, which take this token's keys and values."""
        B = c.shape[0]
        c = self.adaln_input(c, B)
        if first:
            h = self.start.expand(B, -1, -1)
        else:
            h = self.proj_in(previous.to(self.proj_in.weight.dtype))
        h = h + self.pos_embed.index_select(1, step.position).to(h.dtype)
        angles = self.angles.index_select(0, step.position)
        for layer, cache in zip(self.layers, caches):
            h = layer(h, c, angles, cache)
        return self.transform(h, c)

    def inverse(self, z, c, *, cached: bool = True, guidance=None, graphs: bool = False):
        """x with forward(x, c)[0] == z: token by token, with KV caches (cached), or running every prefix again.
        guidance(i) -> scale w + 1 of token i, or None: c holds the conditional rows then the null rows (2B)
        and z the B rows of the first half. graphs: replay one captured CUDA graph per token (CUDA only)."""
        zs = at_least_fp32(self.in_order(z))
        B, T, _ = zs.shape
        if guidance is not None:
            zs = torch.cat([zs, zs])
        if cached:
            step = TokenStep(T, zs.device)
            caches = [KVCache(step) for _ in self.layers]
            next_params = TokenParams(self, c, step, caches, graphs)
        xs = []
        for i in range(T):
            if cached:
                mu, log_sigma = next_params(i, xs[-1] if xs else None)
            else:
                mu, log_sigma = (p[:, -1:] for p in self.sequence_params(torch.cat(xs, dim=1) if xs else zs[:, :0], c))
            if guidance is not None:
                mu, log_sigma = guided_gaussian(mu, log_sigma, guidance(i) - 1.0)
            xs.append(zs[:, i:i + 1] * torch.exp(log_sigma) + mu)
        x = torch.cat(xs, dim=1)
        return self.in_order(x[:B] if guidance is not None else x)


class TokenParams:
    """The cached step of one block's inverse: token 0 eagerly (it fills the caches' buffers and the kept
    adaLN outputs), then every token from one input buffer, eagerly or by replaying a CUDA graph captured at
    token 1 (the position lives in a tensor, so the graph is the same for every token)."""

    def __init__(self, block: FlowBlock, c, step: TokenStep, caches: list[KVCache], graphs: bool):
        self.block, self.c, self.step, self.caches = block, c, step, caches
        self.graphs, self.graph = graphs, None

    def run(self, previous):
        return self.block.cached_params(previous, self.c, self.step, self.caches)

    def __call__(self, i: int, previous):
        self.step.position.fill_(i)
        if i == 0:
            return self.block.cached_params(None, self.c, self.step, self.caches, first=True)
        if not self.graphs:
            return self.run(previous)
        if self.graph is None:
            self.previous = previous.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.run(self.previous)  # warm-up off the graph: kernel choices and workspaces settle
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.run(self.previous)
        self.previous.copy_(previous)
        self.graph.replay()
        return self.out[0].clone(), self.out[1].clone()


class FlowLayers:
    """Every flow block's transformer layers as one sequence: what fae_fast.train.parallelize compiles and
    shards one by one, and may replace (activation checkpointing) in the block that owns it. Not a
    ModuleList, so that no layer is registered under a second name (state dicts keep one key per weight)."""

    def __init__(self, flow: nn.ModuleList):
        self.slots = [(block.layers, i) for block in flow for i in range(len(block.layers))]

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, j: int) -> nn.Module:
        owner, i = self.slots[j]
        return owner[i]

    def __setitem__(self, j: int, module: nn.Module) -> None:
        owner, i = self.slots[j]
        owner[i] = module

    def __iter__(self):
        return (owner[i] for owner, i in self.slots)


def guided_gaussian(mu, log_sigma, w: float):
    """The Gaussian p_c^(1+w) / p_u^w of the conditional (first half of the rows) and null (second half)
    Gaussians, for both halves (the module docstring derives it); w = 0 returns the conditional one."""
    mu_c, mu_u = mu.chunk(2)
    ls_c, ls_u = log_sigma.chunk(2)
    if w == 0:
        return torch.cat([mu_c, mu_c]), torch.cat([ls_c, ls_c])
    s = torch.exp(2 * (ls_c - ls_u)).clamp(max=1.0)
    precision = (1 + w) - w * s
    mu_g = ((1 + w) * mu_c - w * s * mu_u) / precision
    ls_g = ls_c - 0.5 * torch.log(precision)
    return torch.cat([mu_g, mu_g]), torch.cat([ls_g, ls_g])


class StarFlow(nn.Module):
    """Latents (B, T, C) <-> Gaussian noise, conditioned on class labels (B,)."""

    fsdp_forward_methods = ("inverse",)
    """Called like forward when sharded (fae_fast.train.parallelize registers it with FSDP2)."""

    def __init__(self, cfg: StarFlowConfig, impl: str = "auto"):
        super().__init__()
        validate_starflow(cfg)
        self.cfg, self.ops = cfg, Ops(impl)
        self.conditioning = ClassLabels(cfg.num_classes, cfg.class_dropout)
        self.y_embed = LabelEmbedder(cfg.num_classes, cfg.width)
        n = cfg.shallow_blocks + 1
        self.flow = nn.ModuleList(  # data -> noise; the deep block last, in raster order
            FlowBlock(cfg, cfg.deep_layers if k == n - 1 else cfg.shallow_layers, flipped=(n - 1 - k) % 2 == 1,
                      conditioned=k == n - 1, ops=self.ops)
            for k in range(n))
        self.blocks = FlowLayers(self.flow)  # the compile + FSDP2 units
        self.initialize_weights()

    def initialize_weights(self):
        """Xavier linears, N(0, 0.02) embeddings and start vectors; adaLN-Zero modulations and zero output
        layers, so that every block starts as the identity map."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.table.weight, std=0.02)
        for block in self.flow:
            nn.init.normal_(block.start, std=0.02)
            if block.context is not None:
                nn.init.normal_(block.context, std=0.02)
            for mod in [layer.adaLN[-1] for layer in block.layers] + [block.final_adaLN[-1], block.proj_out]:
                nn.init.zeros_(mod.weight)
                nn.init.zeros_(mod.bias)

    def fp8_modules(self) -> list[nn.Module]:
        return [m for layer in self.blocks for m in (layer.attn, layer.mlp)]

    def check_latents(self, x):
        cfg = self.cfg
        if x.ndim != 3 or x.shape[1:] != (cfg.grid ** 2, cfg.in_channels):
            raise ValueError(f"flow expects latents (B, {cfg.grid ** 2}, {cfg.in_channels}) = (B, grid*grid, "
                             f"in_channels), got {tuple(x.shape)}; set model.grid and model.in_channels to the "
                             f"latents'")

    def forward(self, x, y):
        """x (B, T, C), labels y (B,) -> (z (B, T, C), log|det dz/dx| (B,)), both fp32 (fp64 for fp64 x)."""
        self.check_latents(x)
        c = self.y_embed(y)
        logdet = 0
        for block in self.flow:
            x, block_logdet = block(x, c)
            logdet = logdet + block_logdet
        return x, logdet

    def nll_per_dim(self, x, y):
        """-log p(x | y) per latent dimension, in nats (B,)."""
        z, logdet = self(x, y)
        dims = z.shape[1] * z.shape[2]
        return (0.5 * z.pow(2).sum(dim=(1, 2)) - logdet) / dims + HALF_LOG_TWO_PI

    def inverse(self, z, y, *, cached: bool = True, intervals=(), null=None, graphs: bool = False):
        """Latents for noise z (B, T, C) and labels y (B,); guided on `intervals` (SamplerConfig.cfg) with the
        `null` labels, in the deep block. graphs: the cached steps replay CUDA graphs (CUDA, unsharded)."""
        self.check_latents(z)
        deep, *shallow = reversed(self.flow)
        guided = bool(intervals) and null is not None
        T = z.shape[1]
        c = self.y_embed(torch.cat([y, null]) if guided else y)
        guidance = (lambda i: cfg_scale(i / T, intervals)) if guided else None
        x = deep.inverse(z, c, cached=cached, guidance=guidance, graphs=graphs)
        c = c[:z.shape[0]]
        for block in shallow:
            x = block.inverse(x, c, cached=cached, graphs=graphs)
        return x


def can_replay_graphs(model: nn.Module, x: torch.Tensor) -> bool:
    """CUDA graphs for the cached sampler: on CUDA, for a model FSDP2 does not shard (a sharded one gathers
    its weights in the forward hooks, which a graph cannot hold)."""
    from torch.distributed.fsdp import FSDPModule

    return x.is_cuda and not any(isinstance(m, FSDPModule) for m in model.modules())


def denoise(model: StarFlow, x, y):
    """One Tweedie step: x + noise_std^2 * d log p(x | y) / dx, with the flow's exact log-density."""
    sigma = model.cfg.noise_std
    if sigma == 0:
        return x
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        log_p = -model.nll_per_dim(x, y.clone()).sum() * (x.shape[1] * x.shape[2])
        (score,) = torch.autograd.grad(log_p, x)
    return (x + sigma ** 2 * score).detach()


def starflow_draws(model: StarFlow, x, condition, tc, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The random numbers of one training step, from `generator` in this order: which samples lose their
    label ('dropped', only with label dropout), then the augmentation noise ('noise', x's shape). `tc` (the
    flow-matching options) is not read."""
    draws = {}
    if (dropped := draw_dropped(model.conditioning, x.shape[0], x.device, generator)) is not None:
        draws["dropped"] = dropped
    draws["noise"] = torch.randn(x.shape, device=x.device, generator=generator)
    return draws


def starflow_loss_of_draws(model: StarFlow, x, condition, draws: dict[str, torch.Tensor], tc=None):
    """Per-sample NLL (nats per dimension) of the noise-augmented latents, the step's random numbers given
    (starflow_draws)."""
    condition = replace_dropped(model.conditioning, condition, draws.get("dropped"))
    return model.nll_per_dim(x + model.cfg.noise_std * draws["noise"], condition)


@torch.no_grad()
def sample_starflow(model: StarFlow, condition, noise, cfg: SamplerConfig, generator=None, step_noise=None):
    """Latents for `condition` (labels (B,)) from Gaussian `noise` (B, T, C): the KV-cached inverse, guided on
    cfg.cfg's intervals, then the denoising step (model.cfg.denoise). cfg's integration options and the SDE
    noise arguments do not apply to a flow."""
    validate_cfg_intervals(cfg.cfg)
    null = model.conditioning.null(condition)
    x = model.inverse(noise, condition, intervals=cfg.cfg, null=null, graphs=can_replay_graphs(model, noise))
    return denoise(model, x, condition) if model.cfg.denoise else x


def nll_floor(cfg: StarFlowConfig) -> float:
    """A lower bound of the training loss: the NLL per dimension of latents plus N(0, noise_std^2) noise is at
    least the noise's own entropy per dimension, 0.5 log(2 pi e noise_std^2)."""
    if cfg.noise_std <= 0:
        return -math.inf
    return 0.5 * math.log(2 * math.pi * math.e * cfg.noise_std ** 2)


def flops_per_sample(cfg: StarFlowConfig) -> float:
    """Matmul + attention FLOPs of one forward (latents -> noise) per sample; causal attention counts the
    half of QK^T and AV it computes."""
    T, D, C = cfg.grid ** 2, cfg.width, cfg.in_channels
    hidden = int(2 * D * cfg.mlp_ratio / 3)
    per_layer = 2 * T * (4 * D * D + 3 * D * hidden) + 2 * T * T * D  # qkv + proj, SwiGLU, causal attention
    layers = cfg.deep_layers + cfg.shallow_blocks * cfg.shallow_layers
    per_block_io = 2 * T * (C * D + D * 2 * C)  # proj_in, proj_out (the per-sample adaLN maps are negligible)
    return layers * per_layer + (cfg.shallow_blocks + 1) * per_block_io


def choose_attention(cfg: StarFlowConfig, rows: int, dtype: torch.dtype, device) -> str:
    """fae_fast.attention.choose_backend for the flow's causal attention at `rows` samples per forward."""
    return choose_backend(rows, cfg.heads, cfg.grid ** 2, cfg.width // cfg.heads, dtype, device, causal=True)
