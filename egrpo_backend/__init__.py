"""E-GRPO training backend: pure PyTorch, no ComfyUI imports at module import time.

Algorithm: schedule (entropy plan), sde (step + log-prob), rollout, advantage, objective, trainer,
algorithms (presets). Seams: policies (FlowPolicy), rewards (Reward). Around them: lora, jobs, the
command line (`python -m egrpo_backend`).
"""
