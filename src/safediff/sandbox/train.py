"""Train a sandbox model from scratch: the UNet sandbox (VAE, then UNet and text encoder together) or the FLUX-format
sandbox (transformer and both text encoders on the UNet sandbox's frozen VAE). The networks are described in
``architectures``.

Stage 1 (VAE, UNet sandbox only; Kingma & Welling 2014 as used by Rombach et al. 2022): minimise
``||D(z) - x||^2 + beta * KL(q(z|x) || N(0, I))`` with ``z ~ q(z|x)``, ``beta`` small (1e-6). After it, the latent
``scaling_factor`` is set to ``1 / std(z)`` over a fixed batch so scaled latents have unit variance. The FLUX
sandbox starts at stage 2 with the VAE of a trained UNet sandbox (``--vae-from``, the shipped one by default), its
latents shifted by their mean and scaled by ``1 / std`` (``architectures.flux_vae``).

Stage 2 (the denoiser and its text encoders, jointly; one formula for both, the adapter's forward process and
target as every fine-tuning in safediff uses them): ``x0 = from_vae(z)``, ``t ~ U{0..999}``, ``eps ~ N(0, I)``,
``x_t = noised(x0, eps, t)``, minimise ``||target(x0, eps, t) - f_theta(x_t, t, tau(y))||^2``. UNet (Ho et al. 2020;
Rombach et al. 2022): ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, target ``eps`` (``--objective epsilon``,
SD 1.x's schedule, the shipped model's) or, with ``--objective v-zero-snr`` (Lin et al. 2024), betas rescaled so
``abar_T = 0`` and target ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` (Salimans & Ho 2022). FLUX (rectified flow,
Lipman et al. 2023; Esser et al. 2024): ``sigma = t / 1000``, ``x_t = (1 - sigma) x0 + sigma eps``, target the
velocity ``eps - x0`` (t uniform, not SD3's logit-normal density). Captions are empty ~10 % of the time
(conditioning dropout for classifier-free guidance, Ho & Salimans 2022); the FLUX sandbox has no guidance embedding
(undistilled) and is sampled with true classifier-free guidance. EMA of the weights (decay
``min(0.999, (1+n)/(10+n))``) is what gets exported.

Data are rendered on the fly (``world.sample_batch``); the batch, noise and timesteps of step ``n`` of a stage come
from a generator seeded by ``(seed, stage, n)``, so a resumed run sees exactly the data an uninterrupted one would.
The VAE stage uses batches of ``vae_batch_size`` (16: each 64x64 image already gives its convolutions 4096
positions), the diffusion stage ``batch_size`` (32); the record keeps each stage's seconds per step. Checkpoints are
one safetensors file (networks, EMA and flattened AdamW state; the JSON state in its metadata) replaced atomically.

Default lengths (``VAE_STEPS`` = 2000; ``DENOISER_STEPS``: 6000 UNet, 11000 FLUX transformer steps): 0.63 s per VAE
step and about 1.2 s per UNet step with 2 threads on 2 otherwise idle cores (1.18 s and 2.0 s with 1 thread) give
about 141 minutes for the UNet sandbox; 0.73-0.75 s per transformer step (1.2 s with 1 thread) about 137 minutes
for sandbox-flux; both inside the 150-minute ``--minutes`` cap (``docs/sandbox.md``, "Training"). The learning rate is
constant after warm-up, so a longer run resumes the same ``--out`` with a larger ``--denoiser-steps``.
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
from safediff.sandbox.architectures import ARCHES, OBJECTIVES, Nets, flux_vae, latent_stats, to_pixels, vae_config
from safediff.sandbox.tokenizer import load_tokenizer, write_tokenizer_files

CHECKPOINT = ".checkpoint.safetensors"
RECORD = "safediff_sandbox.json"
VAE_STEPS = 2000
DENOISER_STEPS = {"unet": 6000, "flux": 11000}  # the shipped models' lengths
DENOISER = {"unet": "unet", "flux": "transformer"}  # the denoiser component of each architecture
SCHEDULER = {"unet": "ddim", "flux": "euler"}  # the sampler each is drawn with by default


def sampler_defaults(arch: str) -> dict:
    return {"steps": 25, "guidance": 5.0, "height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE,
            "scheduler": SCHEDULER[arch]}


@dataclass
class Settings:
    out: str
    seed: int = 0
    arch: str = "unet"
    objective: str = "epsilon"  # unet: a key of ``architectures.OBJECTIVES`` (flux is trained by rectified flow)
    vae_from: str = ""  # a trained UNet sandbox folder whose VAE is used; "": flux uses the shipped sandbox's, unet
    # trains its own (stage 1). A unet run given one skips stage 1: e.g. a new --objective on the shipped VAE
    vae_steps: int = VAE_STEPS
    denoiser_steps: int | None = None  # None: the architecture's ``DENOISER_STEPS``
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

    def __post_init__(self):
        if self.denoiser_steps is None:
            self.denoiser_steps = DENOISER_STEPS.get(self.arch, 0)  # an unknown arch is named by ``validate``

    @property
    def denoiser(self) -> str:
        return DENOISER[self.arch]

    @property
    def vae_given(self) -> bool:
        """Whether the VAE comes from a trained folder (always for flux) rather than from stage 1."""
        return self.arch == "flux" or bool(self.vae_from)

    def vae_folder(self) -> Path:
        from safediff.sandbox import WEIGHTS_DIR

        return Path(self.vae_from) if self.vae_from else WEIGHTS_DIR

    def command(self) -> str:
        arch = ("" if self.arch == "unet" else f" --arch {self.arch}") + (f" --vae-from {self.vae_from}"
                                                                          if self.vae_from else "")
        stage1 = "" if self.vae_given else f" --vae-steps {self.vae_steps}"
        stage1 += f" --objective {self.objective}" if self.objective != "epsilon" else ""
        vae_batch = f" --vae-batch-size {self.vae_batch_size}" if self.arch == "unet" else ""
        cmd = (f"safediff sandbox train --out {self.out} --seed {self.seed}{arch}{stage1} "
               f"--denoiser-steps {self.denoiser_steps} --batch-size {self.batch_size}{vae_batch} "
               f"--minutes {self.minutes:g} --device {self.device} --threads {self.threads}")
        return cmd + (" --tiny" if self.tiny else "")


def validate(s: Settings) -> None:
    if s.arch not in ARCHES:
        raise SafediffError(f"unknown --arch {s.arch!r}; accepted: {', '.join(ARCHES)}")
    if s.objective not in OBJECTIVES:
        raise SafediffError(f"unknown --objective {s.objective!r}; accepted: {', '.join(OBJECTIVES)}")
    if s.arch == "flux" and s.objective != "epsilon":
        raise SafediffError("--objective is for --arch unet; the FLUX sandbox is trained by rectified flow")
    if not (s.minutes > 0):
        raise SafediffError(f"--minutes must be > 0, got {s.minutes}")
    if s.device not in ("cpu", "cuda"):
        raise SafediffError(f"unknown --device {s.device!r}; accepted: cpu, cuda")
    if s.device == "cuda" and not torch.cuda.is_available():
        raise SafediffError("--device cuda given but no CUDA device is available; use --device cpu")
    for name in ("vae_steps", "denoiser_steps", "batch_size", "vae_batch_size", "threads"):
        if getattr(s, name) < 1:
            raise SafediffError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    if s.vae_given and not (s.vae_folder() / "vae" / "config.json").is_file():
        raise SafediffError(f"--vae-from {s.vae_folder()} holds no trained sandbox VAE (no vae/config.json); give "
                            "a folder written by `safediff sandbox train` (the UNet sandbox)")
    if s.arch == "unet" and s.vae_from:
        given = json.loads((s.vae_folder() / "vae" / "config.json").read_text())
        wanted = vae_config(s.tiny)
        if any(given.get(k) != (list(v) if isinstance(v, tuple) else v) for k, v in wanted.items()):
            raise SafediffError(f"--vae-from {s.vae_from}: its VAE is not the {'tiny ' if s.tiny else ''}sandbox "
                                "VAE this run builds (config differs); give a folder trained with the same --tiny")
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


def _lr_lambda(warmup: int):
    return lambda n: min(1.0, (n + 1) / warmup)


def _vae_sha256(s: Settings) -> str:
    from safediff.sandbox import sha256

    files = sorted((s.vae_folder() / "vae").glob("*.safetensors"))
    return sha256(files[0]) if len(files) == 1 else "|".join(sha256(f) for f in files)


class _Models:
    """The networks, their EMA, and the safediff model (adapter) the diffusion step goes through."""

    def __init__(self, s: Settings, tok):
        from safediff.models import from_pipeline

        vae = flux_vae(s.vae_folder(), s.seed, s.device) if s.arch == "flux" else None
        self.nets = Nets(s.arch, s.tiny, s.seed, tok, vae, s.objective).to(s.device)
        self.vae = self.nets.vae
        if s.arch == "unet" and s.vae_from:  # after construction, so the UNet starts where stage 1 would leave it
            from diffusers import AutoencoderKL

            trained = AutoencoderKL.from_pretrained(str(s.vae_folder() / "vae"), use_safetensors=True)
            self.vae.load_state_dict(trained.state_dict())
            self.vae.register_to_config(scaling_factor=trained.config.scaling_factor)
        self.ema = {f"{name}.{k}": v.detach().clone() for name, net in self.nets.trainable.items()
                    for k, v in net.state_dict().items()}
        self.model = from_pipeline(self.nets.pipeline(), spec=f"sandbox-training-{s.arch}")

    def update_ema(self, decay: float) -> None:
        with torch.no_grad():
            for name, net in self.nets.trainable.items():
                for k, v in net.state_dict().items():
                    e = self.ema[f"{name}.{k}"]
                    if v.dtype.is_floating_point:
                        e.mul_(decay).add_(v.detach(), alpha=1 - decay)
                    else:
                        e.copy_(v)

    def ema_states(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: {k[len(name) + 1:]: v for k, v in self.ema.items() if k.startswith(name + ".")}
                for name in self.nets.trainable}

    def saved_modules(self) -> dict[str, torch.nn.Module]:
        """What a checkpoint holds besides EMA and optimiser: the trainable networks, and the VAE when trained."""
        return ({"vae": self.vae} if self.nets.arch == "unet" else {}) | self.nets.trainable


def _save_checkpoint(path: Path, m: _Models, opt: torch.optim.Optimizer, state: dict) -> None:
    tensors = {f"{name}.{k}": v for name, mod in m.saved_modules().items() for k, v in mod.state_dict().items()}
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
    for name, mod in m.saved_modules().items():
        mod.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
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


def _vae_step(m: _Models, s: Settings, step: int) -> float:
    rng, gen = _step_rng(s.seed, 1, step)
    images, _, _ = world.sample_batch(rng, s.vae_batch_size)
    x = to_pixels(images, s.device)
    post = m.vae.encode(x).latent_dist
    eps = torch.randn(post.mean.shape, generator=gen).to(s.device)
    z = post.mean + post.std * eps
    recon = m.vae.decode(z).sample
    mse = F.mse_loss(recon, x)
    loss = mse + s.kl_weight * post.kl().mean()
    loss.backward()
    return float(mse.detach()) / 4.0  # MSE on [0, 1] pixels


def _denoiser_step(m: _Models, s: Settings, step: int) -> float:
    from safediff.sampling import denoiser_output

    adapter = m.model.adapter
    rng, gen = _step_rng(s.seed, 2, step)
    images, captions, _ = world.sample_batch(rng, s.batch_size)
    ids = [adapter.tokenize(captions, k) for k in range(len(adapter.tokenizers))]
    with torch.no_grad():
        post = m.vae.encode(to_pixels(images, s.device)).latent_dist
        x0 = adapter.from_vae(post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(s.device))
    noise = torch.randn(x0.shape, generator=gen).to(s.device)
    t = torch.randint(0, adapter.train_timesteps, (x0.shape[0],), generator=gen).to(s.device)
    pred = denoiser_output(m.model, adapter.noised(x0, noise, t), t, adapter.encode_ids(ids))
    loss = F.mse_loss(pred, adapter.training_target(x0, noise, t))
    loss.backward()
    return float(loss.detach())


def _export(out: Path, m: _Models, state: dict, s: Settings) -> None:
    """Write the diffusers folder (EMA weights) and the record into ``out``, replacing any previous export."""
    import diffusers
    import transformers

    nets = m.nets.copies(m.ema_states())
    m.vae.to("cpu")
    pipe = m.nets.pipeline(nets)
    tmp = out / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True, max_shard_size="16MB")  # every file < 20 MB
    for name in ("vocab.json", "merges.txt"):  # the slow-tokenizer files too, for older transformers
        shutil.copyfile(out / ".tokenizer" / name, tmp / "tokenizer" / name)
    m.vae.to(s.device)
    d = s.denoiser
    reproduce = Settings(**{**asdict(s), "vae_steps": state["vae_step"], "denoiser_steps": state[f"{d}_step"],
                            "minutes": 600.0})
    components = {"vae": pipe.vae, d: nets[d], "text_encoder": nets["text"]} | (
        {"text_encoder_2": nets["text2"]} if "text2" in nets else {})
    record = {
        "command": s.command(),
        "reproduce": reproduce.command(),  # same steps from scratch; --minutes is only a wall-clock cap
        "seed": s.seed,
        "architecture": s.arch,
        "settings": {k: v for k, v in asdict(s).items() if k != "out"},
        "steps_done": {"vae": state["vae_step"], d: state[f"{d}_step"]},
        "steps_planned": {"vae": 0 if s.vae_given else s.vae_steps, d: s.denoiser_steps},
        "complete": state["stage"] == 2 and state[f"{d}_step"] >= s.denoiser_steps,
        "minutes": round(state["seconds"] / 60, 2),
        "seconds_per_step": {k: round(state["stage_seconds"][k] / max(1, state[f"{k}_step"]), 3)
                             for k in ("vae", d) if state[f"{k}_step"]},
        "final_losses": state["final_losses"],
        "scaling_factor": m.vae.config.scaling_factor,
        "parameters": {k: sum(p.numel() for p in mod.parameters()) for k, mod in components.items()},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__},
        "defaults": sampler_defaults(s.arch),
    }
    if s.vae_given:
        record["vae"] = {"from": str(s.vae_folder()), "sha256": state["vae_sha256"]} | (
            {"shift_factor": m.vae.config.shift_factor} if s.arch == "flux" else {})
    if s.arch == "flux":
        record["guidance"] = "undistilled (no guidance embedding): sampled with true classifier-free guidance"
    (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    for entry in sorted(tmp.iterdir()):
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()


def train(s: Settings) -> dict:
    """Run (or resume) training into ``s.out``; return the record's state. Stops early at ``s.minutes``."""
    validate(s)
    out = Path(s.out)
    torch.set_num_threads(s.threads)
    ckpt = out / CHECKPOINT
    tok_dir = out / ".tokenizer"
    if not (tok_dir / "vocab.json").is_file():
        write_tokenizer_files(tok_dir)
    tok = load_tokenizer(tok_dir)
    m = _Models(s, tok)
    d = s.denoiser

    def make_opt(stage: int) -> torch.optim.Optimizer:
        if stage == 1:
            return torch.optim.AdamW(m.vae.parameters(), lr=s.lr_vae)
        return torch.optim.AdamW(m.nets.parameters(), lr=s.lr_unet)

    if ckpt.is_file():
        prev = _read_checkpoint_state(ckpt)
        # checkpoints before sandbox-flux name no arch, and before --objective no objective
        if {"arch": "unet", "objective": "epsilon", **prev["identity"]} != _identity(s):
            raise SafediffError(f"--out {out} holds a checkpoint from different settings ({prev['identity']}); "
                                "rerun with those or use a new directory")
        opt, state = _load_checkpoint(ckpt, m, make_opt, s.device)
        if state["stage"] == 2 and s.arch == "unet":
            m.vae.register_to_config(scaling_factor=state["scaling_factor"])
    else:
        state = {"stage": 1, "vae_step": 0, f"{d}_step": 0, "seconds": 0.0, "final_losses": {},
                 "stage_seconds": {"vae": 0.0, d: 0.0}, "identity": _identity(s)}
        if s.vae_given:  # straight to the diffusion stage
            state.update(stage=2, scaling_factor=m.vae.config.scaling_factor, vae_sha256=_vae_sha256(s))
        opt = make_opt(state["stage"])

    start, last_ckpt = time.monotonic(), time.monotonic()
    seconds0 = state["seconds"]
    stopped = False

    def elapsed() -> float:
        return time.monotonic() - start

    for stage, name, total in ((1, "vae", s.vae_steps), (2, d, s.denoiser_steps)):
        key = f"{name}_step"
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
        loss_name = "vae_mse" if stage == 1 else (f"unet_{'eps' if s.objective == 'epsilon' else 'v'}_mse"
                                                 if s.arch == "unet" else "transformer_v_mse")
        bar = tqdm(total=total, initial=state[key], desc=f"sandbox {name}", dynamic_ncols=True)
        while state[key] < total:
            if elapsed() > s.minutes * 60:
                stopped = True
                break
            step_start = time.monotonic()
            opt.zero_grad(set_to_none=True)
            loss = _vae_step(m, s, state[key]) if stage == 1 else _denoiser_step(m, s, state[key])
            if stage == 2:
                torch.nn.utils.clip_grad_norm_(m.nets.parameters(), 1.0)
            opt.step()
            sched.step()
            state[key] += 1
            if stage == 2:
                n = state[key]
                m.update_ema(min(s.ema, (1 + n) / (10 + n)))
            state["stage_seconds"][name] += time.monotonic() - step_start
            losses.append(loss)
            avg = float(np.mean(losses[-50:]))
            state["final_losses"][loss_name] = round(avg, 6)
            bar.update(1)
            bar.set_postfix(loss=f"{avg:.4f}")
            if time.monotonic() - last_ckpt > s.checkpoint_minutes * 60:
                state["seconds"] = seconds0 + elapsed()
                _save_checkpoint(ckpt, m, opt, state)
                last_ckpt = time.monotonic()
        bar.close()
        if state[key] >= total and stage == 1 and not stopped:
            m.vae.eval().requires_grad_(False)
            sf = 1.0 / latent_stats(m.vae, s.seed, s.device)[1]
            m.vae.register_to_config(scaling_factor=sf)
            state.update(stage=2, scaling_factor=sf)
            opt = make_opt(2)
    state["seconds"] = seconds0 + elapsed()
    _save_checkpoint(ckpt, m, opt, state)
    if state["stage"] == 2:
        _export(out, m, state, s)
    return state


def _identity(s: Settings) -> dict:
    """Settings that must not change across a resume (the step counts and time cap may)."""
    keys = ("seed", "batch_size", "vae_batch_size", "tiny", "lr_vae", "lr_unet", "warmup", "ema", "kl_weight", "arch",
            "objective")
    return {k: getattr(s, k) for k in keys} | ({"vae_sha256": _vae_sha256(s)} if s.vae_given else {})
