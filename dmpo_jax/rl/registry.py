"""Registry of RL objectives selected by a config string (`docs/architecture.md` §5).

Usage (the trainer's side)::

    objective = registry.get_objective(cfg.objective)           # e.g. "bgpo"
    ocfg = objective.make_config(cfg.get(cfg.objective, {}))     # validated, hashable
    aux = objective.prepare(graphdef, params, ref_params, batch, keys, ocfg)   # once per rollout
    grads, out = objective.grads(graphdef, params, batch, aux, keys, ocfg)     # per update
    # grads: fp32, gradient of out.loss = out.numerator / out.denominator

``prepare`` and ``grads`` are pure functions of pytrees: jit them with ``graphdef`` and the
config static, e.g. ``jax.jit(objective.grads, static_argnums=(0, 5))``. ``batch`` follows the
contract of `dmpo_jax.rl.scoring`; ``keys`` is a `scoring.RLKeys`.

Registered: dmpo, wddo, bgpo, vrpo_ol (direct form), vrpo_ol_two_pass (the same objective with
``form="two_pass"`` by default), diffu_grpo, wd1, spg.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

from dmpo_jax.rl.objectives import dmpo, one_step, sequence_ratio, spg
from dmpo_jax.rl.objectives.base import ObjectiveConfig, Prepared


@dataclasses.dataclass(frozen=True)
class Objective:
  """One RL objective: its config class and its two pure functions.

  uses_reference: whether ``prepare`` reads ``ref_params`` (else it may be None).
  uses_group_statistics: whether the loss normalises over the G completions of a prompt (group
    z-scores, mean-centred advantages, group-softmax weights): such an objective needs G >= 2
    (with G = 1 every advantage is 0 and every softmax weight 1). True for every registered one.
  config_defaults: overrides of the config class defaults for this registry name.
  """
  name: str
  config_cls: type
  prepare_fn: Callable[..., Prepared]
  grads_fn: Callable[..., Any]
  uses_reference: Callable[[Any], bool]
  description: str
  config_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  max_updates_fn: Optional[Callable[[Any], Optional[int]]] = None
  uses_group_statistics: bool = True

  def default_config(self) -> dict[str, Any]:
    """The defaults as a plain dict (ml_collections-compatible)."""
    return self.make_config().to_dict()

  def make_config(self, values: Optional[Mapping[str, Any]] = None, **overrides) -> ObjectiveConfig:
    """Validated config from a mapping (e.g. a ConfigDict block) plus keyword overrides."""
    merged = {**dict(self.config_defaults), **dict(values or {}), **overrides}
    try:
      return self.config_cls.from_mapping(merged)
    except (TypeError, ValueError) as e:
      raise ValueError(f"objective {self.name!r}: {e}") from e

  def _check(self, cfg: Any) -> None:
    if not isinstance(cfg, self.config_cls):
      raise TypeError(f"objective {self.name!r} needs a {self.config_cls.__name__} (use "
                      f"objective.make_config), got {type(cfg).__name__}")

  def prepare(self, graphdef: Any, params: Any, ref_params: Any, batch: Mapping[str, Any],
              keys: Any, cfg: ObjectiveConfig) -> Prepared:
    """No-grad, once per rollout: advantages / weights and old / reference scores."""
    self._check(cfg)
    if self.uses_reference(cfg) and ref_params is None:
      raise ValueError(f"objective {self.name!r} with this config needs ref_params")
    return self.prepare_fn(graphdef, params, ref_params, batch, keys, cfg)

  def grads(self, graphdef: Any, params: Any, batch: Mapping[str, Any], aux: Prepared, keys: Any,
            cfg: ObjectiveConfig):
    """(fp32 grads of the loss, `LossOutput`) with loop accumulation over MC samples and
    micro-batches."""
    self._check(cfg)
    return self.grads_fn(graphdef, params, batch, aux, keys, cfg)

  def max_updates_per_rollout(self, cfg: ObjectiveConfig) -> Optional[int]:
    """An upper bound on optimizer updates per rollout the config is exact for (None = any)."""
    return None if self.max_updates_fn is None else self.max_updates_fn(cfg)


_REGISTRY: dict[str, Objective] = {}


def register_objective(objective: Objective) -> Objective:
  if objective.name in _REGISTRY:
    raise ValueError(f"objective {objective.name!r} is already registered")
  _REGISTRY[objective.name] = objective
  return objective


def get_objective(name: str) -> Objective:
  if name not in _REGISTRY:
    raise ValueError(f"Unknown objective {name!r}; registered: {objective_names()}")
  return _REGISTRY[name]


def objective_names() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


register_objective(Objective(
    "dmpo", dmpo.DMPOConfig, dmpo.dmpo_prepare, dmpo.dmpo_grads,
    uses_reference=lambda c: c.alpha > 0,
    description="DMPO: weighted denoising cross-entropy with group-softmax importance weights"))
register_objective(Objective(
    "wddo", dmpo.WDDOConfig, dmpo.wddo_prepare, dmpo.wddo_grads,
    uses_reference=lambda c: c.alpha > 0,
    description="WDDO: weighted direct discriminative optimisation (two-pass, exact)"))
register_objective(Objective(
    "bgpo", sequence_ratio.BGPOConfig, sequence_ratio.prepare, sequence_ratio.bgpo_grads,
    uses_reference=lambda c: False, max_updates_fn=sequence_ratio.max_updates_per_rollout,
    description="BGPO: per-MC-sample linear/Jensen lower bound of the ELBO ratio objective"))
register_objective(Objective(
    "vrpo_ol", sequence_ratio.VRPOOLConfig, sequence_ratio.prepare, sequence_ratio.vrpo_ol_grads,
    uses_reference=lambda c: False, max_updates_fn=sequence_ratio.max_updates_per_rollout,
    description="VRPO-OL: exp(mean ELBO difference)·A (direct form: memory grows with n_t)"))
register_objective(Objective(
    "vrpo_ol_two_pass", sequence_ratio.VRPOOLConfig, sequence_ratio.prepare,
    sequence_ratio.vrpo_ol_grads, uses_reference=lambda c: False,
    max_updates_fn=sequence_ratio.max_updates_per_rollout, config_defaults={"form": "two_pass"},
    description="VRPO-OL, exact two-pass form with constant memory in n_t"))
register_objective(Objective(
    "diffu_grpo", one_step.DiffuGRPOConfig, one_step.diffu_grpo_prepare,
    one_step.diffu_grpo_grads, uses_reference=lambda c: c.beta > 0,
    description="diffu-GRPO (d1): one-step estimate, per-token clipped ratio, k3 KL"))
register_objective(Objective(
    "wd1", one_step.WD1Config, one_step.wd1_prepare, one_step.wd1_grads,
    uses_reference=lambda c: False,
    description="wd1: ratio-free group-softmax weighted log-likelihood"))
register_objective(Objective(
    "spg", spg.SPGConfig, spg.spg_prepare, spg.spg_grads, uses_reference=lambda c: False,
    description="SPG: ELBO for positive, EUBO (or mix) for negative advantages"))
