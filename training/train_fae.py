"""Train FAE: the feature auto-encoder (stage Ia), the pixel decoder on noisy encoder features (Ib), and
the pixel decoder fine-tuned on the FAE's reconstructed features (II).

    python training/train_fae.py                              # tiny CPU demo of stage Ia on generated images
    python training/train_fae.py --stage pixel                # then Ib, then:
    python training/train_fae.py --stage pixel-finetune       # II on the demo FAE (runs/fae-tiny-*/ema.safetensors)
    torchrun --nproc_per_node=8 training/train_fae.py --recipe dinov2-g --stage feature --data.root=/data/imagenet

One step of each stage (x: frozen-encoder patch features (B, T, F), images in [-1, 1]):
  feature         x -> FAE encoder -> z = mu + exp(logvar / 2) * eps -> feature decoder -> x_hat
                  loss = mean (x_hat - x)^2 + fae.kl_beta * KL per latent element (fae_fast/losses.py)
  pixel           x + sigma * eps -> pixel decoder -> image;  L1 + perceptual + adaptive hinge GAN
  pixel-finetune  x -> trained FAE, frozen, z = mu -> x_hat -> pixel decoder -> image;  the same losses,
                  no added noise (x_hat carries the feature decoder's own errors)
sigma = encoder.noise_sigma: 0.4 for DINOv2-g (the paper). For another encoder scale it by the ratio of its
mean per-token feature norm to DINOv2-g's; the first step prints this encoder's norm to form that ratio.

The frozen encoder runs without gradients in eval mode, with bf16 weights under bf16 autocast on CUDA (fp32
elsewhere), each block compiled. The trained model gets the parallelism of train_gen.py (FSDP2, per-block
compile, mixed precision; the FAE encoder's single layer is compiled and sharded with the root), an fp32
EMA, the NaN guard, progress lines with images/s and MFU, and DCP checkpoints: a run killed at any moment
and started again with the same command continues from its last complete checkpoint and draws what an
uninterrupted run would (noise from (run.seed, step, rank), the data position in the checkpoint). The EMA
weights end in <out_dir>/ema.safetensors: the next stage's input and what latent extraction loads.
"""
import dataclasses
import json
import warnings
from dataclasses import replace
from pathlib import Path


import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file

from fae_fast.cli import parse_command_line, run_program
from fae_fast.config import to_dict
from fae_fast.data.fae_images import make_image_source
from fae_fast.encoders import FrozenEncoder
from fae_fast.eval.recon import RFID_MIN_IMAGES, ReconstructionScores, to_uint8
from fae_fast.fae import FeatureAutoencoder, PixelDecoder
from fae_fast.fae_config import RECIPES, STAGE_DOCS, FAETrainConfig, fae_recipe, validate
from fae_fast.inference import frozen_encoder
from fae_fast.losses import (LayerInput, PatchDiscriminator, feature_loss, hinge_d_loss, hinge_g_loss,
                             last_layer_balance, load_perceptual_loss)
from fae_fast.seeding import step_generator, step_seed
from fae_fast.viz import save_grid
from fae_fast.train.checkpoint import (FAE_CONFIG_NAME, CheckpointManager, ModelAndOptimizer, export_weights,
                                 load_strict, read_weights)
from fae_fast.train.parallelize import parallelize
from fae_fast.train.loop import LoopSettings, train_loop
from fae_fast.train.runtime import (EMA, finish_distributed, init_distributed, make_adamw,
                                    mean_over_ranks, plot_curves, print0, set_lr)



def parse_args(argv: list[str]) -> FAETrainConfig:
    """`--recipe NAME` (default tiny) and `--stage STAGE` (default feature), then `--section.field=value`."""
    cfg = parse_command_line(argv, prog="train_fae.py", summary=__doc__.split("\n")[0],
                             choices={"recipe": ("tiny", RECIPES), "stage": ("feature", STAGE_DOCS)},
                             build=lambda picked: fae_recipe(picked["recipe"], picked["stage"]))
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------
def autocast(device: torch.device):
    """bf16 autocast on CUDA for the frozen and auxiliary networks; a no-op on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def compiled_frozen_encoder(cfg: FAETrainConfig, device: torch.device) -> FrozenEncoder:
    """The pretrained encoder, frozen (inference.frozen_encoder: bf16 weights on CUDA, resize and
    normalisation fp32), each block compiled when run.compile."""
    encoder = frozen_encoder(cfg.encoder, cfg.fae.grid, device)
    if cfg.run.compile:
        for block in getattr(encoder.model, "blocks", [encoder.model]):
            block.compile()
    return encoder


@torch.no_grad()
def encode_features(encoder: FrozenEncoder, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, E, E) in [0, 1] -> patch features (B, T, F) float32."""
    with autocast(images.device):
        return encoder(images).float()


