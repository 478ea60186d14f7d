"""Running the algorithm as a job: spec -> trainer (build), folder, events, status, checkpoints, cancel, evaluation, reports.
May import: method/, the seams policies/ and rewards/, default_model/, and the shared modules beside config.py.
Imported by: the CLI (__main__), demo, default_model (its held-out evaluation), nodes/ and bench/; never by method/.
"""
