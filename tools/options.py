"""Options shared by the `dilatequant` commands and the `dilatequant arena` group: one definition, one default."""

from __future__ import annotations

import functools
from typing import Callable

import click
from click.core import ParameterSource

from dilatequant.core.errors import UserError
from dilatequant.core.sampling import GUIDANCE_SCALE, SCHEDULERS


class Group(click.Group):
    """Turns user errors into one clean line on stderr and exit status 1, with no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise click.ClickException(str(exc)) from exc


def sampler_options(command: Callable) -> Callable:
    """The options shared by every command that samples, folded into a SamplerConfig and a device."""

    @click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1), help="Sampling steps.")
    @click.option("--scheduler", default="ddim", show_default=True, type=click.Choice(list(SCHEDULERS)))
    @click.option("--seed", default=0, show_default=True, help="Seed of the initial noise.")
    @click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Samples per denoiser call [default: 32 on CPU, 500 on CUDA].")
    @click.option("--guidance-scale", default=GUIDANCE_SCALE, show_default=True, type=float,
                  help="With --prompts: classifier-free guidance against the negative prompt (1: none).")
    @click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
    @functools.wraps(command)
    def wrapper(steps: int, scheduler: str, seed: int, batch_size: int | None, guidance_scale: float, device: str, **kwargs):
        from dilatequant.core.environment import resolve_device
        from dilatequant.core.sampling import SamplerConfig, default_batch_size

        torch_device = resolve_device(device)
        batch_size = batch_size or default_batch_size(torch_device)
        explicit = click.get_current_context().get_parameter_source("scheduler") is ParameterSource.COMMANDLINE
        config = SamplerConfig(scheduler=scheduler, steps=steps, seed=seed, batch_size=batch_size, assume_schedule=explicit,
                               guidance_scale=guidance_scale)  # fmt: skip
        return command(sampler=config, device=torch_device, **kwargs)

    return wrapper