def load_weights(module: nn.Module, path: str, what: str) -> None:
    """Strictly load an exported safetensors file, or the EMA of a DCP checkpoint folder, into a plain module."""
    load_strict(module, read_weights(path, what), str(path), "use the same --fae.* sizes as the run that wrote them")


def export_fae(fae: "FeatureAutoencoder", pixel_weights: Path, path: Path, fae_cfg) -> None:
    """One file with the whole FAE, as training/sample.py (--fae) and latent extraction read it:
    encoder.*, feature_decoder.* and pixel_decoder.*, and beside it fae_config.json with the FAEConfig
    it was built with (sample.py reads it from there). Rank 0 writes."""
    if dist.get_rank() != 0:
        return
    tensors = {f"encoder.{k}": v for k, v in fae.encoder.state_dict().items()}
    tensors |= {f"feature_decoder.{k}": v for k, v in fae.decoder.state_dict().items()}
    tensors |= {f"pixel_decoder.{k}": v for k, v in load_file(str(pixel_weights)).items()}
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(path))
    path.with_name(FAE_CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(fae_cfg), indent=1))


def choose_attention(cfg: FAETrainConfig, device: torch.device, shapes: list[tuple[int, int]]) -> None:
    """Measure the attention backend for each (heads, head_dim) before compiling (fae_fast.attention)."""
    if device.type != "cuda":
        return
    from fae_fast.attention import choose_backend, only_backend

    only_backend(cfg.run.attention)
    local = cfg.data.global_batch // dist.get_world_size()
    dtype = torch.bfloat16 if cfg.run.precision == "bf16" else torch.float32
    for heads, head_dim in shapes:
        choose_backend(local, heads, cfg.fae.grid ** 2, head_dim, dtype, device)


