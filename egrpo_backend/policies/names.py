"""The names a spec may give: model sources and diffusers families (a leaf: spec validation and the
policies import it without importing each other)."""

SOURCES = ("default", "diffusers", "comfy")
FAMILY_NAMES = ("sd3", "flux", "sana", "qwenimage")  # diffusers transformer families (diffusers_policy.FAMILIES has their call conventions)
