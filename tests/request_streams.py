"""Streams of requests on a tiny FluxTransformer2DModel, as a serving stack makes them (shared by the tests
of request state)."""

import dataclasses

import torch

import cachedit
from tests.models import get

SPEC = get("flux")
OPTIONS = dict(Fn=1, Bn=0, threshold=0.4, warmup_steps=3, inner="eager")


def flux_inputs(tokens: int, seed: int) -> dict:
    """Conditioning and latent of one request at ``tokens`` image tokens (each call makes new tensors)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, tokens, 16, generator=g),
        encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        img_ids=torch.randn(tokens, 3, generator=g),
        txt_ids=torch.zeros(7, 3),
        guidance=torch.full((1,), 3.5),
        return_dict=False,
    )


@dataclasses.dataclass
class Request:
    """One generation: Euler steps over ``timesteps`` from the latent and conditioning of ``seed``."""

    seed: int
    timesteps: list[float]
    explicit: bool = False  # inside cachedit.request (else detected)
    settings: dict = dataclasses.field(default_factory=dict)
    calls_per_step: int = 1  # 2: separate CFG (cond, uncond); 3: a third guidance call
    stop_after: int | None = None  # cancelled after this many steps
    tokens: int = 16
    skip_extra_at: tuple[int, ...] = ()  # steps at which only the first call runs (a skipped uncond call)

    def steps(self, model):
        """A generator: one transformer step per ``next``; returns the final latent (None if cancelled)."""
        kwargs = flux_inputs(self.tokens, self.seed)
        negative = flux_inputs(self.tokens, self.seed + 1000)["encoder_hidden_states"]
        perturbed = kwargs["encoder_hidden_states"] * 0.5
        conditionings = [kwargs["encoder_hidden_states"], negative, perturbed][: self.calls_per_step]
        x = kwargs.pop("hidden_states")
        n = len(self.timesteps)
        for k, t in enumerate(self.timesteps):
            if self.stop_after is not None and k == self.stop_after:
                return None
            calls = conditionings[:1] if k in self.skip_extra_at else conditionings
            outs = []
            with torch.no_grad():
                for cond in calls:
                    step = {**kwargs, "encoder_hidden_states": cond, "timestep": torch.tensor([t])}
                    outs.append(model(hidden_states=x, **step)[0])
            out = outs[0] if len(outs) == 1 else outs[0] + 0.5 * (outs[0] - outs[1]) + 0.1 * sum(outs[2:], 0.0 * x)
            x = x - out / n
            yield
        return x

    def generate(self, model):
        """``steps`` inside the request's own ``cachedit.request`` when explicit."""
        if not self.explicit:
            return (yield from self.steps(model))
        with cachedit.request(model, num_inference_steps=len(self.timesteps), **self.settings):
            return (yield from self.steps(model))

    def run(self, model):
        """The whole request at once."""
        return exhaust(self.generate(model))


def exhaust(gen):
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def compile_fresh(**options):
    model = SPEC.build()
    return model, torch.compile(model, backend="cachedit", options={**OPTIONS, **options})


def cached_steps(record):
    return {name: list(b.cached_steps) for name, b in record.branches.items()}


def timesteps(n, start=0):
    return SPEC.timesteps(n)[start:]