def forward_flops(make, *shapes) -> float:
    """FLOPs of one forward of make()(*inputs of `shapes`), counted on the meta device (no memory, no time)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        module, inputs = make(), [torch.empty(s) for s in shapes]
        with FlopCounterMode(display=False) as counter:
            module(*inputs)
    return float(counter.get_total_flops())


def encoder_flops(cfg: FAETrainConfig) -> float:
    enc = replace(cfg.encoder, pretrained=False, weights_path="")
    size = cfg.encoder.image_size
    return forward_flops(lambda: FrozenEncoder(enc, grid=cfg.fae.grid), (1, 3, size, size))


# ----------------------------------------------------------------------------------------------------
# Stage Ia
# ----------------------------------------------------------------------------------------------------
class FeatureStage:
    """FAE encoder + feature decoder on frozen-encoder features."""

    def __init__(self, cfg: FAETrainConfig, d):
        self.cfg, self.d = cfg, d
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank before sharding
        self.encoder = compiled_frozen_encoder(cfg, d.device)
        with d.device:
            self.model = FeatureAutoencoder(cfg.fae, impl=cfg.run.impl)
        f = cfg.fae
        choose_attention(cfg, d.device, [(f.enc_heads, f.enc_head_dim), (f.dec_heads, f.dec_width // f.dec_heads)])
        if cfg.run.compile:
            self.model.encoder.layer.compile()  # one layer: compiled here, sharded with the root below
        parallelize(self.model, self.model.decoder.layers, precision=cfg.run.precision, compile=cfg.run.compile,
                    activation_checkpointing=cfg.run.activation_checkpointing)
        self.optimizer = make_adamw(self.model.parameters(), cfg.optim, d.device)
        T = f.grid ** 2
        fae = forward_flops(lambda: FeatureAutoencoder(f, "torch"), (1, T, f.feature_dim))
        self.flops = encoder_flops(cfg) + 3 * fae  # frozen forward + trained forward and backward

    def state(self) -> dict:
        return {"train": ModelAndOptimizer(self.model, self.optimizer)}

    def flops_per_image(self, step: int) -> float:
        return self.flops

    def step(self, step: int, pixels, encoder_pixels) -> dict[str, torch.Tensor]:
        """Forward and backward of one batch; the loss terms, detached."""
        x = encode_features(self.encoder, encoder_pixels)  # (B, T, F)
        x_hat, kl = self.model(x, seed=step_seed(self.cfg.run.seed, step, self.d.rank, "noise"))
        f = self.cfg.fae
        terms = feature_loss(x_hat, x, kl, beta=f.kl_beta, latent_elements=f.grid ** 2 * f.latent_dim)
        terms["loss"].backward()
        return {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def evaluate(self, source, n: int, out: Path, first_step: int) -> dict[str, float]:
        """Feature reconstruction with z = mu on n images: mean squared error and error relative to |x|^2."""
        sq, ref = torch.zeros((), device=self.d.device), torch.zeros((), device=self.d.device)
        seen, step = 0, first_step
        while seen < n:
            x = encode_features(self.encoder, source.batch(step)[1])
            x_hat, _ = self.model(x, sample=False)
            sq += (x_hat.float() - x).pow(2).sum()
            ref += x.pow(2).sum()
            seen, step = seen + x.shape[0] * self.d.world, step + 1
        numel = torch.tensor(float(seen // self.d.world * x[0].numel()), device=self.d.device)
        stats = torch.stack([sq, ref, numel])
        dist.all_reduce(stats)
        scores = {"feature_mse": float(stats[0] / stats[2]), "relative_error": float(stats[0] / stats[1])}
        print0(f"feature reconstruction (EMA, z = mu) on {seen} images: mse {scores['feature_mse']:.4f}, "
               f"|x_hat - x|^2 / |x|^2 = {scores['relative_error']:.4f}")
        return scores


# ----------------------------------------------------------------------------------------------------
# Stages Ib and II
# ----------------------------------------------------------------------------------------------------
class PixelStage:
    """Pixel decoder on noisy features (pixel) or on a trained FAE's reconstructions (pixel-finetune), with
    L1, perceptual and hinge-GAN losses; the discriminator is a plain replicated module with its own AdamW."""

    def __init__(self, cfg: FAETrainConfig, d):
        self.cfg, self.d, self.dev = cfg, d, d.device
        torch.manual_seed(cfg.run.seed)
        self.encoder = compiled_frozen_encoder(cfg, d.device)
        self.fae = self._frozen_fae() if cfg.stage == "pixel-finetune" else None
        with d.device:
            self.model = PixelDecoder(cfg.fae, impl=cfg.run.impl)
        if cfg.pixel_init:
            load_weights(self.model, cfg.pixel_init, "pixel decoder")
        self.last_input = LayerInput(self.model.out)
        choose_attention(cfg, d.device, [(cfg.fae.pix_heads, cfg.fae.pix_width // cfg.fae.pix_heads)])
        parallelize(self.model, self.model.layers, precision=cfg.run.precision, compile=cfg.run.compile,
                    activation_checkpointing=cfg.run.activation_checkpointing)
        self.optimizer = make_adamw(self.model.parameters(), cfg.optim, d.device)
        self.disc = PatchDiscriminator(cfg.loss.disc_channels, cfg.loss.disc_layers).to(d.device)
        self.disc_optimizer = make_adamw(self.disc.parameters(), cfg.optim, d.device, lr=cfg.loss.disc_lr,
                                         betas=cfg.loss.disc_betas)
        self.perceptual = self._perceptual()
        self.grid_images = None
        self._flops()

    def _frozen_fae(self) -> FeatureAutoencoder:
        with self.dev:
            fae = FeatureAutoencoder(self.cfg.fae, impl=self.cfg.run.impl)
        if self.cfg.fae_weights == "random":
            print0("WARNING: fae_weights=random: the pixel decoder learns on a randomly initialised FAE (speed runs)")
        else:
            load_weights(fae, self.cfg.fae_weights, "FAE (encoder + feature decoder)")
        return fae.requires_grad_(False).eval()

    def _perceptual(self):
        if self.cfg.loss.perceptual_weight <= 0:
            return None
        with warnings.catch_warnings():
            if not self.d.is_main:  # one warning per job, not per rank
                warnings.simplefilter("ignore")
            loss = load_perceptual_loss(self.cfg.loss.vgg_weights, required=self.cfg.loss.perceptual_required)
        return loss.to(self.dev) if loss is not None else None

    def _flops(self) -> None:
        f, S, T = self.cfg.fae, self.cfg.fae.image_size, self.cfg.fae.grid ** 2
        self.base = encoder_flops(self.cfg) + 3 * forward_flops(lambda: PixelDecoder(f, "torch"), (1, T, f.feature_dim))
        if self.fae is not None:
            self.base += forward_flops(lambda: FeatureAutoencoder(f, "torch"), (1, T, f.feature_dim))
        if self.perceptual is not None:  # VGG on both images forward, and the input gradient of one
            self.base += 1.5 * forward_flops(lambda: type(self.perceptual)(_vgg_like(), list(self.perceptual.linear)), (1, 3, S, S), (1, 3, S, S))
        loss = self.cfg.loss
        disc = forward_flops(lambda: PatchDiscriminator(loss.disc_channels, loss.disc_layers), (1, 3, S, S))
        self.gan = 8 * disc  # G step: forward + input gradient on fakes; D step: forward + backward, real and fake

    def flops_per_image(self, step: int) -> float:
        return self.base + (self.gan if self.gan_on(step) else 0.0)

    def state(self) -> dict:
        return {"train": ModelAndOptimizer(self.model, self.optimizer),
                "disc": ModelAndOptimizer(self.disc, self.disc_optimizer)}

    def gan_on(self, step: int) -> bool:
        return self.cfg.loss.adv_weight > 0 and step >= self.cfg.loss.disc_start

    def inputs(self, step: int, encoder_pixels, noise: bool = True) -> torch.Tensor:
        """What the pixel decoder reads: x + sigma * eps (pixel) or the frozen FAE's x_hat (pixel-finetune)."""
        x = encode_features(self.encoder, encoder_pixels)
        if self.fae is not None:
            with torch.no_grad(), autocast(self.dev):
                return self.fae(x, sample=False)[0].float()
        if not noise:
            return x
        eps = torch.randn(x.shape, generator=step_generator(self.cfg.run.seed, step, self.d.rank, "noise", self.dev),
                          device=self.dev)
        return x + self.cfg.encoder.noise_sigma * eps

    def reconstruction_loss(self, image, target) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = self.cfg.loss
        l1 = (image - target).abs().mean()
        terms, rec = {"l1": l1}, loss.l1_weight * l1
        if self.perceptual is not None:
            with autocast(self.dev):
                terms["lpips"] = self.perceptual(image, target)
            rec = rec + loss.perceptual_weight * terms["lpips"]
        return rec, terms

    def balance(self, grad_rec, grad_gan) -> torch.Tensor:
        return last_layer_balance(grad_rec, grad_gan, self.last_input.value, self.model.patch,
                                  max_weight=self.cfg.loss.adaptive_weight_max)

    def step(self, step: int, pixels, encoder_pixels) -> dict[str, torch.Tensor]:
        """Decoder forward; loss gradients taken at the image, so the decoder runs one backward with
        dL/dimage = dR + adv_weight * lambda * dG; then one discriminator step on the same batch."""
        target = pixels * 2 - 1  # (B, 3, S, S) in [-1, 1]
        image = self.model(self.inputs(step, encoder_pixels))  # (B, 3, S, S)
        leaf = image.detach().float().requires_grad_()
        rec, terms = self.reconstruction_loss(leaf, target)
        zero = torch.zeros((), device=self.dev)
        if self.gan_on(step):
            with autocast(self.dev):
                g = hinge_g_loss(self.disc(leaf))
            (grad_rec,), (grad_gan,) = torch.autograd.grad(rec, leaf), torch.autograd.grad(g, leaf)
            lam = self.balance(grad_rec, grad_gan)
            scale = self.cfg.loss.adv_weight * lam
            image.backward((grad_rec + scale * grad_gan).to(image.dtype))
            d_loss, total = self.discriminator_step(target, leaf.detach()), rec + scale * g
        else:
            (grad_rec,) = torch.autograd.grad(rec, leaf)
            image.backward(grad_rec.to(image.dtype))
            g, lam, d_loss, total = zero, zero, zero, rec
        if self.grid_images is None:
            self.grid_images = (pixels[:8].detach(), encoder_pixels[:8].detach())
        return {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}, "g_adv": g.detach(),
                "d_loss": d_loss, "lambda": lam}

    def discriminator_step(self, real, fake) -> torch.Tensor:
        with autocast(self.dev):
            d_loss = hinge_d_loss(self.disc(real), self.disc(fake))
        d_loss.backward()
        all_reduce_mean_grads(self.disc)
        self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        return d_loss.detach()

    @torch.no_grad()
    def reconstruct(self, encoder_pixels) -> torch.Tensor:
        """Images in [-1, 1] from clean inputs (no added noise)."""
        return self.model(self.inputs(0, encoder_pixels, noise=False)).float()

    def save_grid(self, path: Path) -> None:
        """Originals over their reconstructions, for the 8 images of the first step (all ranks call this)."""
        if self.grid_images is None:
            return
        pixels, enc = self.grid_images
        recon = (self.reconstruct(enc).clamp(-1, 1) + 1) / 2
        if self.d.is_main:
            save_grid(torch.cat([pixels, recon]).float(), path, nrow=len(pixels))

    @torch.no_grad()
    def evaluate(self, source, n: int, out: Path, first_step: int) -> dict[str, float]:
        """PSNR (uint8) of n reconstructions; rFID too when n is at least 2048 and Inception weights exist."""
        self.save_grid(out / "recon_final.png")
        recon, step = ReconstructionScores(self._extractor(n)), first_step
        while len(recon) * self.d.world < n:
            pixels, enc = source.batch(step)
            recon.add(to_uint8(pixels, (0.0, 1.0)), to_uint8(self.reconstruct(enc)))
            step += 1
        scores = recon.scores()
        images = scores.pop("num_images")
        print0(f"reconstruction PSNR (EMA, uint8) on {images} images: {scores['psnr']:.2f} dB")
        if "rfid" in scores:
            print0(f"rFID (EMA) on {images} images: {scores['rfid']:.3f}")
        return scores

    def _extractor(self, n: int):
        """The Inception extractor for rFID, or None with the reason printed."""
        if n < RFID_MIN_IMAGES:
            if n > 0:
                print0(f"rFID skipped: run.eval_samples={n} < {RFID_MIN_IMAGES} images "
                       f"(a 2048-d covariance needs more)")
            return None
        from fae_fast.eval.fid import InceptionExtractor

        try:
            return InceptionExtractor(self.dev)
        except (FileNotFoundError, ImportError) as err:  # offline, or no torch-fidelity: keep the PSNR
            print0(f"rFID skipped: {err}")
            return None


