"""Measuring what LoRA costs, in time and memory: the speed suite's and notebooks 03 and 06's code.

    timing        interleaved round-robin timing, medians and ratios
    memory        peak bytes of a call, bytes held by modules and optimizers, bytes saved for backward
    layer         one linear layer computed every way (frozen, loralib, PEFT, article, full FT)
    steps         training steps and inference of whole models; the RoBERTa cases
    mixed         a mixed batch of named adapters against each adapter's rows alone
    qlora_memory  full fine-tuning vs LoRA vs QLoRA memory of one step (notebook 06)

The speed suite itself (its targets, figure and results file) lives in benchmarks/bench_speed.py.
Timings are never asserted in tests: only ratios measured in one run mean anything.
"""
