"""One base class for a user's mistake: the scripts print its message as one
line and exit 2 (tff_pipeline.cli.main). Every error that names a flag and
its fix derives from it."""


class UserError(ValueError):
    """A setting or an input is unusable; the message names it and the fix."""
