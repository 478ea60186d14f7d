"""The spec's error type and size limits: a leaf that config.py and the modules config.py uses (prompt
sets, provenance) import alike, so none of them imports another in a loop."""


class SpecError(ValueError):
    """A job spec is invalid; the message names the key and what is allowed."""


# Upper bounds: far above any real run, low enough that a typo cannot ask for an endless job.
MAX_ITERATIONS = 1_000_000
MAX_PROMPTS = 100_000  # prompts in an inline list; a prompt file (prompt_sets.py) has no limit
MAX_PROMPTS_PER_ITERATION = 4096
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds
MAX_THREADS = 1024
MAX_PROMPT_CHARS = 10_000
MAX_TEXT_CHARS = MAX_PROMPT_CHARS  # any string in a spec (prompts, negative prompt, reward options)
MAX_PATH_CHARS = 4096  # model.path, model.comfy.*, output.copy_to: PATH_MAX on Linux
MAX_LIST_ITEMS = 4096  # any list in a spec other than the prompt lists (target_modules, sigmas, eval_seeds, ...)
MAX_REWARD_WEIGHT = 1000.0  # |rewards[].weight|: a larger scale only rescales the advantages' inputs
MAX_DEVICE_INDEX = 1023