def _vgg_like() -> nn.Sequential:
    """VGG16's conv layers with random weights: the FLOP count needs the shape only."""
    from torchvision.models.vgg import cfgs, make_layers

    return make_layers(cfgs["D"])


def all_reduce_mean_grads(module: nn.Module) -> None:
    """Average a replicated module's gradients over ranks in one flat all-reduce."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = mean_over_ranks(_flatten_dense_tensors(grads))
    for g, mean in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(mean)


# ----------------------------------------------------------------------------------------------------
# The program
# ----------------------------------------------------------------------------------------------------
def resume(ckpts: CheckpointManager, state: dict, cfg: FAETrainConfig) -> tuple[int, Path | None]:
    """Load the newest intact checkpoint into `state`, after checking stage, encoder and FAE config.
    Returns its step and folder ((0, None) without one)."""
    latest = ckpts.latest_intact()
    if latest is None:
        return 0, None
    saved = json.loads((latest / "config.json").read_text()).get("stage")
    if saved != cfg.stage:
        raise ValueError(f"checkpoint {latest} belongs to stage {saved!r}, not {cfg.stage!r}; give this stage "
                         f"its own --run.out_dir")
    CheckpointManager.load(latest, state, to_dict(cfg), must_match=("encoder", "fae"))
    start = int(state["progress"]["step"])
    print0(f"resumed from {latest} at step {start}")
    return start, latest


def describe(cfg: FAETrainConfig, stage, d) -> None:
    trained = sum(p.numel() for p in stage.model.parameters())
    frozen = sum(p.numel() for p in stage.encoder.parameters())
    print0(f"stage {cfg.stage}: trained {trained / 1e6:.2f}M parameters, frozen encoder {cfg.encoder.timm_name} "
           f"{frozen / 1e6:.1f}M; {d.world} rank(s) on {d.device.type}, global batch {cfg.data.global_batch}, "
           f"{cfg.run.steps} steps -> {cfg.run.out_dir}")


def optimizer_step(stage, ema: EMA, cfg: FAETrainConfig) -> None:
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(stage.model.parameters(), cfg.optim.grad_clip)
    stage.optimizer.step()
    stage.optimizer.zero_grad(set_to_none=True)
    ema.update()


def report_feature_norm(encoder: FrozenEncoder, encoder_pixels, cfg: FAETrainConfig) -> None:
    """The encoder's mean per-token feature norm: what encoder.noise_sigma is scaled by (module docstring)."""
    norm = float(encode_features(encoder, encoder_pixels).norm(dim=-1).mean())
    print0(f"encoder features: mean per-token norm {norm:.3f} "
           f"(encoder.noise_sigma={cfg.encoder.noise_sigma} is relative to this)")


