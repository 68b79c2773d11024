"""GPU planning: detected (or described) hardware + a model's shape + a spec -> a concrete launch plan.

`hardware` finds the GPUs, `model_info` reads the model's config.json, `plan.make_plan` decides
(H100 guard, precision, TP, PD disaggregation, speculative decoding) and `sglang` / `vllm` / `native`
turn the decisions into exact command lines. Nothing here launches anything.
"""
