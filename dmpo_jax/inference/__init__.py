"""Inference shared by training, evaluation, generation and conversion: the model loader
(`model_loading`), prompt encoding and left-padding (`prompts`), the sampler settings
(`sampler_configs`) and sharded evaluation / generation on the sampling layout (`evaluation`)."""
