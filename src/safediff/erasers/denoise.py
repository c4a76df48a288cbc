"""UNet calls and partial DDIM sampling for training-based erasers (ESD, TRCE stage 2).

Training-based erasers need predictions of the *frozen* model next to the model being trained. Instead of a second
copy of the pipeline they keep frozen copies of only the parameters they train and substitute them for one call with
``torch.func.functional_call`` (``predict(..., params=frozen)``); every other weight is shared.
"""

from __future__ import annotations

import torch

from safediff.models import Conditioning, Model
from safediff.sampling import make_scheduler


def predict(model: Model, x: torch.Tensor, t: torch.Tensor | int, cond: Conditioning,
            params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The UNet's output for latents ``x`` [B, C, h, w] at timestep ``t`` under ``cond`` (batch B).

    ``params`` (UNet parameter name -> tensor) replaces those parameters for this call only (frozen predictions).
    """
    f = model.pipe.vae_scale_factor
    kwargs = {"encoder_hidden_states": cond.embeds, "return_dict": False,
              **model.adapter.unet_kwargs(cond, x.shape[-2] * f, x.shape[-1] * f)}
    if not torch.is_tensor(t):
        t = torch.tensor(t)
    t = t.to(x.device).reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.to(x.device)
    if params:
        return torch.func.functional_call(model.unet, params, (x, t), kwargs, strict=False)[0]
    return model.unet(x, t, **kwargs)[0]


def cfg_predict(model: Model, x: torch.Tensor, t, cond: Conditioning, uncond: Conditioning, guidance: float,
                params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Classifier-free guidance ε∅ + g (ε_c − ε∅), both branches in one UNet call (one branch when g == 1)."""
    if guidance == 1.0:
        return predict(model, x, t, cond, params)
    eps = predict(model, torch.cat([x, x]), t, Conditioning.cat([uncond, cond]), params)
    e_uncond, e_cond = eps.chunk(2)
    return e_uncond + guidance * (e_cond - e_uncond)


def ddim(model: Model, steps: int):
    """A fresh DDIM scheduler from the model's scheduler config, set to ``steps`` inference steps (η = 0)."""
    scheduler = make_scheduler(model, "ddim")
    scheduler.set_timesteps(steps, device=model.device)
    return scheduler


def latent_shape(model: Model, height: int, width: int) -> tuple[int, int, int]:
    """(channels, h, w) of the UNet input for an image of ``height`` x ``width`` pixels."""
    f = model.pipe.vae_scale_factor
    return model.unet.config.in_channels, height // f, width // f


def timestep_bin(scheduler, i: int) -> tuple[int, int]:
    """DDPM timesteps [lo, hi) that DDIM step ``i`` stands for: from its own timestep up to the previous step's.

    With 50 DDIM steps over 1000 training steps this is the reference code's 20-wide bin around the step.
    """
    ts = scheduler.timesteps
    lo = int(ts[i])
    hi = int(ts[i - 1]) if i > 0 else int(scheduler.config.num_train_timesteps)
    return lo, max(hi, lo + 1)


@torch.no_grad()
def ddim_until(model: Model, scheduler, noise: torch.Tensor, n_steps: int, cond: Conditioning,
               uncond: Conditioning, guidance: float, params: dict[str, torch.Tensor] | None = None,
               record: bool = False):
    """Run the first ``n_steps`` DDIM steps from ``noise``; return x at timestep ``scheduler.timesteps[n_steps]``.

    With ``record`` also return the list of latents x_k before each step k < n_steps (x_0 = the scaled noise).
    """
    x = noise * scheduler.init_noise_sigma
    trajectory = []
    for t in scheduler.timesteps[:n_steps]:
        if record:
            trajectory.append(x)
        eps = cfg_predict(model, scheduler.scale_model_input(x, t), t, cond, uncond, guidance, params)
        x = scheduler.step(eps, t, x, eta=0.0, return_dict=False)[0]
    return (x, trajectory) if record else x
