"""RL objectives (`docs/algorithms.md` §2-§4): DMPO and WDDO (`dmpo`), BGPO and VRPO-OL
(`sequence_ratio`), diffu-GRPO and wd1 (`one_step`), SPG (`spg`). Selected by name through
`dmpo_jax.rl.registry`."""