class FAETraining:
    """train_fae's TrainingTask (fae_fast/train/loop.py): one stage's step on a batch of the image source,
    the optimizer (with clipping) and the EMA; reconstruction grids where the stage draws them. Loss spikes
    are not judged here (no roll_back): the GAN's losses swing by design."""

    def __init__(self, stage, ema: EMA, source, cfg: FAETrainConfig):
        self.stage, self.ema, self.source, self.cfg = stage, ema, source, cfg

    def batch(self, step: int):
        return self.source.batch(step)

    def first_batch(self, batch) -> None:
        report_feature_norm(self.stage.encoder, batch[1], self.cfg)

    def train_step(self, step: int, batch) -> dict[str, torch.Tensor]:
        pixels, encoder_pixels = batch
        set_lr(self.stage.optimizer, self.cfg.optim, step, self.cfg.run.steps)
        terms = self.stage.step(step, pixels, encoder_pixels)
        optimizer_step(self.stage, self.ema, self.cfg)
        return terms

    def flops_per_image(self, step: int) -> float:
        return self.stage.flops_per_image(step)

    def save_samples(self, done: int) -> None:
        if hasattr(self.stage, "save_grid"):  # the feature stage draws none: no EMA swap for nothing
            with self.ema.applied():
                self.stage.save_grid(Path(self.cfg.run.out_dir) / f"recon_{done:08d}.png")


