"""Train the sandbox model from scratch: first the VAE, then the UNet and text encoder together.

Model (``vae_config``, ``unet_config``, ``text_config``): a 64x64 image is encoded by a three-level VAE (channels
32/64/64, downsampling factor 4) into a 16x16x4 latent, the grid of the v1 sandbox's UNet, so the diffusion stage
costs what it did at 32x32. The UNet has three levels (64/128/128 channels at 16x16, 8x8 and 4x4) with cross- and
self-attention at each, so the 4x4 level sees the whole scene at once (which object is left, which right in a
two-object caption); the text encoder is a 4-layer ``CLIPTextModel`` of width 128. Sizes in the record's ``parameters``.

Stage 1 (VAE, Kingma & Welling 2014 as used by Rombach et al. 2022): minimise
``||D(z) - x||^2 + beta * KL(q(z|x) || N(0, I))`` with ``z ~ q(z|x)``, ``beta`` small (1e-6). After it, the latent
``scaling_factor`` is set to ``1 / std(z)`` over a fixed batch so scaled latents have unit variance.

Stage 2 (latent diffusion, Ho et al. 2020; Rombach et al. 2022): with ``z0 = scaling_factor * z``,
``t ~ U{0..999}``, ``eps ~ N(0, I)``, ``z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps``, minimise
``||eps - eps_theta(z_t, t, tau(y))||^2`` jointly over the UNet ``eps_theta`` and the text encoder ``tau``; captions
are empty ~10 % of the time (conditioning dropout for classifier-free guidance, Ho & Salimans 2022). EMA of the
weights (decay ``min(0.999, (1+n)/(10+n))``) is what gets exported.

Data are rendered on the fly (``world.sample_batch``); the batch, noise and timesteps of step ``n`` of a stage come
from a generator seeded by ``(seed, stage, n)``, so a resumed run sees exactly the data an uninterrupted one would.
The VAE stage uses batches of ``vae_batch_size`` (16: each 64x64 image already gives its convolutions 4096
positions), the diffusion stage ``batch_size`` (32); the record keeps each stage's seconds per step. Checkpoints are
one safetensors file (model, EMA and flattened AdamW state; the JSON state in its metadata) replaced atomically.

Default length (``VAE_STEPS`` = 2000, ``UNET_STEPS`` = 6000): 0.63 s per VAE step and about 1.2 s per UNet step
with 2 threads on 2 otherwise idle cores (1.18 s and 2.0 s with 1 thread) give about 141 minutes, inside the
150-minute ``--minutes`` cap (``docs/sandbox.md``, "Training"). The learning rate is constant after warm-up, so a
longer run resumes the same ``--out`` with a larger ``--unet-steps``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file
from tqdm.auto import tqdm

from safediff.errors import SafediffError
from safediff.sandbox import world
from safediff.sandbox.tokenizer import MAX_LENGTH, load_tokenizer, write_tokenizer_files

CHECKPOINT = ".checkpoint.safetensors"
RECORD = "safediff_sandbox.json"
SAMPLER_DEFAULTS = {"steps": 25, "guidance": 5.0, "height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE,
                    "scheduler": "DDIM"}
LATENT_SIZE = world.IMAGE_SIZE // 4
VAE_STEPS = 2000
UNET_STEPS = 6000
BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@dataclass
class Settings:
    out: str
    seed: int = 0
    vae_steps: int = VAE_STEPS
    unet_steps: int = UNET_STEPS
    batch_size: int = 32
    vae_batch_size: int = 16
    minutes: float = 150.0
    device: str = "cpu"
    threads: int = 2
    tiny: bool = False  # a minute-sized model for tests
    lr_vae: float = 1e-3
    lr_unet: float = 5e-4
    warmup: int = 100
    ema: float = 0.999
    kl_weight: float = 1e-6
    checkpoint_minutes: float = 3.0

    def command(self) -> str:
        cmd = (f"safediff sandbox train --out {self.out} --seed {self.seed} --vae-steps {self.vae_steps} "
               f"--unet-steps {self.unet_steps} --batch-size {self.batch_size} --vae-batch-size {self.vae_batch_size} "
               f"--minutes {self.minutes:g} --device {self.device} --threads {self.threads}")
        return cmd + (" --tiny" if self.tiny else "")


def vae_config(tiny: bool) -> dict:
    """Three levels: 64x64 pixels -> 16x16x4 latents."""
    ch = (8, 16, 16) if tiny else (32, 64, 64)
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=ch, layers_per_block=1,
                latent_channels=4, norm_num_groups=8 if tiny else 32, sample_size=world.IMAGE_SIZE)


def unet_config(tiny: bool) -> dict:
    """Three levels on the 16x16 latent (16x16, 8x8, 4x4), cross-attention at each: the 4x4 level sees the whole
    scene at once, which two-object captions (which object is left, which right) need."""
    ch = (16, 32, 32) if tiny else (64, 128, 128)
    return dict(sample_size=LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=ch,
                down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
                layers_per_block=1, cross_attention_dim=32 if tiny else 128, attention_head_dim=4 if tiny else 8,
                norm_num_groups=8 if tiny else 32)


def text_config(tok, tiny: bool) -> dict:
    hidden = 32 if tiny else 128
    return dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, projection_dim=hidden,
                num_hidden_layers=1 if tiny else 4, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def validate(s: Settings) -> None:
    if not (s.minutes > 0):
        raise SafediffError(f"--minutes must be > 0, got {s.minutes}")
    if s.device not in ("cpu", "cuda"):
        raise SafediffError(f"unknown --device {s.device!r}; accepted: cpu, cuda")
    if s.device == "cuda" and not torch.cuda.is_available():
        raise SafediffError("--device cuda given but no CUDA device is available; use --device cpu")
    for name in ("vae_steps", "unet_steps", "batch_size", "vae_batch_size", "threads"):
        if getattr(s, name) < 1:
            raise SafediffError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    out = Path(s.out)
    if out.exists() and not out.is_dir():
        raise SafediffError(f"--out {out} is a file; give an empty or new directory")
    if out.is_dir() and any(out.iterdir()) and not (out / CHECKPOINT).is_file():
        raise SafediffError(f"--out {out} is not empty and holds no sandbox checkpoint to resume; "
                            "give an empty or new directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SafediffError(f"--out {out} is not writable ({e.strerror}); give a writable directory") from None


def _step_rng(seed: int, stage: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    rng = np.random.default_rng([seed, stage, step])
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return rng, gen


def _to_pixels(images: np.ndarray, device: str) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,H,W] in [-1, 1]."""
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(device)


