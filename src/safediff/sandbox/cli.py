"""``safediff sandbox train``: train the sandbox model from scratch into a diffusers folder."""

from __future__ import annotations

import sys

import typer

from safediff.errors import SafediffError
from safediff.sandbox.train import DENOISER_STEPS, VAE_STEPS

app = typer.Typer(help="The sandbox: a synthetic world and tiny models (Stable Diffusion, FLUX format) trained on it.",
                  no_args_is_help=True)


@app.callback()
def sandbox() -> None:
    """The sandbox: a synthetic world and tiny models (Stable Diffusion and FLUX format) trained on it."""


@app.command()
def train(
    out: str = typer.Option(..., "--out", help="New or empty directory (or one holding a checkpoint, to resume)."),
    minutes: float = typer.Option(150.0, "--minutes", help="Wall-clock cap for this run; stops and saves early."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation, data, noise and timesteps."),
    arch: str = typer.Option("unet", "--arch", help="unet (the 'sandbox' model, Stable Diffusion format) or flux (the "
                                                   "'sandbox-flux' model, FLUX.1 format, on the UNet sandbox's VAE)."),
    objective: str = typer.Option("epsilon", "--objective",
                                  help="unet: epsilon (SD 1.x schedule, the shipped model's) or v-zero-snr "
                                       "(zero terminal SNR and v-prediction, Lin et al. 2024)."),
    vae_from: str = typer.Option("", "--vae-from", help="A trained UNet sandbox folder whose VAE is used. flux: "
                                                        "default the shipped sandbox; unet: skips VAE training "
                                                        "(default: train it)."),
    vae_steps: int = typer.Option(VAE_STEPS, "--vae-steps", help="VAE training steps (unet)."),
    denoiser_steps: int | None = typer.Option(None, "--denoiser-steps", "--unet-steps",
                                              help="Denoiser (UNet or transformer) + text encoder training steps "
                                                   f"(default: {DENOISER_STEPS['unet']} unet, "
                                                   f"{DENOISER_STEPS['flux']} flux)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per denoiser + text encoder step."),
    vae_batch_size: int = typer.Option(16, "--vae-batch-size", help="Images per VAE step."),
    threads: int = typer.Option(2, "--threads", help="torch CPU threads."),
    tiny: bool = typer.Option(False, "--tiny", hidden=True, help="A minute-sized model, for tests."),
) -> None:
    """Train the VAE, then the UNet and text encoder together (--arch unet), or a FLUX-format transformer and its
    two text encoders on a trained sandbox VAE (--arch flux); resumable; writes a diffusers folder to --out."""
    from safediff.sandbox.train import Settings
    from safediff.sandbox.train import train as run

    s = Settings(out=out, seed=seed, arch=arch, objective=objective, vae_from=vae_from, vae_steps=vae_steps,
                 denoiser_steps=denoiser_steps, batch_size=batch_size, vae_batch_size=vae_batch_size,
                 minutes=minutes, device=device, threads=threads, tiny=tiny)
    state = run(s)
    d = s.denoiser
    done = (f"vae {state['vae_step']}/{vae_steps}, " if arch == "unet" else "") + \
        f"{d} {state[f'{d}_step']}/{denoiser_steps}"
    typer.echo(f"sandbox training: {done} steps in {state['seconds'] / 60:.1f} min -> {out}")


def main() -> None:
    try:
        app()
    except SafediffError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