PLOTTED = {"feature": ("loss", "rec", "kl"), "pixel": ("l1", "lpips", "d_loss")}  # log-scale: positive terms


def plot_history(history: list, cfg: FAETrainConfig, out: Path) -> None:
    """loss.png of the stage's positive terms (history.json is written by Progress at each checkpoint)."""
    keys = PLOTTED["feature" if cfg.stage == "feature" else "pixel"]
    shown = [(s, {k: v for k, v in terms.items() if k in keys}) for s, terms in history]
    plot_curves(shown, str(out / "loss.png"), f"train_fae: stage {cfg.stage}")


def main(argv: list[str]) -> dict:
    cfg = parse_args(argv)
    # a linear layer's 3-D output is a view; FSDP2 warns about in-place ops on it, and none are made here
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    d = init_distributed()
    out = Path(cfg.run.out_dir)
    source = make_image_source(cfg, d)
    stage = (FeatureStage if cfg.stage == "feature" else PixelStage)(cfg, d)
    ema = EMA(stage.model, cfg.optim.ema_decay)
    describe(cfg, stage, d)
    ckpts = CheckpointManager(out / "checkpoints")
    state = {**stage.state(), "ema": ema, "data": source, "progress": {"step": 0}}
    start, resumed_from = resume(ckpts, state, cfg)
    settings = LoopSettings(run=cfg.run, global_batch=cfg.data.global_batch, lr=cfg.optim.lr,
                            record=lambda: to_dict(cfg))
    history = train_loop(FAETraining(stage, ema, source, cfg), settings, d, ckpts, state, start, resumed_from)
    scores = {}
    if cfg.run.eval_samples > 0:
        with ema.applied():
            scores = stage.evaluate(source, cfg.run.eval_samples, out, first_step=cfg.run.steps)
    export_weights(stage.model, ema.state_dict(), out / "ema.safetensors")
    if cfg.stage == "pixel-finetune":
        export_fae(stage.fae, out / "ema.safetensors", out / "fae.safetensors", cfg.fae)
    if d.is_main:
        plot_history(history, cfg, out)
        print0(f"wrote {out / 'ema.safetensors'} and {out / 'loss.png'}")
    return {"history": history, "eval": scores}


if __name__ == "__main__":
    run_program(main)
    finish_distributed()