def _lr_lambda(warmup: int):
    return lambda n: min(1.0, (n + 1) / warmup)


class _Models:
    def __init__(self, s: Settings, tok):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(s.seed)
        self.vae = AutoencoderKL(**vae_config(s.tiny)).to(s.device)
        self.unet = UNet2DConditionModel(**unet_config(s.tiny)).to(s.device)
        self.text = CLIPTextModel(CLIPTextConfig(**text_config(tok, s.tiny))).to(s.device)
        self.ema = {f"unet.{k}": v.detach().clone() for k, v in self.unet.state_dict().items()}
        self.ema |= {f"text.{k}": v.detach().clone() for k, v in self.text.state_dict().items()}

    def update_ema(self, decay: float) -> None:
        with torch.no_grad():
            for prefix, model in (("unet.", self.unet), ("text.", self.text)):
                for k, v in model.state_dict().items():
                    e = self.ema[prefix + k]
                    if v.dtype.is_floating_point:
                        e.mul_(decay).add_(v.detach(), alpha=1 - decay)
                    else:
                        e.copy_(v)

    def ema_state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in self.ema.items() if k.startswith(prefix)}


def _save_checkpoint(path: Path, m: _Models, opt: torch.optim.Optimizer, state: dict) -> None:
    tensors = {f"vae.{k}": v for k, v in m.vae.state_dict().items()}
    tensors |= {f"unet.{k}": v for k, v in m.unet.state_dict().items()}
    tensors |= {f"text.{k}": v for k, v in m.text.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in m.ema.items()}
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for key, val in st.items():
            tensors[f"optim.{idx}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
    meta = {"state": json.dumps(state), "param_groups": json.dumps(sd["param_groups"])}
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _read_checkpoint_state(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["state"])


def _load_checkpoint(path: Path, m: _Models, make_opt, device: str) -> tuple[torch.optim.Optimizer, dict]:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path), device=device)
    m.vae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae.")})
    m.unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
    m.text.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("text.")})
    m.ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    state = json.loads(meta["state"])
    opt = make_opt(state["stage"])
    opt_state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[key] = v.cpu() if key == "step" else v
    opt.load_state_dict({"state": opt_state, "param_groups": json.loads(meta["param_groups"])})
    return opt, state


