import difflib

"""Errors a user can cause. Each carries one sentence naming the file, tensor or key at fault and what to do.

The CLI prints the message without a traceback and exits with status 2.
"""



class MergelabError(Exception):
    """Base class of every user-facing error."""


class RecipeError(MergelabError):
    """The recipe is malformed: unknown key, method or parameter, or a value out of range."""


class CheckpointError(MergelabError):
    """A model folder or one of its files cannot be read as a usable checkpoint."""


class CompatibilityError(MergelabError):
    """The models of a recipe cannot be merged together (architecture, tensor set, shapes)."""


class OutputError(MergelabError):
    """The output folder cannot be written, or would overwrite something it must not."""


def closest(word: str, options: list[str] | tuple[str, ...]) -> str:
    """" (did you mean 'x'?)" for the closest valid name, or a list of the valid names."""
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    if match:
        return f" (did you mean '{match[0]}'?)"
    return f" (valid: {', '.join(sorted(options))})"
