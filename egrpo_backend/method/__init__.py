"""The algorithm: entropy plan, SDE step and log-prob, grouped rollouts, advantages, objectives, presets, the trainer.
May import: config, lora, distributed, dtypes, plots and the two seams, policies/ (FlowPolicy) and rewards/ (Reward).
Imported by: jobs/ (which builds and runs it), config (the names a spec is checked against), the CLI, nodes/, bench/.
"""