def _scaling_factor(vae, seed: int, device: str, n: int = 512) -> float:
    rng = np.random.default_rng([seed, 99])
    images, _, _ = world.sample_batch(rng, n)
    with torch.no_grad():
        z = vae.encode(_to_pixels(images, device)).latent_dist.sample(torch.Generator().manual_seed(seed))
    return float(1.0 / z.float().std())


def _vae_step(m: _Models, s: Settings, step: int) -> float:
    rng, gen = _step_rng(s.seed, 1, step)
    images, _, _ = world.sample_batch(rng, s.vae_batch_size)
    x = _to_pixels(images, s.device)
    post = m.vae.encode(x).latent_dist
    eps = torch.randn(post.mean.shape, generator=gen).to(s.device)
    z = post.mean + post.std * eps
    recon = m.vae.decode(z).sample
    mse = F.mse_loss(recon, x)
    loss = mse + s.kl_weight * post.kl().mean()
    loss.backward()
    return float(mse.detach()) / 4.0  # MSE on [0, 1] pixels


def _unet_step(m: _Models, s: Settings, step: int, tok, noise_sched) -> float:
    rng, gen = _step_rng(s.seed, 2, step)
    images, captions, _ = world.sample_batch(rng, s.batch_size)
    ids = tok(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True,
              return_tensors="pt").input_ids.to(s.device)
    with torch.no_grad():
        post = m.vae.encode(_to_pixels(images, s.device)).latent_dist
        z0 = (post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(s.device))
        z0 = z0 * m.vae.config.scaling_factor
    noise = torch.randn(z0.shape, generator=gen).to(s.device)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (z0.shape[0],), generator=gen).to(s.device)
    zt = noise_sched.add_noise(z0, noise, t)
    cond = m.text(ids)[0]
    pred = m.unet(zt, t, encoder_hidden_states=cond).sample
    loss = F.mse_loss(pred, noise)
    loss.backward()
    return float(loss.detach())


