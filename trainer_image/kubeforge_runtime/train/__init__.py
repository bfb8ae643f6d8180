"""Distributed fine-tuning: the FineTuneJob worker (``python -m kubeforge_runtime.train``).

Modules, torchtitan-style (model, parallelisation plan and training loop kept apart):

* ``config``        - the rendered config (strict pydantic models, presets)
* ``parallel_dims`` - the validated (pp, dp, tp) layout and its device mesh
* ``model``         - load the base model (Hugging Face code path) and apply LoRA
* ``parallelize``   - tensor-parallel plan, pipeline stages, FSDP2/DDP wrapping
* ``checkpoint``    - torch.distributed.checkpoint save/resume/reshard
* ``metrics``       - rank-0 Prometheus endpoint, structured events, MFU
* ``output``        - save_pretrained + tokenizer + lineage record
* ``trainer``       - the loop that ties them together

The pod contract (command, environment, exit codes, metrics, events) is in
``trainer_image/CONTRACT.md``.
"""
