"""RL fine-tuning: objectives and their registry, advantages / weights, scan-accumulated
gradients, old / reference scoring, train state, rollout loop."""