def _export(out: Path, m: _Models, tok, state: dict, s: Settings) -> None:
    """Write the diffusers folder (EMA weights) and the record into ``out``, replacing any previous export."""
    import diffusers
    import transformers
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel(**unet_config(s.tiny))
    unet.load_state_dict({k: v.cpu() for k, v in m.ema_state("unet.").items()})
    text = CLIPTextModel(m.text.config)
    text.load_state_dict({k: v.cpu() for k, v in m.ema_state("text.").items()})
    scheduler = DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=m.vae.to("cpu"), text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    tmp = out / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True, max_shard_size="16MB")  # every file < 20 MB
    for name in ("vocab.json", "merges.txt"):  # the slow-tokenizer files too, for older transformers
        shutil.copyfile(out / ".tokenizer" / name, tmp / "tokenizer" / name)
    m.vae.to(s.device)
    reproduce = Settings(**{**asdict(s), "vae_steps": state["vae_step"], "unet_steps": state["unet_step"],
                            "minutes": 600.0})
    record = {
        "command": s.command(),
        "reproduce": reproduce.command(),  # same steps from scratch; --minutes is only a wall-clock cap
        "seed": s.seed,
        "settings": {k: v for k, v in asdict(s).items() if k != "out"},
        "steps_done": {"vae": state["vae_step"], "unet": state["unet_step"]},
        "steps_planned": {"vae": s.vae_steps, "unet": s.unet_steps},
        "complete": state["vae_step"] >= s.vae_steps and state["unet_step"] >= s.unet_steps,
        "minutes": round(state["seconds"] / 60, 2),
        "seconds_per_step": {k: round(state["stage_seconds"][k] / max(1, state[f"{k}_step"]), 3)
                             for k in ("vae", "unet")},
        "final_losses": state["final_losses"],
        "scaling_factor": m.vae.config.scaling_factor,
        "parameters": {"vae": sum(p.numel() for p in m.vae.parameters()),
                       "unet": sum(p.numel() for p in unet.parameters()),
                       "text_encoder": sum(p.numel() for p in text.parameters())},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__},
        "defaults": SAMPLER_DEFAULTS,
    }
    (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    for entry in sorted(tmp.iterdir()):
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()


def train(s: Settings) -> dict:
    """Run (or resume) training into ``s.out``; return the record's state. Stops early at ``s.minutes``."""
    from diffusers import DDPMScheduler

    validate(s)
    out = Path(s.out)
    torch.set_num_threads(s.threads)
    ckpt = out / CHECKPOINT
    tok_dir = out / ".tokenizer"
    if not (tok_dir / "vocab.json").is_file():
        write_tokenizer_files(tok_dir)
    tok = load_tokenizer(tok_dir)
    m = _Models(s, tok)

    def make_opt(stage: int) -> torch.optim.Optimizer:
        if stage == 1:
            return torch.optim.AdamW(m.vae.parameters(), lr=s.lr_vae)
        return torch.optim.AdamW(list(m.unet.parameters()) + list(m.text.parameters()), lr=s.lr_unet)

    if ckpt.is_file():
        prev = _read_checkpoint_state(ckpt)
        if prev["identity"] != _identity(s):
            raise SafediffError(f"--out {out} holds a checkpoint from different settings ({prev['identity']}); "
                                "rerun with those or use a new directory")
        opt, state = _load_checkpoint(ckpt, m, make_opt, s.device)
        if state["stage"] == 2:
            m.vae.register_to_config(scaling_factor=state["scaling_factor"])
    else:
        state = {"stage": 1, "vae_step": 0, "unet_step": 0, "seconds": 0.0, "final_losses": {},
                 "stage_seconds": {"vae": 0.0, "unet": 0.0}, "identity": _identity(s)}
        opt = make_opt(1)

    start, last_ckpt = time.monotonic(), time.monotonic()
    seconds0 = state["seconds"]
    stopped = False

    def elapsed() -> float:
        return time.monotonic() - start

    noise_sched = DDPMScheduler(**BETAS)
    for stage, key, total in ((1, "vae_step", s.vae_steps), (2, "unet_step", s.unet_steps)):
        if state["stage"] > stage or stopped:
            continue
        if stage == 2:
            m.vae.eval().requires_grad_(False)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(s.warmup if stage == 2 else 50),
                                                  last_epoch=-1)
        for group in opt.param_groups:  # LambdaLR from scratch at the resumed step
            group["lr"] = group["initial_lr"] * _lr_lambda(s.warmup if stage == 2 else 50)(state[key])
        sched.last_epoch = state[key]
        losses: list[float] = []
        name = "vae" if stage == 1 else "unet"
        bar = tqdm(total=total, initial=state[key], desc=f"sandbox {name}", dynamic_ncols=True)
        while state[key] < total:
            if elapsed() > s.minutes * 60:
                stopped = True
                break
            step_start = time.monotonic()
            opt.zero_grad(set_to_none=True)
            loss = _vae_step(m, s, state[key]) if stage == 1 else _unet_step(m, s, state[key], tok, noise_sched)
            if stage == 2:
                torch.nn.utils.clip_grad_norm_(list(m.unet.parameters()) + list(m.text.parameters()), 1.0)
            opt.step()
            sched.step()
            state[key] += 1
            if stage == 2:
                n = state[key]
                m.update_ema(min(s.ema, (1 + n) / (10 + n)))
            state["stage_seconds"][name] += time.monotonic() - step_start
            losses.append(loss)
            avg = float(np.mean(losses[-50:]))
            state["final_losses"][("vae_mse" if stage == 1 else "unet_eps_mse")] = round(avg, 6)
            bar.update(1)
            bar.set_postfix(loss=f"{avg:.4f}")
            if time.monotonic() - last_ckpt > s.checkpoint_minutes * 60:
                state["seconds"] = seconds0 + elapsed()
                _save_checkpoint(ckpt, m, opt, state)
                last_ckpt = time.monotonic()
        bar.close()
        if state[key] >= total and stage == 1 and not stopped:
            m.vae.eval().requires_grad_(False)
            sf = _scaling_factor(m.vae, s.seed, s.device)
            m.vae.register_to_config(scaling_factor=sf)
            state.update(stage=2, scaling_factor=sf)
            opt = make_opt(2)
    state["seconds"] = seconds0 + elapsed()
    _save_checkpoint(ckpt, m, opt, state)
    if state["stage"] == 2:
        _export(out, m, tok, state, s)
    return state


def _identity(s: Settings) -> dict:
    """Settings that must not change across a resume (the step counts and time cap may)."""
    keys = ("seed", "batch_size", "vae_batch_size", "tiny", "lr_vae", "lr_unet", "warmup", "ema", "kl_weight")
    return {k: getattr(s, k) for k in keys}
