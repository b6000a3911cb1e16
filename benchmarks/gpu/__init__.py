"""The GPU suite's sections and plumbing; `benchmarks/gpu_suite.py` is the entry point.

common      constants, logging, device / model-shape helpers, markdown table helpers,
            subprocess helpers (run a logged child, kill its process group)
results     the results store (Part, record)
report      gpu_results.json / .md: every Part merged, each section rendering its markdown
env         environment collection (versions, GPU, peak TFLOP/s)
sdpa        which SDPA kernel runs (torch.profiler)
train       the real trainer on a local corpus
generate    KV-cached vs cache-free generation equality
gen         generation speed
throughput  training throughput, ours vs HF GPTNeoX
profiling   where a training step's time goes, by kernel category, ours vs HF
"""
