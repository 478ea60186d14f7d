"""Running the algorithm as a job: spec -> trainer (build), folder, events, status, checkpoints, cancel, evaluation, reports.
May import: method/, config, lora, distributed, dtypes, paths, plots, policies/, rewards/, default_model/.
Imported by: the CLI (__main__), demo, nodes/ (the job manager) and bench/; never by method/.
"""
