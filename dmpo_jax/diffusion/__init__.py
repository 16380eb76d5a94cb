"""Masked-diffusion primitives: Monte-Carlo masks (`masking`), ELBO estimates (`elbo`) and the
LLaDA / Dream samplers (`sampler`, `dream_sampler`)."""
